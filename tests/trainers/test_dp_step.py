"""A whole DP step: sampler -> fixed-shape micro-batches -> engine -> noise -> normalised update -> optimizer.

The invariance test TRL-style: the privatised update must not depend on how a logical batch is split into
micro-batches (performance settings never change the result), and a step with no sampled unit still updates
the parameters with noise alone.
"""

from __future__ import annotations

import pytest
import torch

from privtune.trainers.dp import (
    DPEngine,
    PoissonBatchSampler,
    add_noise,
    noise_source,
    normalize,
    per_example_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 256


def _rows(data, rows: torch.Tensor):
    """Gather dataset rows; -1 -> an all-masked dummy row (pad ids, mask 0, no label)."""
    real = rows >= 0
    idx = rows.clamp(min=0)
    ids = torch.where(real[:, None], data.input_ids[idx], torch.full_like(data.input_ids[idx], PAD))
    mask = torch.where(real[:, None], data.attention_mask[idx], torch.zeros_like(data.attention_mask[idx]))
    labels = torch.where(real[:, None], data.labels[idx], torch.full_like(data.labels[idx], -100))
    return ids, mask, labels


def dp_update(model, data, sampler, step, *, clip_norm, sigma, seed):
    engine = DPEngine(model, clip_norm=clip_norm)
    batch = sampler.batch(step)
    for micro in batch.micro_batches:
        ids, mask, labels = _rows(data, micro.rows)
        with engine.micro_batch(micro.unit_ids):
            engine.backward(per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels))
    clipped = engine.pop_clipped_sum()
    noisy = add_noise(clipped.grads, noise_multiplier=sigma, clip_norm=clip_norm,
                      generator=noise_source(seed=seed, step=step, secure=False))
    return engine, clipped, normalize(noisy, expected_batch_size=sampler.expected_batch_size)


@pytest.mark.parametrize("grouped", [False, True])
def test_update_does_not_depend_on_micro_batch_size(dpref, grouped):
    model = dpref.tiny_model("tiny-qwen", "lora")
    data = dpref.make_batch(seed=9, lengths=[6, 3, 8, 5, 7, 2, 8, 4, 6, 5], width=8, unit_ids=list(range(10)),
                            prompt=[1] * 10)
    unit_rows = [[0, 1], [2], [3, 4, 5], [6], [7, 8], [9]] if grouped else None
    n = len(unit_rows) if grouped else 10
    updates = []
    for micro in (3, 4, 7):
        sampler = PoissonBatchSampler(n, sample_rate=0.6, steps=4, seed=3, micro_batch_size=micro,
                                      unit_rows=unit_rows)
        _, clipped, update = dp_update(model, data, sampler, 2, clip_norm=0.3, sigma=0.8, seed=11)
        assert clipped.num_units == len(sampler.sample_units(2)) > 0
        updates.append(update)
    for other in updates[1:]:
        dpref.assert_sums_close(other, updates[0], rtol=1e-10)


def test_empty_step_updates_with_noise_only_and_optimizer_steps(dpref):
    model = dpref.tiny_model("tiny-llama", "lora")
    data = dpref.make_batch(seed=1, lengths=[5, 4], width=5, unit_ids=[0, 1], prompt=[0, 0])
    sampler = PoissonBatchSampler(2, sample_rate=0.02, steps=40, seed=0, micro_batch_size=2)
    step = next(k for k in range(40) if len(sampler.sample_units(k)) == 0)
    engine, clipped, update = dp_update(model, data, sampler, step, clip_norm=1.0, sigma=1.0, seed=5)
    assert clipped.num_units == 0 and clipped.num_micro_batches == 1
    expected_std = 1.0 * 1.0 / sampler.expected_batch_size
    flat = torch.cat([u.flatten() for u in update.values()])
    assert 0.8 * expected_std < float(flat.std()) < 1.2 * expected_std  # pure noise, scaled by 1 / (q N)
    before = {n: p.detach().clone() for n, p in engine.params.items()}
    optimizer = torch.optim.SGD(list(engine.params.values()), lr=0.1)
    engine.set_grads(update)
    optimizer.step()
    for n, p in engine.params.items():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * update[n].to(p.dtype))


def test_the_step_object_releases_what_the_reference_pipeline_releases(dpref):
    """DPStep (fused, in place) against engine -> add_noise -> normalize -> set_grads written out by hand."""
    from privtune.trainers.dp.step import DPStep, MicroBatchInputs

    model = dpref.tiny_model("tiny-llama", "lora")
    data = dpref.make_batch(seed=4, lengths=[6, 3, 8, 5, 7, 2], width=8, unit_ids=list(range(6)), prompt=[1] * 6)
    sampler = PoissonBatchSampler(6, sample_rate=0.7, steps=3, seed=2, micro_batch_size=4)
    _, _, expected = dp_update(model, data, sampler, 1, clip_norm=0.4, sigma=0.9, seed=2**100 + 3)

    engine = DPEngine(model, clip_norm=0.4)
    step = DPStep(engine, noise_multiplier=0.9, expected_batch_size=sampler.expected_batch_size,
                  randomness_key=2**100 + 3)

    def loss_fn(rows):
        ids, mask, labels = _rows(data, rows)
        return per_example_loss(model(input_ids=ids, attention_mask=mask).logits, labels)

    micro = [MicroBatchInputs(m.unit_ids, m.rows) for m in sampler.batch(1).micro_batches]
    stats = step.run(micro, loss_fn, step=1)
    assert stats.num_units == len(sampler.sample_units(1))
    for name, p in engine.params.items():
        torch.testing.assert_close(p.grad, expected[name].to(p.dtype), rtol=1e-5, atol=1e-7)


def test_a_step_needs_a_key_unless_the_noise_comes_from_the_os(dpref):
    from privtune.trainers.dp.step import DPStep

    engine = DPEngine(dpref.tiny_model("tiny-llama", "lora"), clip_norm=1.0)
    with pytest.raises(ValueError, match="randomness key"):
        DPStep(engine, noise_multiplier=1.0, expected_batch_size=4.0, randomness_key=None)
    DPStep(engine, noise_multiplier=1.0, expected_batch_size=4.0, randomness_key=None, secure_rng=True)
