"""Per-token scoring: teacher-forced negative log-likelihood and greedy hit for every predicted token.

Owns: running a causal LM over tokenized examples in length-sorted, right-padded batches and returning, for every
example, one NLL and one greedy-hit value per predicted token (token t+1 predicted from tokens ≤ t), aligned with
that token's sensitive flag. Scores are computed in float32 whatever the model's dtype.

Sensitive: the scores of sensitive training tokens are the privacy reading of Paper A; they are measurements of
the model, not private data, but they are computed from private text and stay in the run dir.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from privtune.progress import progress


@dataclass
class TokenScores:
    """Scores of one split: ``nll[i]``, ``hit[i]``, ``sensitive[i]`` are arrays over example i's predicted tokens."""

    nll: list[np.ndarray]
    hit: list[np.ndarray]
    sensitive: list[np.ndarray]

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.nll:
            return np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, bool)
        return np.concatenate(self.nll), np.concatenate(self.hit), np.concatenate(self.sensitive)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(x) for x in self.nll))


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off while scoring; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def iter_scored(
    model, input_ids: Sequence[Sequence[int]], indices: Sequence[int], *, batch_size: int, pad_id: int
) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
    """Score ``input_ids[i]`` for i in ``indices``, yielding one list of (i, nll, hit) per batch."""
    device = next(model.parameters()).device
    model.eval()
    for batch in length_sorted_batches([len(input_ids[i]) for i in indices], batch_size):
        rows = [indices[j] for j in batch]
        ids, mask = pad_batch([input_ids[i] for i in rows], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V), contiguous
        if logits.dtype != torch.float32:
            logits = logits.float()
        # Targets shifted left on the contiguous logits (no (B, T-1, V) copy); the last position has no target.
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        token_nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="none")
        token_nll = token_nll.view(ids.shape)[:, :-1].cpu().numpy()
        token_hit = (logits.argmax(dim=-1)[:, :-1] == ids[:, 1:]).cpu().numpy()
        yield [(i, token_nll[r, : len(input_ids[i]) - 1].astype(np.float32), token_hit[r, : len(input_ids[i]) - 1])
               for r, i in enumerate(rows)]


def score_tokens(
    model,
    input_ids: Sequence[Sequence[int]],
    sensitive: Sequence[Sequence[bool]],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "scoring",
) -> TokenScores:
    """Score every example in memory (the eval stage uses ``iter_scored`` to write as it goes)."""
    n = len(input_ids)
    nll: list = [None] * n
    hit: list = [None] * n
    with progress(total=n, desc=desc, unit="ex") as bar:
        for rows in iter_scored(model, input_ids, range(n), batch_size=batch_size, pad_id=pad_id):
            for i, row_nll, row_hit in rows:
                nll[i], hit[i] = row_nll, row_hit
            bar.update(len(rows))
    return TokenScores(nll=nll, hit=hit, sensitive=[np.asarray(s[1:], dtype=bool) for s in sensitive])
