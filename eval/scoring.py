"""Per-token scoring: teacher-forced negative log-likelihood and greedy hit for every predicted token.

Owns: running a causal LM over tokenized examples in length-sorted, right-padded batches and returning, for every
example, one NLL and one greedy-hit value per predicted token (token t+1 predicted from tokens ≤ t), aligned with
that token's sensitive flag. Scores are computed in float32 whatever the model's dtype.

Sensitive: the scores of sensitive training tokens are the privacy reading of Paper A; they are measurements of
the model, not private data, but they are computed from private text and stay in the run dir.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from privtune.launch.progress import progress


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


@torch.inference_mode()
def score_tokens(
    model,
    input_ids: Sequence[Sequence[int]],
    sensitive: Sequence[Sequence[bool]],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "scoring",
) -> TokenScores:
    device = next(model.parameters()).device
    model.eval()
    n = len(input_ids)
    nll: list[np.ndarray | None] = [None] * n
    hit: list[np.ndarray | None] = [None] * n
    batches = length_sorted_batches([len(x) for x in input_ids], batch_size)
    with progress(total=sum(len(x) for x in input_ids), desc=desc, unit="tok") as bar:
        for batch in batches:
            ids, mask = pad_batch([input_ids[i] for i in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:]
            token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            token_hit = logits.argmax(dim=-1) == targets
            for row, i in enumerate(batch):
                length = len(input_ids[i]) - 1
                nll[i] = token_nll[row, :length].cpu().numpy().astype(np.float32)
                hit[i] = token_hit[row, :length].cpu().numpy()
            bar.update(int(mask.sum()))
    sens = [np.asarray(s[1:], dtype=bool) for s in sensitive]
    return TokenScores(nll=nll, hit=hit, sensitive=sens)  # type: ignore[arg-type]
