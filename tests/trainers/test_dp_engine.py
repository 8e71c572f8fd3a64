"""The engine's clipped sum against the brute-force reference (conftest.py), on every tiny family.

Property tests: hypothesis draws ragged right-padded rows, prompt masks, group unit ids (several rows per unit),
padding rows (-1, dummy or carrying a loss), clip norms between the smallest and largest unit norm (some units
clipped, some not), flat / per-layer clipping and the linear strategy (ghost / instantiate / auto). Models are
float64 so the tolerance (1e-5 relative) tests the algebra, not rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privtune.trainers.dp import CLIPPINGS, LINEAR_STRATEGIES, DPEngine, per_example_loss

FAMILIES = ("tiny-llama", "tiny-pythia", "tiny-gemma", "tiny-qwen")
RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def batch_specs(draw, max_rows: int = 5, max_width: int = 10):
    """Arguments of dpref.make_batch: ragged rows, prompt masks, group unit ids and padding rows (-1)."""
    n = draw(st.integers(1, max_rows))
    width = draw(st.integers(2, max_width))
    lengths = draw(st.lists(st.integers(1, width), min_size=n, max_size=n))
    unit_ids = draw(st.lists(st.sampled_from([-1, 0, 1, 1, 2, 3, 4, 7]), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    return dict(seed=draw(st.integers(0, 2**20)), lengths=lengths, width=width, unit_ids=unit_ids,
                prompt=prompt, dummy_padding_rows=draw(st.booleans()))


def engine_clipped_sum(model, batch, *, clip_norm, clipping="flat", strategy="auto", splits=None):
    engine = DPEngine(model, clip_norm=clip_norm, clipping=clipping, linear_strategy=strategy)
    groups = splits or [list(range(len(batch.unit_ids)))]
    for rows in groups:
        with engine.micro_batch(batch.unit_ids[rows]):
            logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
            engine.backward(per_example_loss(logits, batch.labels[rows]))
    return engine.pop_clipped_sum()


def pick_clip_norm(norms: list[float], frac: float) -> float:
    if not norms:
        return 1.0
    lo, hi = min(norms), max(norms)
    return lo + frac * (hi - lo) if hi > lo * (1 + 1e-3) else max(lo * 2 * frac, 1e-3)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=int(os.environ.get("PRIVTUNE_DP_EXAMPLES", "20")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow], derandomize=not os.environ.get("PRIVTUNE_DP_EXAMPLES"))
@given(spec=batch_specs(), frac=st.floats(0.05, 0.95), strategy=st.sampled_from(LINEAR_STRATEGIES),
       clipping=st.sampled_from(CLIPPINGS))
def test_clipped_sum_matches_brute_force(dpref, family, mode, spec, frac, strategy, clipping):
    model = dpref.cached_model(family, mode, torch.float64)  # shared: the engine must leave it as it found it
    batch = dpref.make_batch(**spec)
    units, unit_grads = dpref.reference_unit_grads(model, batch)
    norms = [dpref.unit_norm(g) for g in unit_grads]
    clip_norm = pick_clip_norm(norms, frac)
    expected = dpref.reference_clipped_sum(unit_grads, clip_norm=clip_norm, clipping=clipping)
    result = engine_clipped_sum(model, batch, clip_norm=clip_norm, clipping=clipping, strategy=strategy)
    if units:
        dpref.assert_sums_close(result.grads, expected, rtol=RTOL)
    else:  # only padding rows: nothing may leak into the sum
        assert all(float(g.abs().max()) == 0.0 for g in result.grads.values())
    got = dict(zip(result.unit_ids.tolist(), result.unit_norms.tolist(), strict=True))
    assert sorted(got) == units
    for u, n in zip(units, norms, strict=True):
        assert abs(got[u] - n) <= 1e-6 * n + 1e-9
    assert all(p.grad is None for p in model.parameters())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(result.grads)


def _fixed_batch(dpref, width=9):
    # rows: unit 3 (two rows), unit 0, padding row carrying a loss, unit 5, padding row
    return dpref.make_batch(seed=11, lengths=[7, 4, 9, 6, 3, 5], width=width, unit_ids=[3, 0, 3, -1, 5, -1],
                      prompt=[0, 2, 1, 0, 0, 0], dummy_padding_rows=False)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unclipped_equals_plain_summed_gradient(dpref, family, mode):
    """With a huge C nothing is clipped: the clipped sum is the ordinary gradient of the summed unit losses."""
    model = dpref.tiny_model(family, mode)
    batch = _fixed_batch(dpref)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = sum(dpref.reference_row_loss(logits[r], batch.labels[r]) for r in range(6) if int(batch.unit_ids[r]) >= 0)
    loss.backward()
    expected = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    result = engine_clipped_sum(model, batch, clip_norm=1e12)
    assert result.clipped_fraction == 0.0
    dpref.assert_sums_close(result.grads, expected, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_strategies_agree_and_match_reference_on_long_rows(dpref, family):
    """Rows where 'auto' mixes rules (units of 2 x 30 tokens: LM head ghost, projections instantiated), and the
    tied weight's cross term takes every path (ghost-embedding, dense-embedding). All three strategies agree."""
    model = dpref.tiny_model(family, "full")
    batch = dpref.make_batch(seed=3, lengths=[30, 22, 27], width=30, unit_ids=[0, 1, 0], prompt=[5, 0, 0])
    units, unit_grads = dpref.reference_unit_grads(model, batch)
    clip_norm = pick_clip_norm([dpref.unit_norm(g) for g in unit_grads], 0.5)
    expected = dpref.reference_clipped_sum(unit_grads, clip_norm=clip_norm)
    results = {s: engine_clipped_sum(model, batch, clip_norm=clip_norm, strategy=s).grads for s in LINEAR_STRATEGIES}
    for s in LINEAR_STRATEGIES:
        dpref.assert_sums_close(results[s], expected, rtol=RTOL)
    dpref.assert_sums_close(results["ghost"], results["instantiate"], rtol=1e-9)


@pytest.mark.parametrize("family", ["tiny-gemma", "tiny-pythia"])
def test_invariant_to_micro_batch_split(dpref, family):
    """Accumulating over micro-batches gives the same clipped sum as one micro-batch (units kept whole)."""
    model = dpref.tiny_model(family, "full")
    batch = _fixed_batch(dpref)
    one = engine_clipped_sum(model, batch, clip_norm=0.5)
    split = engine_clipped_sum(model, batch, clip_norm=0.5, splits=[[0, 2, 3], [1, 4, 5]])
    dpref.assert_sums_close(split.grads, one.grads, rtol=1e-10)
    assert split.num_micro_batches == 2 and split.num_units == one.num_units == 3


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma"])
def test_float32_model(dpref, family):
    """fp32 models: same algebra, fp32 rounding (tolerance 1e-4)."""
    model = dpref.tiny_model(family, "full", dtype=torch.float32)
    batch = _fixed_batch(dpref)
    _, unit_grads = dpref.reference_unit_grads(model, batch)
    clip_norm = pick_clip_norm([dpref.unit_norm(g) for g in unit_grads], 0.5)
    expected = dpref.reference_clipped_sum(unit_grads, clip_norm=clip_norm)
    result = engine_clipped_sum(model, batch, clip_norm=clip_norm)
    assert all(g.dtype == torch.float32 for g in result.grads.values())
    dpref.assert_sums_close(result.grads, expected, rtol=1e-4)


def _accumulate_grad_variables(root) -> set[int]:
    seen, found, stack = set(), set(), [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "AccumulateGrad":
            found.add(id(fn.variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_autograd_never_computes_weight_gradients(dpref, mode):
    """Inside a micro-batch the graph holds no edge to a trainable parameter: no summed weight gradient."""
    model = dpref.tiny_model("tiny-llama", mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = _fixed_batch(dpref)
    engine = DPEngine(model, clip_norm=1.0)
    with engine.micro_batch(batch.unit_ids):
        loss = per_example_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                batch.labels)
        reached = _accumulate_grad_variables(loss.grad_fn)
        assert not reached & {id(p) for p in trainable}
        engine.backward(loss)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in trainable)


@pytest.mark.parametrize("setting", ["bf16-weights", "bf16-autocast"])
def test_low_precision_keeps_the_sensitivity_bound(dpref, setting):
    """bf16 weights or autocast: norms and sums are computed in fp32 from the same saved tensors, so a clipped
    unit contributes a vector of norm C (to fp32 precision), never more."""
    dtype = torch.bfloat16 if setting == "bf16-weights" else torch.float32
    model = dpref.tiny_model("tiny-gemma", "full", dtype=dtype)
    batch = _fixed_batch(dpref)
    clip_norm = 1e-3
    engine = DPEngine(model, clip_norm=clip_norm)
    for unit in (3, 0, 5):
        rows = (batch.unit_ids == unit).nonzero().flatten()
        with engine.micro_batch(batch.unit_ids[rows]), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                      enabled=setting == "bf16-autocast"):
            logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
            engine.backward(per_example_loss(logits.float(), batch.labels[rows]))
        result = engine.pop_clipped_sum()
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in result.grads.values())
        assert result.clipped_fraction == 1.0 and float(result.unit_norms[0]) > clip_norm
        total = float(torch.sqrt(sum(g.double().pow(2).sum() for g in result.grads.values())))
        assert abs(total - clip_norm) <= 1e-4 * clip_norm, (unit, total)


def test_llama_rms_norms_take_the_direct_formula_and_a_lookalike_falls_back(dpref):
    """The RMSNorm shortcut is taken for the real class, and a class with the same name but another forward
    (Gemma's (1 + w)) is caught on its first call and handled by the general torch.func path; both exact."""
    import copy

    from privtune.trainers.dp.rules import GenericRule

    model = copy.deepcopy(dpref.cached_model("tiny-llama", "full", torch.float64))
    batch = dpref.make_batch(seed=2, lengths=[5, 7, 3], width=7, unit_ids=[0, 1, 2], prompt=[0, 1, 0])

    norm = model.model.norm

    class LlamaRMSNorm(type(norm)):  # the same class name, another formula
        def forward(self, x):
            x32 = x.float()
            xhat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1.0 + self.weight) * xhat.to(x.dtype)

    norm.__class__ = LlamaRMSNorm
    units, unit_grads = dpref.reference_unit_grads(model, batch)
    expected = dpref.reference_clipped_sum(unit_grads, clip_norm=1e-3, clipping="flat")
    engine = DPEngine(model, clip_norm=1e-3)
    with engine.micro_batch(batch.unit_ids):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        engine.backward(per_example_loss(logits, batch.labels))
    dpref.assert_sums_close(engine.pop_clipped_sum().grads, expected, rtol=RTOL)
    by_module = {rule.module: rule for rule in engine.rules if isinstance(rule, GenericRule)}
    assert by_module[norm].rms_norm is False  # the lookalike fell back
    assert all(rule.rms_norm for m, rule in by_module.items() if m is not norm)  # the real ones kept the formula
