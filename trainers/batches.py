"""Turning dataset rows into model inputs, and the batches of the non-private methods.

Owns: ``collate`` (rows → right-padded ``input_ids`` / ``attention_mask`` / ``labels`` with -100 on padding) and
``ShuffledBatches`` (fixed-size batches from a seeded permutation per epoch, for ``full`` and ``lora``).

Privacy: shuffled fixed-size batches carry no amplification-by-sampling guarantee and are never used by the DP
methods, which take ``privtune.trainers.dp.PoissonBatchSampler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Inputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_tokens: int  # real (non-padding) tokens

    def to(self, device) -> Inputs:
        return Inputs(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                      self.num_tokens)


def collate(rows: Sequence[int], input_ids: Sequence[Sequence[int]], *, pad_id: int, multiple_of: int = 8,
            labels: Sequence[Sequence[int]] | None = None) -> Inputs:
    """Rows of the dataset (index -1: a padding row with no target) → right-padded tensors.

    ``labels``: per row, the targets (``IGNORE_INDEX`` where there is no loss, e.g. prompt tokens; the same length
    as the row's ids); default: every token of the row is a target.

    A padding row is a single pad token whose label is ignored: it costs almost nothing and contributes no
    gradient, which keeps micro-batch shapes fixed in the batch dimension.
    """
    given = labels
    seqs = [list(input_ids[r]) if r >= 0 else [pad_id] for r in rows]
    width = max(len(s) for s in seqs)
    width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    tokens = 0
    for i, (row, seq) in enumerate(zip(rows, seqs, strict=True)):
        ids[i, : len(seq)] = torch.as_tensor(seq)
        mask[i, : len(seq)] = 1
        if row >= 0:
            target = seq if given is None else list(given[row])
            if len(target) != len(seq):
                raise ValueError(f"row {row}: {len(target)} labels for {len(seq)} tokens")
            labels[i, : len(seq)] = torch.as_tensor(target)
            tokens += len(seq)
    return Inputs(ids, mask, labels, tokens)


class ShuffledBatches:
    """Fixed-size logical batches from a permutation drawn per epoch from (seed, epoch); resumable at any step.

    Step k uses rows ``perm_e[j*B:(j+1)*B]`` of epoch e = k // steps_per_epoch; the last partial batch of an epoch
    is dropped so every step has exactly B examples. The rows are split into micro-batches and dealt to ranks.
    """

    def __init__(self, num_rows: int, *, batch_size: int, seed: int, micro_batch_size: int, world_size: int = 1,
                 rank: int = 0):
        self.num_rows, self.batch_size, self.seed = num_rows, min(batch_size, num_rows), seed
        self.micro_batch_size, self.world_size, self.rank = micro_batch_size, world_size, rank
        self.steps_per_epoch = max(1, num_rows // self.batch_size)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(self.num_rows)

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, j = divmod(step, self.steps_per_epoch)
        rows = self._perm(epoch)[j * self.batch_size : (j + 1) * self.batch_size].tolist()
        mb = self.micro_batch_size
        chunks = [rows[i : i + mb] for i in range(0, len(rows), mb)]
        chunks += [[] for _ in range((-len(chunks)) % self.world_size)]  # every rank takes as many micro-batches
        mine = chunks[self.rank :: self.world_size]
        return [c + [-1] * (mb - len(c)) for c in mine]
