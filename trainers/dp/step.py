"""One DP-SGD step, written once: micro-batches -> clipped sum -> reduce over ranks -> noise -> normalise -> .grad.

Owns: ``DPStep`` (the step every DP trainer runs: the recipe, the benchmarks, the sharded and TRL trainers of
later stages), ``Reduction`` (how the ranks' clipped sums become one release, and which rank adds the noise of
which coordinates) and ``ReplicatedReduction`` (every rank holds every parameter: one process, or data parallel
without sharding). A sharded engine brings its own ``Reduction`` (``trainers/parallel/``: reduce-scatter, then
each shard's owner adds the noise of the coordinates it holds) and leaves the rest of the step unchanged.

What is sensitive: the per-unit gradients and their clipped sum (functions of private examples) exist only
inside ``run`` until the noise is in; the sampled units and the noise key are secret. The invariant every
``Reduction`` keeps: each coordinate of the released sum gets noise of std sigma * C exactly once, summed over
all ranks. The keyed noise of a coordinate depends only on (key, step, parameter, coordinate) (``noise.py``), so
one process and any sharding over any number of ranks release the same update.

Profiler labels (``torch.profiler.record_function``), so benchmarks read the phases of the real step:
``dp.forward``, ``dp.backward`` (inside: ``dp.autograd`` activation gradients, ``dp.clip`` norms and clipped sums),
``dp.noise`` (noise, normalisation and the reduction over ranks), ``dp.set_grads``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.profiler import record_function

from .engine import DPEngine
from .noise import Piece, noise_source, privatize_, whole

Privatize = Callable[..., None]  # privatize(pieces: Sequence[Piece], *, noise: bool)


@dataclass(frozen=True)
class MicroBatchInputs:
    """One micro-batch as the step sees it: whose rows these are, and what the loss function takes."""

    unit_ids: torch.Tensor  # (rows,) privacy unit of each row; -1 marks a padding row
    inputs: Any  # passed to loss_fn unchanged
    sequence_length: int | None = None  # token width: the Linear rule checks (rows, sequence) leading dims


@dataclass(frozen=True)
class DPStepStats:
    """What one step did on this rank, for logging only (never divide by num_units: see noise.normalize)."""

    num_units: int
    unit_norms: torch.Tensor  # (num_units,) per-unit gradient norms before clipping
    clipped_fraction: float
    num_micro_batches: int


class Reduction(Protocol):
    """Combine the ranks' clipped sums into this rank's part of the released update.

    ``sums`` holds this rank's clipped sums, whole parameters in the engine's order (the order the noise is keyed
    by). ``combine`` must call ``privatize(pieces, noise=True)`` on ``Piece`` s that, over all ranks, hold every
    coordinate of the released sum exactly once (ranks holding identical replicas of a coordinate add identical
    noise: that is one draw), and ``privatize(pieces, noise=False)`` on whatever else it returns (scaled only).
    It returns what ``DPEngine.set_grads`` writes: per parameter name, a tensor in the parameter's own form."""

    def combine(self, sums: dict[str, torch.Tensor], *, privatize: Privatize) -> dict[str, torch.Tensor]: ...

    def write(self, engine: DPEngine, update: dict[str, torch.Tensor]) -> None:
        """Hand the update to the optimizer in the engine's own form (``.grad``, or a ZeRO partition)."""


class ReplicatedReduction:
    """Every rank holds every parameter: rank 0 adds the noise to its own sum, then one all-reduce.

    Adding it before the all-reduce (rather than after, then broadcasting) spends one collective per tensor
    instead of two; the released sum is the same: sum over ranks of the clipped sums, plus one draw of noise."""

    def __init__(self, *, rank: int = 0, world_size: int = 1):
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group")
        self.rank, self.world_size = rank, world_size

    def combine(self, sums, *, privatize):
        privatize(whole(sums.values()), noise=self.rank == 0)  # privacy-critical: one rank, one noise draw
        if self.world_size > 1:
            for tensor in sums.values():
                dist.all_reduce(tensor)
        return sums

    def write(self, engine, update):
        engine.set_grads(update, copy=False)  # the buffers are the step's own: no copy


class DPStep:
    """Runs one logical DP step and leaves the privatised update in the trainable parameters' ``.grad``."""

    def __init__(
        self,
        engine: DPEngine,
        *,
        noise_multiplier: float,  # privacy: sigma
        expected_batch_size: float,  # privacy: q * N, the public divisor
        randomness_key: int | None,  # privacy: the secret key of the noise (None only with secure_rng)
        secure_rng: bool = False,  # privacy: every noise value from the OS CSPRNG instead of the key
        reduction: Reduction | None = None,
    ):
        if randomness_key is None and not secure_rng:
            raise ValueError("a DP step needs a randomness key, or secure_rng=True")
        self.engine = engine
        self.noise_multiplier = noise_multiplier
        self.clip_norm = engine.clip_norm  # the sensitivity the engine clips to is the one the noise is for
        self.expected_batch_size = expected_batch_size
        self.randomness_key = randomness_key
        self.secure_rng = secure_rng
        self.reduction = reduction or ReplicatedReduction()

    def run(self, micro_batches: Iterable[MicroBatchInputs], loss_fn: Callable[[Any], torch.Tensor], *,
            step: int) -> DPStepStats:
        """``loss_fn(inputs)`` runs the forward and returns one loss per row (``per_example_loss``)."""
        engine = self.engine
        for micro in micro_batches:
            with engine.micro_batch(micro.unit_ids, sequence_length=micro.sequence_length):
                with record_function("dp.forward"):
                    losses = loss_fn(micro.inputs)
                with record_function("dp.backward"):
                    engine.backward(losses)
                del losses  # its graph's hooks would keep this micro-batch's captures through the next forward
        clipped = engine.pop_clipped_sum()

        def privatize(pieces: list[Piece], *, noise: bool) -> None:
            source = noise_source(seed=self.randomness_key, step=step, secure=self.secure_rng) if noise else None
            privatize_(pieces, noise_multiplier=self.noise_multiplier, clip_norm=self.clip_norm,
                       expected_batch_size=self.expected_batch_size, generator=source)

        with record_function("dp.noise"):
            update = self.reduction.combine(clipped.grads, privatize=privatize)
        with record_function("dp.set_grads"):
            self.reduction.write(engine, update)
        return DPStepStats(num_units=clipped.num_units, unit_norms=clipped.unit_norms,
                           clipped_fraction=clipped.clipped_fraction, num_micro_batches=clipped.num_micro_batches)
