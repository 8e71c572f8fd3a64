"""Gaussian noise for a logical step, and the normalisation of the noisy sum into an update.

Owns: the noise sources (``noise_source``: keyed or OS-CSPRNG), ``Piece`` (which coordinates a tensor holds),
``privatize_`` (in place: sum -> (sum + N(0,
(sigma C)^2)) / (q N), one pass per chunk, the form the training step uses), and the two halves separately,
``add_noise`` and ``normalize`` (a new dict each; for tests and references).

What is sensitive: the clipped sum (a function of private data) before noise; the noise itself, if an
adversary could predict it. After the noise the result is a DP release for the accountant's (q, sigma, C).

Sources (``noise_source(*, seed, step, secure)``), filling ``Piece`` s (which coordinates of which parameter a
tensor holds):

- ``secure=False`` — keyed: the noise of step k is a function of (key, k) and of the coordinate it lands on, so a
  resumed run redraws step k's noise, and it does not depend on how many processes there are or how the sum is
  sharded over them. Each parameter's sum (by its index in the step's fixed parameter order, flattened row-major)
  is cut into blocks of ``BLOCK`` values; block b of parameter i is drawn whole, by torch's CPU Mersenne Twister
  whose 624-word state is set from ``numpy.random.SeedSequence([tag, key, k, i, b])``, and a rank that owns only
  part of the block (a shard, a partition) keeps its part. One process, 2 ranks of FSDP2 or 8 of ZeRO-3 thus add
  the very same value to each coordinate. Why the whole state: ``torch.Generator.manual_seed`` keeps only 32 bits
  of its seed on the CPU, which would make a 128-bit key worth 32 bits; the state set here depends on every bit
  of the key (SeedSequence pools 128 bits). Blocks are independent, so they are drawn on several threads with the
  same result for any thread count. The training recipe passes the run's 128-bit secret key as ``seed`` (OS
  CSPRNG, kept only in checkpoints); under ``privacy.reproducible`` it passes the public config seed, and anyone
  who knows it knows the noise (tests and experiments, never a release). The twister is a statistical generator,
  not a cryptographic one: an adversary who saw many of its raw outputs could reconstruct its state; the released
  model shows none of them, only their sum with private gradients. Tensors on an accelerator get their blocks
  drawn on the CPU and copied (correct on any device; a device-side keyed generator would be faster).
- ``secure=True`` — the hardened mode: every noise value is computed from bytes of the operating system's
  CSPRNG (``os.urandom``; on Linux ``getrandom``, ChaCha20) by the Box-Muller transform in float64 on the CPU,
  then cast to the tensor's dtype and moved to its device. Not reproducible by design. What it rests on: the
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
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

_DOMAIN_TAG = 0x6E6F697365  # "noise": keeps these seeds apart from the sampler's
BLOCK = 1 << 20  # values per keyed block of a parameter: public and fixed, so the noise never depends on the
# thread count, the world size or the sharding
_MT_WORDS = 624


# ----------------------------------------------------------------------------------------------------------------
# torch's CPU generator state, written whole


def _mt_state_layout() -> np.ndarray:
    """A template of torch's CPU generator state, after checking where the 624 twister words sit in it.

    torch serialises (initial seed u64, left i32, seeded i32, next u64, state u64[624], normal caches ...). The
    check seeds a generator and compares the words with the twister's published initialisation; any other layout
    is refused rather than guessed (a silently weaker generator behind a stated ε is the bug this avoids)."""
    g = torch.Generator().manual_seed(12345)
    raw = g.get_state().numpy().copy()
    expected = [12345]
    for i in range(1, _MT_WORDS):
        prev = expected[-1]
        expected.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    words = raw[24:24 + 8 * _MT_WORDS].view(np.uint64)
    header = raw[8:16].view(np.int32)
    if raw.size < 24 + 8 * _MT_WORDS or not (words == np.array(expected, dtype=np.uint64)).all() \
            or list(header) != [1, 1]:
        raise RuntimeError("this torch build stores its CPU generator state in an unknown layout, so the keyed "
                           "noise cannot be set from a 128-bit key; set privacy.secure_rng: true")
    return raw


_TEMPLATE: np.ndarray | None = None


def _keyed_generator(entropy: list[int]) -> torch.Generator:
    """A CPU generator whose whole twister state is derived from ``entropy`` (every bit of it counts)."""
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = _mt_state_layout()
    raw = _TEMPLATE.copy()
    words = np.random.SeedSequence(entropy).generate_state(_MT_WORDS, dtype=np.uint32)
    raw[24:24 + 8 * _MT_WORDS] = words.astype(np.uint64).view(np.uint8)
    raw[0:8] = 0  # the "initial seed" torch reports; not part of the stream
    raw[8:16] = np.array([1, 1], dtype=np.int32).view(np.uint8)  # left=1: twist before the first output; seeded
    raw[16:24] = 0  # next=0
    raw[24 + 8 * _MT_WORDS:] = 0  # no cached Box-Muller value carried over from the template
    g = torch.Generator()
    g.set_state(torch.from_numpy(raw))
    return g


# ----------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Piece:
    """A tensor holding values ``[offset, offset + tensor.numel())`` of parameter ``parameter``'s flattened sum,
    which has ``numel`` values in all. One process holds whole parameters (``offset = 0``); a shard holds a slice."""

    tensor: torch.Tensor
    parameter: int  # index in the step's fixed parameter order (the engine's trainable order)
    numel: int
    offset: int = 0

    def __post_init__(self):
        if not (0 <= self.offset and self.offset + self.tensor.numel() <= self.numel):
            raise ValueError(f"piece [{self.offset}, {self.offset + self.tensor.numel()}) lies outside parameter "
                             f"{self.parameter}'s {self.numel} values")


def whole(tensors: Iterable[torch.Tensor]) -> list[Piece]:
    """Each tensor as the whole of the parameter at its position (one process, or replicated ranks)."""
    return [Piece(t, i, t.numel()) for i, t in enumerate(tensors)]


class NoiseSource:
    """Draws the standard normal values of one step; see the module docstring."""

    secure: bool = False

    def fill_(self, pieces: Sequence[Piece], *, std: float, scale: float) -> None:
        """In place, for each piece's tensor t (contiguous): t <- scale * t + N(0, std^2) per value."""
        raise NotImplementedError


class CounterNoise(NoiseSource):
    """Keyed noise: block b of parameter i in step k is drawn from a twister state derived from (seed, k, i, b)."""

    def __init__(self, *, seed: int, step: int):
        for what, value in (("seed", seed), ("step", step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be a non-negative int, got {value!r}")
        self._entropy = [_DOMAIN_TAG, seed, step]

    def fill_(self, pieces, *, std, scale):
        tasks = []  # (piece, block, start of the piece's part within the block, its length, offset in the piece)
        for piece in pieces:
            lo, hi = piece.offset, piece.offset + piece.tensor.numel()
            for block in range(lo // BLOCK, math.ceil(hi / BLOCK)):
                a, b = max(lo, block * BLOCK), min(hi, (block + 1) * BLOCK)
                tasks.append((piece, block, a - block * BLOCK, b - a, a - lo))

        def draw(task):
            piece, block, start, length, at = task
            out = piece.tensor.view(-1)[at:at + length]
            # float64 sums (fp64 models) get float64 noise; everything else is drawn in float32
            draw_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
            # The whole block is drawn (its size depends only on the parameter), so every rank that holds a part
            # of it sees the same values: torch's normal_ output depends on the length drawn.
            scratch = _scratch(min(BLOCK, piece.numel - block * BLOCK), draw_dtype)
            scratch.normal_(0.0, std, generator=_keyed_generator(self._entropy + [piece.parameter, block]))
            noise = scratch[start:start + length]
            if out.device.type != "cpu" or out.dtype != draw_dtype:
                out.mul_(scale).add_(noise.to(device=out.device, dtype=out.dtype))
            else:  # one pass: out = scale * out + noise
                torch.add(noise, out, alpha=scale, out=out)

        if len(tasks) == 1 or torch.get_num_threads() == 1:
            for task in tasks:
                draw(task)
        else:  # torch releases the GIL in normal_ and add: blocks fill on several cores
            list(_pool().map(draw, tasks))


_local = threading.local()
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """One pool for the process, as wide as torch's intra-op threads (its threads keep their scratch buffers)."""
    global _POOL
    width = torch.get_num_threads()
    if _POOL is None or _POOL[0] != width:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = (width, ThreadPoolExecutor(width, thread_name_prefix="privtune-noise"))
    return _POOL[1]


def _scratch(length: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of BLOCK values, reused across steps (no allocation per tensor or per step)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    if dtype not in buffers:
        buffers[dtype] = torch.empty(BLOCK, dtype=dtype)
    return buffers[dtype][:length]


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

    def fill_(self, pieces, *, std, scale):
        for t in (piece.tensor for piece in pieces):
            z = self.standard_normal(t.shape, dtype=torch.float64, device=torch.device("cpu"))
            t.mul_(scale).add_((std * z).to(device=t.device, dtype=t.dtype))


def noise_source(*, seed: int | None, step: int, secure: bool) -> NoiseSource:
    """The noise source for one logical step (``secure=True`` ignores seed and step)."""
    if secure:
        return OsNoise()
    if seed is None:
        raise ValueError("a reproducible noise source needs a seed (or secure=True)")
    return CounterNoise(seed=seed, step=step)


# ----------------------------------------------------------------------------------------------------------------
# The mechanism


def _check(noise_multiplier: float, clip_norm: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")


def _check_batch(expected_batch_size: float) -> None:
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")


def privatize_(
    pieces: Sequence[Piece],
    *,
    noise_multiplier: float,  # privacy: sigma
    clip_norm: float,  # privacy: C, the per-unit sensitivity the sum was clipped to
    expected_batch_size: float,  # privacy: q * N, public (never the sampled count)
    generator: NoiseSource | None,  # None: this rank adds no noise to these pieces (another rank does), only scales
) -> None:
    """In place: each piece s <- (s + N(0, (sigma C)^2 I)) / (q N), in its dtype, the noise drawn in one pass.

    Computed as s / (qN) + N(0, (sigma C / qN)^2): the same distribution, with no temporary per tensor."""
    _check(noise_multiplier, clip_norm)
    _check_batch(expected_batch_size)
    for piece in pieces:
        if not piece.tensor.is_contiguous():
            raise ValueError("privatize_ needs contiguous tensors (the clipped sums are)")
    scale = 1.0 / expected_batch_size
    if generator is None or noise_multiplier == 0.0:
        for piece in pieces:
            piece.tensor.mul_(scale)
        return
    # privacy-critical: the Gaussian mechanism's std for sensitivity C, carried through the division by q N
    generator.fill_(pieces, std=noise_multiplier * clip_norm * scale, scale=scale)


def add_noise(
    clipped_sum: Mapping[str, torch.Tensor],
    *,
    noise_multiplier: float,  # privacy: sigma
    clip_norm: float,  # privacy: C
    generator: NoiseSource,
) -> dict[str, torch.Tensor]:
    """sum + N(0, (sigma * C)^2 I) as a new dict, in the sum's dtype (fp32 / fp64); the input is left untouched."""
    _check(noise_multiplier, clip_norm)
    noisy = {name: t.detach().clone(memory_format=torch.contiguous_format) for name, t in clipped_sum.items()}
    if noise_multiplier > 0:
        generator.fill_(whole(noisy.values()), std=noise_multiplier * clip_norm, scale=1.0)
    return noisy


def normalize(noisy_sum: Mapping[str, torch.Tensor], *, expected_batch_size: float) -> dict[str, torch.Tensor]:
    """Divide by the expected number of units per step, q * N (public), never by the sampled count."""
    _check_batch(expected_batch_size)
    return {name: t / expected_batch_size for name, t in noisy_sum.items()}
