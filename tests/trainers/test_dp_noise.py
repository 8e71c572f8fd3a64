"""Noise: the right standard deviation (KS tests), reproducible counter-based seeds, the OS-CSPRNG source."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from privtune.trainers.dp import OsNoise, add_noise, noise_source, normalize

SIGMA, C = 1.3, 0.7
N = 4000


def _draws(source, n=N, dtype=torch.float32) -> np.ndarray:
    zero = {"w": torch.zeros(n // 4, 2, dtype=dtype), "b": torch.zeros(n // 2, dtype=dtype)}
    noisy = add_noise(zero, noise_multiplier=SIGMA, clip_norm=C, generator=source)
    return torch.cat([t.flatten() for t in noisy.values()]).double().numpy()


@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_is_sigma_times_c(secure):
    """KS accepts N(0, (sigma C)^2) and rejects std scaled by 2/3 and 3/2 (fixed seed for the reproducible source)."""
    x = _draws(noise_source(seed=1234, step=7, rank=0, secure=secure))
    assert len(x) == N
    # The OS source is not seedable: its acceptance threshold is set so a false alarm is a 1-in-10^5 event.
    assert stats.kstest(x / (SIGMA * C), "norm").pvalue > (1e-5 if secure else 1e-3)
    assert stats.kstest(x / (0.67 * SIGMA * C), "norm").pvalue < 1e-6
    assert stats.kstest(x / (1.5 * SIGMA * C), "norm").pvalue < 1e-6


def test_noise_is_added_to_the_sum_in_its_dtype():
    base = {"a": torch.arange(6, dtype=torch.float64).view(2, 3)}
    noisy = add_noise(base, noise_multiplier=0.0, clip_norm=C, generator=noise_source(seed=0, step=0, secure=False))
    assert torch.equal(noisy["a"], base["a"])
    noisy = add_noise(base, noise_multiplier=1.0, clip_norm=C, generator=noise_source(seed=0, step=0, secure=False))
    assert noisy["a"].dtype == torch.float64 and not torch.equal(noisy["a"], base["a"])
    assert torch.equal(base["a"], torch.arange(6, dtype=torch.float64).view(2, 3))  # input left untouched


def test_counter_seeds_reproduce_per_step_and_rank():
    def draw(seed, step, rank):
        return _draws(noise_source(seed=seed, step=step, rank=rank, secure=False), n=64)

    assert np.array_equal(draw(5, 3, 0), draw(5, 3, 0))  # resume at step 3 redraws step 3's noise
    others = [draw(5, 4, 0), draw(5, 3, 1), draw(6, 3, 0)]
    for other in others:
        assert not np.array_equal(draw(5, 3, 0), other)
    # parameters of one step get different noise (one generator stream, consumed in order)
    noisy = add_noise({"p": torch.zeros(64), "q": torch.zeros(64)}, noise_multiplier=1.0, clip_norm=1.0,
                      generator=noise_source(seed=5, step=3, secure=False))
    assert not torch.equal(noisy["p"], noisy["q"])


def test_secure_source_is_not_reproducible_and_uses_os_entropy():
    a, b = _draws(OsNoise(), n=64), _draws(OsNoise(), n=64)
    assert not np.array_equal(a, b)
    src = noise_source(seed=None, step=0, secure=True)
    assert src.secure and isinstance(src, OsNoise)
    z = src.standard_normal(torch.Size([3, 5]), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert z.shape == (3, 5) and z.dtype == torch.bfloat16 and torch.isfinite(z).all()


def test_noise_arguments_are_checked():
    src = noise_source(seed=0, step=0, secure=False)
    with pytest.raises(ValueError, match="noise_multiplier"):
        add_noise({"a": torch.zeros(2)}, noise_multiplier=-1.0, clip_norm=1.0, generator=src)
    with pytest.raises(ValueError, match="clip_norm"):
        add_noise({"a": torch.zeros(2)}, noise_multiplier=1.0, clip_norm=0.0, generator=src)
    with pytest.raises(TypeError):
        add_noise({"a": torch.zeros(2)}, 1.0, 1.0, src)  # privacy arguments are keyword-only
    with pytest.raises(ValueError, match="seed"):
        noise_source(seed=None, step=0, secure=False)
    with pytest.raises(ValueError):
        noise_source(seed=-1, step=0, secure=False)


def test_normalize_divides_by_the_expected_batch_size():
    out = normalize({"a": torch.full((3,), 6.0)}, expected_batch_size=1.5)
    assert torch.equal(out["a"], torch.full((3,), 4.0))
    with pytest.raises(ValueError):
        normalize({"a": torch.zeros(1)}, expected_batch_size=0.0)
    with pytest.raises(ValueError):
        normalize({"a": torch.zeros(1)}, expected_batch_size=math.nan)
