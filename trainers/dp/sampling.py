"""Poisson sampling of logical batches, split into fixed-shape micro-batches.

Owns: ``PoissonBatchSampler`` and the ``LogicalBatch`` / ``MicroBatch`` it yields.

Privacy unit: a unit is one row by default, or a list of rows (``unit_rows``: all rows of one user / group).
Each step includes every unit independently with probability q (``sample_rate``) — the sampling the accountant
assumes for amplification; a shuffled fixed-size batch is a different mechanism and is never produced here.

Fixed shapes: the sampled units are packed into micro-batches of exactly ``micro_batch_size`` rows (a unit's rows
always stay together: a unit larger than a micro-batch is refused), padded with rows whose index and unit id are
-1. Consumers collate ``MicroBatch.without_padding()``: the padding fixes the shape, not the work. A step with no sampled unit still yields one all-padding micro-batch per rank, so the training loop runs
the same code path and the optimizer still steps with noise only. Under data parallelism every rank computes
the same global sample (same seed), the micro-batches are dealt round-robin and padded with all-padding
micro-batches to a multiple of the world size: every rank takes the same number of micro-batches with no
communication.

Randomness: step k's sample is drawn by PCG64DXSM seeded through ``numpy.random.SeedSequence`` from
(seed, k), independent of the steps before it, so resuming at step k reproduces steps >= k exactly. The
sample must stay secret for the amplification to hold: the training recipe seeds it with a 128-bit key from the
OS CSPRNG (``secret_seed()``), kept only inside the run directory's checkpoints and never logged (the public
config seed only under ``privacy.reproducible``, which the plan, ledger and card then call "not a release").
PCG64DXSM is a statistical generator, not a cryptographic one; the secrecy rests on the 128-bit seed.

Sensitive: which units are in a batch (inclusion is what the DP guarantee hides).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DPRefusal

_DOMAIN_TAG = 0x706F6973736F6E  # "poisson": keeps these seeds apart from the noise's


def secret_seed() -> int:
    """A 128-bit seed from the OS CSPRNG, for runs whose batches must stay secret."""
    return secrets.randbits(128)


@dataclass(frozen=True)
class MicroBatch:
    rows: torch.Tensor  # (micro_batch_size,) dataset row indices, -1 for padding rows
    unit_ids: torch.Tensor  # (micro_batch_size,) unit index of each row, -1 for padding rows

    @property
    def num_real_rows(self) -> int:
        return int((self.rows >= 0).sum())

    def without_padding(self) -> MicroBatch:
        """The real rows only, or a single padding row when there are none.

        Padding rows add nothing to the clipped sum, but once collated each costs a full row of compute at the
        micro-batch's width: with an expected batch near ``micro_batch_size`` they would be a large share of a DP
        step's work (measured in docs/performance-notes.md). The micro-batch *count* (what data parallelism needs
        equal) is unchanged.
        """
        real = self.rows >= 0
        keep = real if bool(real.any()) else torch.arange(len(self.rows)) == 0
        return MicroBatch(rows=self.rows[keep], unit_ids=self.unit_ids[keep])


@dataclass(frozen=True)
class LogicalBatch:
    step: int
    units: torch.Tensor  # all units sampled at this step (every rank sees the same), in packing order
    micro_batches: tuple[MicroBatch, ...]  # this rank's share; the same count on every rank

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)


class PoissonBatchSampler:
    """Per step: each unit in with probability q; packed into equal micro-batches; reproducible per step."""

    def __init__(
        self,
        num_units: int,
        *,
        sample_rate: float,  # privacy: q, the per-unit inclusion probability the accountant uses
        steps: int,  # privacy: T, the number of logical steps (= optimizer steps = accountant steps)
        seed: int,  # privacy: keep secret for real releases (see secret_seed)
        micro_batch_size: int,
        unit_rows: Sequence[Sequence[int]] | None = None,
        world_size: int = 1,
        rank: int = 0,
    ):
        if not isinstance(num_units, int) or num_units < 1:
            raise DPRefusal(f"the sampler needs at least one unit, got {num_units!r}", "check the training data")
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise DPRefusal(f"sample_rate must be in (0, 1], got {sample_rate!r}", "set train.batch_size (q = batch size / units)")
        if not isinstance(steps, int) or steps < 0:
            raise DPRefusal(f"steps must be an int >= 0, got {steps!r}", "set the number of training steps")
        if not isinstance(seed, int) or seed < 0:
            raise DPRefusal(f"seed must be an int >= 0, got {seed!r}", "set a seed")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise DPRefusal(f"micro_batch_size must be an int >= 1, got {micro_batch_size!r}",
                            "set performance.micro_batch_size")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise DPRefusal(f"rank {rank!r} is not within world size {world_size!r}", "check the launcher")
        self.num_units = num_units
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.world_size, self.rank = world_size, rank
        self._unit_rows = self._check_units(unit_rows)

    def _check_units(self, unit_rows) -> list[list[int]] | None:
        if unit_rows is None:
            return None
        rows = [list(map(int, r)) for r in unit_rows]
        if len(rows) != self.num_units:
            raise DPRefusal(f"unit_rows lists {len(rows)} units but num_units is {self.num_units}",
                            "pass one row list per unit")
        seen: set[int] = set()
        for u, r in enumerate(rows):
            if not r:
                raise DPRefusal(f"unit {u} has no rows", "drop empty units before sampling")
            if len(r) > self.micro_batch_size:
                raise DPRefusal(
                    f"unit {u} has {len(r)} rows, more than micro_batch_size={self.micro_batch_size}; a unit's rows "
                    "must fit in one micro-batch",
                    "raise micro_batch_size or cap the rows per unit (group_by)",
                )
            if min(r) < 0 or seen.intersection(r) or len(set(r)) != len(r):
                raise DPRefusal(f"unit {u} repeats a row or shares one with another unit, or has a negative row",
                                "every row must belong to exactly one unit")
            seen.update(r)
        return rows

    # ------------------------------------------------------------------------------------------------------
    @property
    def expected_batch_size(self) -> float:
        """q * N units: the public normaliser of the noisy sum."""
        return self.sample_rate * self.num_units

    def __len__(self) -> int:
        return self.steps

    def sample_units(self, step: int) -> torch.Tensor:
        """The units included at ``step`` (independent Bernoulli(q) draws), in a random packing order."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([_DOMAIN_TAG, self.seed, step])))
        included = np.flatnonzero(rng.random(self.num_units) < self.sample_rate)
        return torch.from_numpy(rng.permutation(included).astype(np.int64))

    def _rows_of(self, unit: int) -> list[int]:
        return [unit] if self._unit_rows is None else self._unit_rows[unit]

    def batch(self, step: int) -> LogicalBatch:
        units = self.sample_units(step)
        m = self.micro_batch_size
        packed: list[tuple[list[int], list[int]]] = []
        rows: list[int] = []
        ids: list[int] = []
        for u in units.tolist():  # next-fit packing; a unit never spans two micro-batches
            r = self._rows_of(u)
            if len(rows) + len(r) > m:
                packed.append((rows, ids))
                rows, ids = [], []
            rows.extend(r)
            ids.extend([u] * len(r))
        if rows:
            packed.append((rows, ids))
        per_rank = max(1, math.ceil(len(packed) / self.world_size))
        packed.extend([([], [])] * (per_rank * self.world_size - len(packed)))
        mine = packed[self.rank::self.world_size]
        micro = tuple(
            MicroBatch(
                rows=torch.tensor(r + [-1] * (m - len(r)), dtype=torch.long),
                unit_ids=torch.tensor(i + [-1] * (m - len(i)), dtype=torch.long),
            )
            for r, i in mine
        )
        return LogicalBatch(step=step, units=units, micro_batches=micro)

    def batches(self, start_step: int = 0) -> Iterator[LogicalBatch]:
        """Steps start_step, ..., steps - 1 (resume at k reproduces exactly what a full run does at >= k)."""
        for step in range(start_step, self.steps):
            yield self.batch(step)

    def __iter__(self) -> Iterator[LogicalBatch]:
        return self.batches(0)
