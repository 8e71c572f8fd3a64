"""Gaussian noise for a logical step, and the normalisation of the noisy sum into an update.

Owns: ``noise_source`` (where the noise comes from), ``add_noise`` (sum + N(0, (sigma C)^2) per coordinate,
once per logical step) and ``normalize`` (divide by the *expected* batch size).

What is sensitive: the clipped sum (a function of private data) before noise; the noise itself, if an
adversary could predict it. After ``add_noise`` the result is a DP release for the accountant's (q, sigma, C).

Sources (``noise_source(*, seed, step, rank, secure)``):

- ``secure=False`` — counter-based: a ``torch.Generator`` on the tensors' device seeded with a 64-bit key derived
  by ``numpy.random.SeedSequence`` from (seed, step, rank), so step k's noise does not depend on how many steps
  ran before it (resume reproduces it) and ranks draw independent streams. torch's CPU generator is a Mersenne
  Twister (CUDA: Philox): statistically fine, not cryptographically secure. The training recipe passes the run's
  128-bit secret key as ``seed`` (drawn from the OS CSPRNG, kept only in checkpoints), so the noise is secret
  while the key is; with ``privacy.reproducible`` it passes the public config seed, and anyone who knows it knows
  the noise (tests and experiments, never a release).
- ``secure=True`` — for real releases: every noise value is computed from bytes of the operating system's
  CSPRNG (``os.urandom``; on Linux ``getrandom``, ChaCha20) by the Box-Muller transform in float64 on the CPU,
  then cast to the parameter's dtype and moved to its device. Not reproducible by design. What it rests on: the
  OS CSPRNG, and 53-bit uniforms; like every floating-point Gaussian sampler it is not hardened against
  floating-point precision attacks on the noise's low-order bits (Jin et al., 2022), and it is slow: 16 bytes
  of OS randomness and a float64 Box-Muller pair per 2 values, on the CPU.

Normalisation: the noisy sum is divided by the EXPECTED number of units per step, q * N, not by the number
actually sampled. The sampled count is itself private (it reveals whether a unit was included); dividing by a
public constant keeps the update a post-processing of the Gaussian mechanism with known sensitivity C.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import torch

_DOMAIN_TAG = 0x6E6F697365  # "noise": keeps these seeds apart from the sampler's


class NoiseSource:
    """Draws standard normal tensors; one source per (step, rank)."""

    secure: bool = False

    def standard_normal(self, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        raise NotImplementedError


class CounterNoise(NoiseSource):
    """Reproducible noise from a torch.Generator seeded with a key derived from (seed, step, rank)."""

    def __init__(self, *, seed: int, step: int, rank: int):
        for what, value in (("seed", seed), ("step", step), ("rank", rank)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be a non-negative int, got {value!r}")
        state = np.random.SeedSequence([_DOMAIN_TAG, seed, step, rank]).generate_state(2, dtype=np.uint32)
        self.key = (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.key)
            self._generators[device] = g
        return self._generators[device]

    def standard_normal(self, shape, *, dtype, device):
        sample_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        out = torch.randn(shape, dtype=sample_dtype, device=device, generator=self._generator(device))
        return out.to(dtype)


class OsNoise(NoiseSource):
    """Noise computed from os.urandom bytes (Box-Muller, float64). Not reproducible by design."""

    secure = True
    _CHUNK = 1 << 22  # values per os.urandom call

    def standard_normal(self, shape, *, dtype, device):
        n = math.prod(shape)
        out = torch.empty(n, dtype=dtype)  # filled chunk by chunk: float64 only for one chunk at a time
        done = 0
        while done < n:
            pairs = (min(self._CHUNK, n - done) + 1) // 2
            words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
            # 53 random bits -> uniform on (0, 1), never 0 (the +0.5 keeps log() finite)
            u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
            u2 = ((words[1] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
            radius = np.sqrt(-2.0 * np.log(u1))
            values = np.concatenate([radius * np.cos(2.0 * np.pi * u2), radius * np.sin(2.0 * np.pi * u2)])
            take = min(values.size, n - done)
            out[done:done + take] = torch.from_numpy(values[:take]).to(dtype)
            done += take
        return out.reshape(tuple(shape)).to(device)


def noise_source(*, seed: int | None, step: int, rank: int = 0, secure: bool) -> NoiseSource:
    """The noise source for one logical step on one rank (``secure=True`` ignores seed/step/rank)."""
    if secure:
        return OsNoise()
    if seed is None:
        raise ValueError("a reproducible noise source needs a seed (or secure=True)")
    return CounterNoise(seed=seed, step=step, rank=rank)


def add_noise(
    clipped_sum: Mapping[str, torch.Tensor],
    *,
    noise_multiplier: float,  # privacy: sigma
    clip_norm: float,  # privacy: C, the per-unit sensitivity the sum was clipped to
    generator: NoiseSource,
) -> dict[str, torch.Tensor]:
    """sum + N(0, (sigma * C)^2 I), added once per logical step, in the sum's dtype (fp32 / fp64)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
    std = noise_multiplier * clip_norm  # privacy-critical: the Gaussian mechanism's std for sensitivity C
    noisy = {}
    for name, tensor in clipped_sum.items():  # fixed (insertion) order: reproducible per (seed, step, rank)
        noise = generator.standard_normal(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        noisy[name] = tensor + std * noise
    return noisy


def normalize(noisy_sum: Mapping[str, torch.Tensor], *, expected_batch_size: float) -> dict[str, torch.Tensor]:
    """Divide by the expected number of units per step, q * N (public), never by the sampled count."""
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
    return {name: t / expected_batch_size for name, t in noisy_sum.items()}
