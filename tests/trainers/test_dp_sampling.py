"""Poisson sampler: Binomial batch sizes, independent inclusion, fixed shapes, whole units, resume, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privtune.trainers.dp import DPRefusal, PoissonBatchSampler, secret_seed


def _chi_square_vs_binomial(sizes: np.ndarray, n: int, q: float) -> float:
    """p-value of the observed batch sizes against Binomial(n, q), bins with expectation < 5 merged."""
    pmf = stats.binom.pmf(np.arange(n + 1), n, q)
    observed = np.bincount(sizes, minlength=n + 1).astype(float)
    expected = pmf * len(sizes)
    obs_bins, exp_bins, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    obs_bins[-1] += acc_o
    exp_bins[-1] += acc_e
    return stats.chisquare(obs_bins, exp_bins).pvalue


def test_batch_sizes_follow_binomial():
    n, q, steps = 60, 0.1, 3000
    sampler = PoissonBatchSampler(n, sample_rate=q, steps=steps, seed=2024, micro_batch_size=4)
    sizes = np.array([len(sampler.sample_units(k)) for k in range(steps)])
    assert _chi_square_vs_binomial(sizes, n, q) > 1e-3
    assert _chi_square_vs_binomial(sizes, n, 1.3 * q) < 1e-6  # the test has power against a wrong q
    assert stats.kstest(sizes, stats.binom(n, q).cdf).statistic < 0.2  # same shape (KS is coarse on integers)
    # each unit is included about q * steps times (independent draws)
    counts = np.zeros(n)
    for k in range(steps):
        counts[sampler.sample_units(k).numpy()] += 1
    assert stats.chisquare(counts, np.full(n, counts.sum() / n)).pvalue > 1e-3
    assert abs(counts.mean() - q * steps) < 5 * np.sqrt(q * (1 - q) * steps / n)


def test_resume_reproduces_later_steps():
    sampler = PoissonBatchSampler(25, sample_rate=0.3, steps=12, seed=7, micro_batch_size=3)
    full = list(sampler)
    resumed = list(PoissonBatchSampler(25, sample_rate=0.3, steps=12, seed=7, micro_batch_size=3).batches(5))
    assert len(full) == 12 and len(resumed) == 7
    for a, b in zip(full[5:], resumed, strict=True):
        assert a.step == b.step and torch.equal(a.units, b.units)
        assert len(a.micro_batches) == len(b.micro_batches)
        for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
            assert torch.equal(x.rows, y.rows) and torch.equal(x.unit_ids, y.unit_ids)
    other = PoissonBatchSampler(25, sample_rate=0.3, steps=12, seed=8, micro_batch_size=3)
    assert any(not torch.equal(a.units, b.units) for a, b in zip(full, other, strict=True))


def test_empty_step_yields_one_padding_micro_batch_per_rank():
    sampler = PoissonBatchSampler(3, sample_rate=0.01, steps=50, seed=1, micro_batch_size=4, world_size=2, rank=1)
    empty = [b for b in sampler if len(b.units) == 0]
    assert empty, "expected at least one empty step at q=0.01"
    for b in empty:
        assert b.num_micro_batches == 1
        mb = b.micro_batches[0]
        assert mb.rows.tolist() == [-1] * 4 and mb.unit_ids.tolist() == [-1] * 4 and mb.num_real_rows == 0


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    num_units=st.integers(1, 30),
    q=st.floats(0.05, 1.0),
    micro=st.integers(1, 6),
    world=st.integers(1, 3),
    grouped=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_micro_batches_are_fixed_shape_whole_units_and_agree_across_ranks(num_units, q, micro, world, grouped, seed):
    rng = np.random.default_rng(seed)
    if grouped:  # units of 1..micro rows, rows numbered consecutively in a random order
        sizes = rng.integers(1, micro + 1, size=num_units)
        perm = rng.permutation(int(sizes.sum())).tolist()
        unit_rows, start = [], 0
        for s in sizes:
            unit_rows.append(perm[start:start + s])
            start += s
    else:
        unit_rows = None
    per_rank = [
        PoissonBatchSampler(num_units, sample_rate=q, steps=3, seed=seed, micro_batch_size=micro,
                            unit_rows=unit_rows, world_size=world, rank=r)
        for r in range(world)
    ]
    for step in range(3):
        batches = [s.batch(step) for s in per_rank]
        assert len({b.num_micro_batches for b in batches}) == 1  # every rank takes the same count
        assert all(torch.equal(b.units, batches[0].units) for b in batches)
        seen_units = []
        for b in batches:
            for mb in b.micro_batches:
                assert mb.rows.shape == (micro,) and mb.unit_ids.shape == (micro,)
                assert torch.equal(mb.rows < 0, mb.unit_ids < 0)  # padding rows are padding in both
                for u in sorted(set(mb.unit_ids[mb.unit_ids >= 0].tolist())):
                    rows = mb.rows[mb.unit_ids == u].tolist()
                    expected = [u] if unit_rows is None else unit_rows[u]
                    assert sorted(rows) == sorted(expected)  # all of the unit's rows, in this micro-batch
                    seen_units.append(u)
        assert sorted(seen_units) == sorted(batches[0].units.tolist())  # each sampled unit exactly once


def test_invalid_settings_are_refused():
    with pytest.raises(DPRefusal, match="more than micro_batch_size"):
        PoissonBatchSampler(2, sample_rate=0.5, steps=1, seed=0, micro_batch_size=2, unit_rows=[[0, 1, 2], [3]])
    with pytest.raises(DPRefusal, match="exactly one unit"):
        PoissonBatchSampler(2, sample_rate=0.5, steps=1, seed=0, micro_batch_size=4, unit_rows=[[0, 1], [1]])
    with pytest.raises(DPRefusal, match="sample_rate"):
        PoissonBatchSampler(2, sample_rate=0.0, steps=1, seed=0, micro_batch_size=4)
    with pytest.raises(DPRefusal, match="rank"):
        PoissonBatchSampler(2, sample_rate=0.5, steps=1, seed=0, micro_batch_size=4, world_size=2, rank=2)
    with pytest.raises(TypeError):
        PoissonBatchSampler(2, 0.5, 1, 0, 4)  # privacy arguments are keyword-only


def test_expected_batch_size_and_secret_seed():
    sampler = PoissonBatchSampler(200, sample_rate=0.05, steps=1, seed=secret_seed(), micro_batch_size=8)
    assert sampler.expected_batch_size == pytest.approx(10.0)
    assert secret_seed() != secret_seed() and secret_seed().bit_length() <= 128


def test_without_padding_keeps_real_rows_and_one_row_of_an_empty_micro_batch():
    sampler = PoissonBatchSampler(40, sample_rate=0.3, steps=20, seed=3, micro_batch_size=8)
    for step in range(20):
        for micro in sampler.batch(step).micro_batches:
            trimmed = micro.without_padding()
            real = micro.rows >= 0
            if real.any():
                assert torch.equal(trimmed.rows, micro.rows[real]) and torch.equal(trimmed.unit_ids, micro.unit_ids[real])
            else:
                assert trimmed.rows.tolist() == [-1] and trimmed.unit_ids.tolist() == [-1]
