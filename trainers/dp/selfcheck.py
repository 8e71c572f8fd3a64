"""The engine checks itself on real data: one or two sampled units' clipped gradients recomputed by plain autograd.

Owns: ``self_check`` — for a few units of a real micro-batch, the engine's clipped contribution (a fresh
``DPEngine`` on the same model, run on that unit's rows alone) against the definition: the unit's rows forwarded
alone, ``per_example_loss`` summed, ``torch.autograd.grad`` over the trainable parameters, clipped with the
engine's rule. Any parameter whose two contributions differ by more than ``rtol`` (relative to the reference's
norm) stops training with a ``DPInvariantError`` naming it, before the step's update is released.

Why: the engine's rules see a parameter only through its module's hooked call. A weight also used elsewhere (a
head computed as ``F.linear(h, embed.weight)``), a forward replaced on the instance, or activations laid out
sequence-first keep the norm bound but make the update wrong without any error — each unit's contribution must be
checked, not assumed. The recipe runs it on the first micro-batch of a run and every ``train.self_check_every``
steps.

Sensitive: it reads private rows like the step does; nothing it computes leaves this function except the verdict.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from .engine import _NORM_EPS, DPEngine
from .errors import DPInvariantError
from .loss import per_example_loss


def self_check(
    engine: DPEngine,
    inputs: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    unit_rows: list[list[int]],
    *,
    rtol: float = 1e-3,
) -> float:
    """Compare the engine with autograd on each unit of ``unit_rows`` (row indices of one unit each).

    ``inputs(rows)`` returns (input_ids, attention_mask, labels) of those rows on the model's device. Returns the
    largest relative difference seen; raises ``DPInvariantError`` above ``rtol``.
    """
    model = engine.model
    was_training = model.training
    model.eval()  # dropout would make the two computations differ
    worst = 0.0
    devices = sorted({"cpu"} | {p.device.type for p in engine.params.values()})
    try:
        with contextlib.ExitStack() as stack:
            for device_type in devices:  # the engine's math is checked, not bf16 rounding
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            for rows in unit_rows:
                worst = max(worst, _check_unit(engine, inputs(rows), rtol=rtol))
    finally:
        model.train(was_training)
    return worst


def _losses(model, input_ids, attention_mask, labels) -> torch.Tensor:
    return per_example_loss(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), labels)


def _check_unit(engine: DPEngine, batch, *, rtol: float) -> float:
    input_ids, attention_mask, labels = batch
    probe = DPEngine(engine.model, trainable=list(engine.params.values()), clip_norm=engine.clip_norm,
                     clipping=engine.clipping, linear_strategy=engine.linear_strategy)
    unit = torch.zeros(input_ids.shape[0], dtype=torch.long)  # the unit's rows as one unit
    with probe.micro_batch(unit, sequence_length=input_ids.shape[1]) as ctx:
        ctx.backward(_losses(engine.model, input_ids, attention_mask, labels))
    got = probe.pop_clipped_sum().grads

    params = list(engine.params.values())
    losses = _losses(engine.model, input_ids, attention_mask, labels)
    grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
    reference = {name: (torch.zeros_like(p) if g is None else g).to(got[name].dtype)
                 for (name, p), g in zip(engine.params.items(), grads, strict=True)}
    if engine.clipping == "flat":
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in reference.values()))
        factors = dict.fromkeys(reference, min(1.0, engine.clip_norm / (norm + _NORM_EPS)))
    else:
        factors = {name: min(1.0, engine._thresholds[name] / (float(g.double().norm()) + _NORM_EPS))
                   for name, g in reference.items()}
    worst = 0.0
    for name, ref in reference.items():
        expected = ref * factors[name]
        scale = max(float(expected.norm()), engine.clip_norm * 1e-6)
        error = float((got[name].to(expected.device) - expected).norm()) / scale
        worst = max(worst, error)
        if not math.isfinite(error) or error > rtol:
            raise DPInvariantError(
                f"self-check failed: the DP engine's clipped gradient of '{name}' differs from plain autograd's by "
                f"{error:.2e} (relative) for a sampled unit, so this model uses the parameter in a way the engine "
                "does not see (a weight used outside its module, a replaced forward, or inputs that are not "
                "(batch, sequence, ...)); no update of this step was released",
                "freeze that parameter (requires_grad=False) or report the model class",
            )
    return worst


def pick_units(unit_ids: torch.Tensor, rows: torch.Tensor, *, count: int, generator: torch.Generator) -> list[list[int]]:
    """Up to ``count`` units of a micro-batch, each as the list of its dataset rows (padding rows skipped)."""
    units: dict[int, list[int]] = {}
    for u, r in zip(unit_ids.tolist(), rows.tolist(), strict=True):
        if u >= 0:
            units.setdefault(u, []).append(r)
    keys = list(units)
    order = torch.randperm(len(keys), generator=generator).tolist()[:count]
    return [units[keys[i]] for i in order]


__all__ = ["pick_units", "self_check"]
