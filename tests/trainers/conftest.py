"""Shared fixtures of the DP-engine tests: tiny models and the brute-force reference.

Test modules get these helpers through the session fixture ``dpref`` (tests/ has no __init__.py, so a
conftest cannot be imported by name). The reference never uses the engine: for each privacy unit it forwards that unit's rows ALONE (cut to the
unit's longest row, no rows of other units, no padding rows), sums an independently written per-row loss,
backpropagates with ordinary autograd, reads ``param.grad`` (tied weights: autograd already sums both uses),
and clips the flattened gradient. That is the definition of the clipped sum the engine must reproduce.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import pytest
import torch

FAMILIES = ("tiny-llama", "tiny-pythia", "tiny-gemma", "tiny-qwen")
PAD_ID = 256  # the byte tokenizer's <pad>


@functools.cache
def _cached_model(family: str, mode: str, dtype: torch.dtype):
    from privtune.trainers.models import build_tiny

    model, _ = build_tiny(family, seed=0, dtype=dtype)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: B is random too, so every LoRA factor has a non-zero gradient.
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model = model.to(dtype)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()  # no dropout: the reference and the engine must see the same function
    return model


def tiny_model(family: str, mode: str = "full", dtype: torch.dtype = torch.float64):
    """A tiny model ('full': every parameter trainable, tied embeddings included; 'lora': peft LoRA r=4)."""
    return copy.deepcopy(_cached_model(family, mode, dtype))


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss
    lengths: torch.Tensor  # (B,) real tokens per row (right padding after)
    unit_ids: torch.Tensor  # (B,) -1 for padding rows


def make_batch(*, seed: int, lengths: list[int], width: int, unit_ids: list[int], prompt: list[int],
               dummy_padding_rows: bool = True) -> Batch:
    """Right-padded rows of random bytes; ``prompt[b]`` leading tokens carry no loss; -1 rows are padding rows."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    ids = torch.full((b, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for r, n in enumerate(lengths):
        if unit_ids[r] < 0 and dummy_padding_rows:
            continue  # an all-masked dummy row
        ids[r, :n] = torch.randint(0, 256, (n,), generator=g)
        mask[r, :n] = 1
        labels[r, :n] = ids[r, :n]
        labels[r, : min(prompt[r], n)] = -100
    lens = mask.sum(dim=1)
    return Batch(ids, mask, labels, lens, torch.tensor(unit_ids, dtype=torch.long))


def reference_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of one row, written without F.cross_entropy; 0 (with a graph) when no target."""
    targets = labels[1:]
    logp = torch.log_softmax(logits[:-1].to(torch.float64), dim=-1)
    terms = [-logp[t, targets[t]] for t in range(targets.shape[0]) if int(targets[t]) != -100]
    if not terms:
        return logits.sum() * 0.0
    return torch.stack(terms).mean()


def trainable_named(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference_unit_grads(model, batch: Batch) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """Per unit (ascending id): the gradient of the sum of its rows' losses, each unit forwarded alone."""
    params = trainable_named(model)
    units = sorted({int(u) for u in batch.unit_ids.tolist() if u >= 0})
    out = []
    for u in units:
        rows = [r for r in range(len(batch.unit_ids)) if int(batch.unit_ids[r]) == u]
        width = max(1, max(int(batch.lengths[r]) for r in rows))
        for p in params.values():
            p.grad = None
        logits = model(input_ids=batch.input_ids[rows, :width],
                       attention_mask=batch.attention_mask[rows, :width]).logits
        loss = sum(reference_row_loss(logits[i], batch.labels[r, :width]) for i, r in enumerate(rows))
        loss.backward()
        out.append({n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                    for n, p in params.items()})
    for p in params.values():
        p.grad = None
    return units, out


def unit_norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def reference_clipped_sum(unit_grads: list[dict[str, torch.Tensor]], *, clip_norm: float,
                          clipping: str = "flat") -> dict[str, torch.Tensor]:
    """sum_u min(1, C / (|g_u| + 1e-6)) g_u (flat), or per parameter with C / sqrt(P) (per_layer)."""
    total: dict[str, torch.Tensor] = {}
    for grads in unit_grads:
        flat_factor = min(1.0, clip_norm / (unit_norm(grads) + 1e-6))
        for name, g in grads.items():
            if clipping == "flat":
                factor = flat_factor
            else:
                c = clip_norm / math.sqrt(len(grads))
                factor = min(1.0, c / (float(g.double().norm()) + 1e-6))
            total[name] = total.get(name, torch.zeros_like(g, dtype=torch.float64)) + factor * g.double()
    return total


def assert_sums_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, rtol: float) -> None:
    """Relative error <= rtol over all parameters together, and per parameter where it is not ~0."""
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    flat_e = torch.cat([expected[n].double().flatten() for n in sorted(expected)])
    flat_a = torch.cat([actual[n].double().flatten() for n in sorted(expected)])
    scale = float(flat_e.norm())
    assert float((flat_a - flat_e).norm()) <= rtol * max(scale, 1e-12), (
        f"global relative error {float((flat_a - flat_e).norm()) / max(scale, 1e-12):.3e}"
    )
    for n in expected:
        e, a = expected[n].double(), actual[n].double()
        if float(e.norm()) > 1e-6 * scale:
            err = float((a - e).norm()) / float(e.norm())
            assert err <= rtol, f"{n}: relative error {err:.3e}"


@pytest.fixture(scope="session")
def dpref():
    """The helpers above, as one namespace (session-scoped, so hypothesis tests may use it)."""
    import types

    return types.SimpleNamespace(
        FAMILIES=FAMILIES, cached_model=_cached_model, tiny_model=tiny_model, make_batch=make_batch,
        reference_row_loss=reference_row_loss, reference_unit_grads=reference_unit_grads, unit_norm=unit_norm,
        reference_clipped_sum=reference_clipped_sum, assert_sums_close=assert_sums_close,
        trainable_named=trainable_named,
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (and do not fight over shared cores); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
