"""Noise: the right standard deviation (KS tests), reproducible counter-based seeds, the OS-CSPRNG source."""

from __future__ import annotations

import itertools
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
    x = _draws(noise_source(seed=1234, step=7, secure=secure))
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


def test_counter_seeds_reproduce_per_step_and_differ_per_parameter():
    def draw(seed, step):
        return _draws(noise_source(seed=seed, step=step, secure=False), n=64)

    assert np.array_equal(draw(5, 3), draw(5, 3))  # resume at step 3 redraws step 3's noise
    for other in (draw(5, 4), draw(6, 3)):
        assert not np.array_equal(draw(5, 3), other)
    # parameters of one step get different noise (the parameter index is part of the key)
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


# ---------------------------------------------------------------------------------------------------------------
# The keyed source: every bit of a 128-bit key counts, chunks are independent of the thread count


def test_the_keyed_twister_state_is_the_one_numpy_computes_from_the_key():
    """Independent reference: numpy's MT19937 given the same 624 words yields the same stream torch draws from."""
    from privtune.trainers.dp.noise import _DOMAIN_TAG, _keyed_generator

    entropy = [_DOMAIN_TAG, 2**127 + 12345, 3, 0, 0]  # (tag, key, step, parameter, block)
    g = _keyed_generator(entropy)
    drawn = torch.empty(8, dtype=torch.int64).random_(0, 2**32, generator=g).tolist()
    reference = np.random.MT19937()
    state = reference.state
    state["state"] = {"key": np.random.SeedSequence(entropy).generate_state(624, dtype=np.uint32), "pos": 624}
    reference.state = state
    raw = reference.random_raw(16).tolist()
    assert drawn == raw[1::2]  # torch takes a 64-bit draw (two words) per value below 2**32: the low word


def test_every_bit_of_a_128_bit_key_changes_the_noise():
    """torch.Generator.manual_seed keeps 32 bits of a seed on the CPU; the keyed source must not."""
    base = 2**127 + 99
    ref = _draws(noise_source(seed=base, step=0, secure=False), n=64)
    for bit in (0, 31, 32, 63, 64, 100, 126):
        other = _draws(noise_source(seed=base ^ (1 << bit), step=0, secure=False), n=64)
        assert not np.array_equal(ref, other), bit
    assert not np.array_equal(_draws(noise_source(seed=7, step=0, secure=False), n=64),
                              _draws(noise_source(seed=7 + 2**32, step=0, secure=False), n=64))


def test_keyed_noise_spans_blocks_and_does_not_depend_on_the_thread_count():
    from privtune.trainers.dp.noise import BLOCK

    def draw(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            zero = {"a": torch.zeros(BLOCK + BLOCK // 2), "b": torch.zeros(3, BLOCK // 3 + 5)}
            return add_noise(zero, noise_multiplier=1.0, clip_norm=1.0,
                             generator=noise_source(seed=2**100 + 1, step=4, secure=False))
        finally:
            torch.set_num_threads(before)

    one, two = draw(1), draw(2)
    assert all(torch.equal(one[k], two[k]) for k in one)
    flat = one["a"].double().numpy()
    assert stats.kstest(flat[:200_000], "norm").pvalue > 1e-3
    assert stats.kstest(flat[BLOCK - 100_000:BLOCK + 100_000], "norm").pvalue > 1e-3  # across a block border
    assert not np.array_equal(flat[:1000], flat[BLOCK:BLOCK + 1000])  # blocks draw different streams
    assert stats.kstest(one["b"].flatten().double().numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("cuts", [[1], [7, 300], [(1 << 20) - 3, (1 << 20) + 11]])
def test_noise_drawn_in_pieces_equals_the_noise_drawn_whole(cuts):
    """A shard or partition holding coordinates [a, b) of a parameter gets exactly those coordinates' noise, so
    the release does not depend on the world size or the layout (cuts inside and across a block border)."""
    from privtune.trainers.dp.noise import BLOCK, Piece, whole

    shapes = [(BLOCK + 40,), (6, 50)]
    full = [torch.zeros(s) for s in shapes]
    noise_source(seed=2**77 + 5, step=9, secure=False).fill_(whole(full), std=1.0, scale=1.0)
    for index, shape in enumerate(shapes):
        numel = math.prod(shape)
        bounds = [0] + [c for c in cuts if c < numel] + [numel]
        pieces = [Piece(torch.zeros(b - a), index, numel, offset=a) for a, b in itertools.pairwise(bounds)]
        noise_source(seed=2**77 + 5, step=9, secure=False).fill_(pieces, std=1.0, scale=1.0)
        assert torch.equal(torch.cat([p.tensor for p in pieces]), full[index].flatten())
    with pytest.raises(ValueError, match="outside"):
        Piece(torch.zeros(5), 0, 4)


def test_privatize_in_place_is_noise_then_normalize():
    from privtune.trainers.dp.noise import privatize_, whole

    sums = {"w": torch.randn(40, 30, generator=torch.Generator().manual_seed(0)), "b": torch.randn(30)}
    reference = normalize(add_noise(sums, noise_multiplier=SIGMA, clip_norm=C,
                                    generator=noise_source(seed=2**90, step=2, secure=False)), expected_batch_size=12.5)
    inplace = {k: v.clone() for k, v in sums.items()}
    privatize_(whole(inplace.values()), noise_multiplier=SIGMA, clip_norm=C, expected_batch_size=12.5,
               generator=noise_source(seed=2**90, step=2, secure=False))
    for k in sums:
        torch.testing.assert_close(inplace[k], reference[k], rtol=1e-6, atol=1e-7)
    scaled = {k: v.clone() for k, v in sums.items()}
    privatize_(whole(scaled.values()), noise_multiplier=SIGMA, clip_norm=C, expected_batch_size=12.5, generator=None)
    for k in sums:  # a rank that draws no noise only scales
        torch.testing.assert_close(scaled[k], sums[k] / 12.5)
