"""Per-example causal-LM loss: the quantity whose gradient the DP engine clips.

Owns: ``per_example_loss`` — one scalar per row, so that backpropagating ``loss.sum()`` makes row ``b`` of every
output gradient the gradient of example ``b``'s loss alone. Clipping a batch-mean loss instead would clip the
wrong thing (each row's gradient scaled by 1/B, and rows coupled through the mean).

Sensitive: the labels (the private text). ``ignore_index`` positions (prompt tokens, padding) carry no loss and
hence no gradient; a row with no target token gets loss exactly 0 (a constant, not NaN), so all-padding rows
used to keep micro-batch shapes fixed contribute nothing.

The shift matches Hugging Face causal LMs: position ``t`` of ``logits`` predicts ``labels[t + 1]``; the last
logit position and the first label are unused. Cross-entropy is computed in float32 (or float64 for float64
logits), like transformers' ``ForCausalLMLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy per row: (B, T, V) logits and (B, T) labels -> (B,) losses.

    Rows whose labels are all ``ignore_index`` (after the shift) get 0.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"per_example_loss expects logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shift_logits = logits[:, :-1, :].to(compute_dtype)
    shift_labels = labels[:, 1:]
    valid = shift_labels != ignore_index
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view_as(shift_labels)
    counts = valid.sum(dim=1)
    # where(), not a product with the mask: a fully masked padding row may hold NaN logits, and 0 * NaN = NaN.
    # Dividing by max(count, 1) keeps rows without a target at exactly 0.
    token_loss = torch.where(valid, token_loss, torch.zeros((), dtype=token_loss.dtype, device=token_loss.device))
    return token_loss.sum(dim=1) / counts.clamp(min=1).to(compute_dtype)
