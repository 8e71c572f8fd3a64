"""Accountants: turn a list of privacy events into (ε, δ).

Owns: the ``Accountant`` interface and its two implementations, both thin wrappers over Google's dp_accounting:

- ``PLDAccountant`` (default): privacy loss distributions with *pessimistic* (connect-the-dots) discretization,
  so the ε it returns is an upper bound on the true ε of the composed mechanism. The grid step is chosen from the
  events (``auto_discretization``); ``report`` also recomputes on a 2× finer grid to show how much of the bound is
  rounding slack.
- ``RDPAccountant`` (cross-check): Rényi DP over a fixed list of orders, converted with the improved bound of
  Balle et al. (2020). Always an upper bound, usually looser than PLD.

Neighbouring relation: add/remove one privacy unit (``NEIGHBOURING = "add_remove"``), for every event.

Sensitive: which events are accepted. Poisson-subsampled Gaussian steps and Gaussian releases are accounted;
``ShuffledGaussianEvent`` is refused (no verified accountant for shuffled fixed-size batches here) and any
``NonPrivateEvent`` makes ε/δ queries raise ``NoGuaranteeError``. Nothing here is process-global: every instance
builds its own dp_accounting objects.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_mechanism
from dp_accounting.rdp import rdp_privacy_accountant

from privtune.accounting.events import (
    Event,
    GaussianEvent,
    NonPrivateEvent,
    PoissonGaussianEvent,
    ShuffledGaussianEvent,
    event_from_dict,
)
from privtune.errors import UserError

__all__ = [
    "ACCOUNTANTS",
    "NEIGHBOURING",
    "RDP_ORDERS",
    "Accountant",
    "NoGuaranteeError",
    "PLDAccountant",
    "RDPAccountant",
    "auto_discretization",
    "check_delta",
    "make_accountant",
]

NEIGHBOURING = "add_remove"
_NEIGHBOR_REL = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

# PLD grid: the coarsest step ever used (on Paper B's run, T=439, the result at 2e-3 exceeds the 1e-4 grid's by
# 0.01-0.04 %, at a fraction of its cost) and the most points a single event's PLD may have (bounds its build
# time); see ``auto_discretization``; timings in docs/performance-notes.md.
DEFAULT_VALUE_DISCRETIZATION = 2e-3
_MAX_GRID_POINTS = 40_000

# RDP orders: dp_accounting's defaults (1.1…11 in steps of 0.1, 11…63, 128, 256, 512, 1024) with the gaps above
# 64 filled in. Orders beyond 1024 only matter for ε ≲ 0.05 and would slow every evaluation
# (docs/performance-notes.md).
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1.0 + x / 10.0 for x in range(1, 101)}
        | {float(a) for a in range(11, 65)}
        | {80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0}
    )
)

SHUFFLE_REFUSAL = (
    "fixed-size shuffled batches have no verified accountant here",
    "use sampler poisson (see docs/privacy-ledger.md, 'Sampler rule')",
)


class NoGuaranteeError(UserError):
    """The events include a non-private release, so no (ε, δ) can be stated."""


def check_delta(delta: Any) -> float:
    """δ must be a number in (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < float(delta) < 1.0:
        raise UserError(f"delta={delta!r} is outside (0, 1)", "use a δ well below 1/N, e.g. 1e-6")
    return float(delta)


def _check_epsilon(epsilon: Any) -> float:
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon)
        or epsilon < 0
    ):
        raise UserError(f"epsilon={epsilon!r} is not a finite number >= 0", "pass ε >= 0")
    return float(epsilon)


def _merge_key(event: Event) -> tuple[Any, ...] | None:
    """Events with the same key compose by adding their step/count; None = never merged."""
    if isinstance(event, PoissonGaussianEvent):
        return (event.type, event.sample_rate, event.noise_multiplier, event.randomness)
    if isinstance(event, GaussianEvent):
        return (event.type, event.noise_multiplier, event.sensitivity)
    return None


def _merged(last: Event, event: Event) -> Event | None:
    key = _merge_key(event)
    if key is None or key != _merge_key(last):
        return None
    if isinstance(event, PoissonGaussianEvent) and isinstance(last, PoissonGaussianEvent):
        return replace(last, steps=last.steps + event.steps)
    if isinstance(event, GaussianEvent) and isinstance(last, GaussianEvent):
        return replace(last, count=last.count + event.count)
    return None


def _to_dp_event(event: Event) -> dp_accounting.DpEvent:
    """The dp_accounting event for one of ours. The only place where our events meet the library's."""
    if isinstance(event, PoissonGaussianEvent):
        step = dp_accounting.PoissonSampledDpEvent(
            sampling_probability=event.sample_rate,  # privacy-critical: Poisson rate q
            event=dp_accounting.GaussianDpEvent(noise_multiplier=event.noise_multiplier),  # σ per unit
        )
        return dp_accounting.SelfComposedDpEvent(event=step, count=event.steps)
    if isinstance(event, GaussianEvent):
        return dp_accounting.SelfComposedDpEvent(
            event=dp_accounting.GaussianDpEvent(noise_multiplier=event.noise_multiplier),  # std / sensitivity
            count=event.count,
        )
    if isinstance(event, ShuffledGaussianEvent):
        raise UserError(*SHUFFLE_REFUSAL)
    raise UserError(f"event type {event.type!r} has no accountant", "record a supported event")


class Accountant(ABC):
    """Records events and answers ε(δ) / δ(ε) for their composition under add/remove adjacency.

    ``record`` refuses events that cannot be accounted (shuffled batches) at once, so a training run learns before
    its first step. Consecutive events with the same parameters are merged (``steps`` / ``count`` add up), so one
    ``record`` per optimizer step keeps ``events`` and ``state_dict`` small.
    """

    name: ClassVar[str] = ""
    neighbouring: ClassVar[str] = NEIGHBOURING

    def __init__(self) -> None:
        self._events: list[Event] = []

    @property
    def events(self) -> list[Event]:
        """The recorded events (a copy), consecutive identical ones merged."""
        return list(self._events)

    @property
    def has_guarantee(self) -> bool:
        """False as soon as a ``NonPrivateEvent`` was recorded."""
        return not any(isinstance(e, NonPrivateEvent) for e in self._events)

    def record(self, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"record() takes an Event, got {type(event).__name__}")
        if isinstance(event, ShuffledGaussianEvent):
            raise UserError(*SHUFFLE_REFUSAL)
        if self._events:
            merged = _merged(self._events[-1], event)
            if merged is not None:
                self._events[-1] = merged
                return
        self._events.append(event)

    def extend(self, events: Iterable[Event]) -> None:
        for event in events:
            self.record(event)

    def _require_guarantee(self) -> None:
        if not self.has_guarantee:
            reasons = "; ".join(e.reason for e in self._events if isinstance(e, NonPrivateEvent))
            raise NoGuaranteeError(
                f"no formal guarantee: the events include a non-private release ({reasons})",
                "state no ε for these data, or rerun the release with noise",
            )

    def epsilon(self, delta: float) -> float:
        """Smallest ε this accountant can certify at ``delta`` (an upper bound on the true ε)."""
        delta = check_delta(delta)
        self._require_guarantee()
        if not self._events:
            return 0.0
        epsilon = float(self._epsilon(delta))
        if not math.isfinite(epsilon):
            raise UserError(
                f"{self.name} accountant finds no finite ε at δ={delta:g}",
                "increase δ or the noise multiplier",
            )
        return epsilon

    def delta(self, epsilon: float) -> float:
        """Smallest δ this accountant can certify at ``epsilon``."""
        epsilon = _check_epsilon(epsilon)
        self._require_guarantee()
        if not self._events:
            return 0.0
        return min(1.0, float(self._delta(epsilon)))

    def report(self, delta: float) -> dict[str, Any]:
        """ε at ``delta`` plus what is known about its error (JSON-ready)."""
        epsilon = self.epsilon(delta)
        if not self._events:
            return {
                "accountant": self.name,
                "epsilon": 0.0,
                "delta": float(delta),
                "bound": "exact (no releases)",
            }
        return {
            "accountant": self.name,
            "epsilon": epsilon,
            "delta": float(delta),
            **self._error(delta, epsilon),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this accountant; stored in every checkpoint."""
        return {
            "accountant": self.name,
            "neighbouring": self.neighbouring,
            "config": self.config(),
            "events": [e.to_dict() for e in self._events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the recorded events by those of ``state``; its accountant and settings must match this one."""
        if not isinstance(state, dict) or not isinstance(state.get("events"), list):
            raise UserError(
                "accountant state is not a dict with an 'events' list", "pass Accountant.state_dict()"
            )
        if state.get("accountant") != self.name or state.get("neighbouring") != self.neighbouring:
            raise UserError(
                f"accountant state is for {state.get('accountant')!r}/{state.get('neighbouring')!r}, "
                f"not {self.name!r}/{self.neighbouring!r}",
                "load it into the accountant that saved it",
            )
        if state.get("config") != self.config():
            raise UserError(
                f"accountant state was saved with settings {state.get('config')}, this one has {self.config()}",
                "build the accountant with the saved settings",
            )
        events = [event_from_dict(e) for e in state["events"]]
        self._events = []
        self.extend(events)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The settings that change the numbers (JSON-ready)."""

    @abstractmethod
    def _epsilon(self, delta: float) -> float: ...

    @abstractmethod
    def _delta(self, epsilon: float) -> float: ...

    @abstractmethod
    def _error(self, delta: float, epsilon: float) -> dict[str, Any]: ...


def _loss_scale_and_range(event: Event) -> tuple[float, float]:
    """(spread of one step's privacy loss, width of its discretized support) for the grid choice below."""
    if isinstance(event, PoissonGaussianEvent):
        sigma, q = event.noise_multiplier, event.sample_rate
        # Std of one step's privacy loss: 1/σ for the plain Gaussian, ≈ q·sqrt(e^{1/σ²} − 1) once subsampled.
        scale = 1.0 / sigma if q >= 1.0 else q * math.sqrt(math.expm1(min(1.0 / sigma**2, 700.0)))
    elif isinstance(event, GaussianEvent):
        sigma, q, scale = event.noise_multiplier, 1.0, 1.0 / event.noise_multiplier
    elif isinstance(event, ShuffledGaussianEvent):
        raise UserError(*SHUFFLE_REFUSAL)
    else:
        raise TypeError(f"no privacy loss for {type(event).__name__}")
    width = 0.0
    for adjacency in (privacy_loss_mechanism.AdjacencyType.REMOVE, privacy_loss_mechanism.AdjacencyType.ADD):
        bounds = privacy_loss_mechanism.GaussianPrivacyLoss(
            sigma, sampling_prob=q, adjacency_type=adjacency
        ).connect_dots_bounds()
        width = max(width, float(bounds.epsilon_upper) - float(bounds.epsilon_lower))
    return scale, width


def auto_discretization(events: Sequence[Event]) -> float:
    """The PLD grid step for ``events``: fine enough to keep the rounding slack under ~0.5 % of ε, coarse enough
    to keep each single-event PLD under ``_MAX_GRID_POINTS`` points.

    The pessimistic slack of connect-the-dots grows like (grid / loss spread)²: measured ≈ 0.1·(grid/spread)²
    relative to ε, independent of T. So the grid is 0.2 × the smallest per-step loss spread (≈0.4 % slack), at most
    2e-3 (Paper B's q = 0.023: 0.01-0.04 % slack); when that would need more than ``_MAX_GRID_POINTS`` points
    (tiny q with small σ) the grid is coarsened: still an upper bound, with more slack, which ``report`` shows.
    """
    pairs = [_loss_scale_and_range(e) for e in events if not isinstance(e, NonPrivateEvent)]
    if not pairs:
        return DEFAULT_VALUE_DISCRETIZATION
    scales, widths = [p[0] for p in pairs], [p[1] for p in pairs]
    grid = min(DEFAULT_VALUE_DISCRETIZATION, 0.2 * min(scales))
    return max(grid, max(widths) / _MAX_GRID_POINTS, 1e-7)


class PLDAccountant(Accountant):
    """Privacy-loss-distribution accountant (dp_accounting ``PLDAccountant``), pessimistic rounding.

    ``value_discretization_interval`` is the grid step of the privacy loss: ``None`` (default) picks it from the
    events with ``auto_discretization``; a number fixes it. Smaller is tighter and slower (time ~ 1/step).
    Whatever the grid, the returned ε is an upper bound: connect-the-dots rounding builds a PLD that dominates the
    true one, and truncated tail mass (≤ 1e-15 per composition) is counted as infinite privacy loss.
    """

    name: ClassVar[str] = "pld"

    def __init__(self, *, value_discretization_interval: float | None = None) -> None:
        super().__init__()
        vdi = value_discretization_interval
        if vdi is not None and (
            isinstance(vdi, bool) or not isinstance(vdi, (int, float)) or not 1e-7 <= vdi <= 0.1
        ):
            raise UserError(
                f"value_discretization_interval={vdi!r} is outside [1e-7, 0.1]", "leave it unset (automatic)"
            )
        self._vdi = None if vdi is None else float(vdi)
        self._cache: dict[tuple[tuple[Event, ...], float], pld_privacy_accountant.PLDAccountant] = {}

    def config(self) -> dict[str, Any]:
        return {"value_discretization_interval": "auto" if self._vdi is None else self._vdi}

    def discretization(self) -> float:
        """The grid step used for the events recorded so far."""
        if self._vdi is not None:
            return self._vdi
        return auto_discretization(self._events) if self._events else DEFAULT_VALUE_DISCRETIZATION

    def _composed(self, vdi: float) -> pld_privacy_accountant.PLDAccountant:
        key = (tuple(self._events), vdi)
        if key not in self._cache:
            accountant = pld_privacy_accountant.PLDAccountant(
                neighboring_relation=_NEIGHBOR_REL, value_discretization_interval=vdi
            )
            for event in self._events:
                accountant.compose(_to_dp_event(event))
            self._cache = {key: accountant}  # keep only the latest composition
        return self._cache[key]

    def _epsilon(self, delta: float) -> float:
        return self._composed(self.discretization()).get_epsilon(delta)

    def _delta(self, epsilon: float) -> float:
        return self._composed(self.discretization()).get_delta(epsilon)

    def _error(self, delta: float, epsilon: float) -> dict[str, Any]:
        vdi = self.discretization()
        finer = PLDAccountant(value_discretization_interval=max(vdi / 2.0, 1e-7))
        finer._events = list(self._events)
        tighter = float(finer._epsilon(delta))
        return {
            "bound": "upper",
            "value_discretization_interval": vdi,
            "finer_value_discretization_interval": finer.discretization(),
            "finer_epsilon": tighter,
            # Both are upper bounds; their difference shows how much of ε is grid rounding, not privacy loss.
            "discretization_slack": max(0.0, epsilon - tighter),
        }


class RDPAccountant(Accountant):
    """Rényi-DP accountant (dp_accounting ``RdpAccountant``) over ``orders`` (default ``RDP_ORDERS``).

    For fractional orders dp_accounting sums the absolute values of the binomial series, a slightly larger (still
    valid) bound than Opacus's signed sum; on integer orders the two agree to rounding.
    """

    name: ClassVar[str] = "rdp"

    def __init__(self, *, orders: Sequence[float] = RDP_ORDERS) -> None:
        super().__init__()
        orders = tuple(orders)
        if not orders or any(
            isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 1.0
            for a in orders
        ):
            raise UserError(
                "RDP orders must be a non-empty list of finite numbers > 1", "use the default orders"
            )
        self._orders = tuple(sorted(float(a) for a in orders))

    def config(self) -> dict[str, Any]:
        return {"orders": list(self._orders)}

    def _composed(self) -> rdp_privacy_accountant.RdpAccountant:
        accountant = rdp_privacy_accountant.RdpAccountant(
            orders=list(self._orders), neighboring_relation=_NEIGHBOR_REL
        )
        for event in self._events:
            accountant.compose(_to_dp_event(event))
        return accountant

    def _epsilon(self, delta: float) -> float:
        return self._composed().get_epsilon(delta)

    def _delta(self, epsilon: float) -> float:
        return self._composed().get_delta(epsilon)

    def _error(self, delta: float, epsilon: float) -> dict[str, Any]:
        _, order = self._composed().get_epsilon_and_optimal_order(delta)
        order = float(order)
        return {
            "bound": "upper",
            "optimal_order": order,
            # At the end of the order list a wider list could give a smaller (still valid) ε.
            "order_at_edge": order in (self._orders[0], self._orders[-1]),
        }


ACCOUNTANTS: dict[str, type[Accountant]] = {"pld": PLDAccountant, "rdp": RDPAccountant}


def make_accountant(name: str) -> Accountant:
    """A fresh accountant with default settings: ``"pld"`` (default everywhere) or ``"rdp"``."""
    cls = ACCOUNTANTS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UserError(f"unknown accountant {name!r}", f"use one of {sorted(ACCOUNTANTS)}")
    return cls()
