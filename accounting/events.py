"""Privacy events: what a DP release did, in the terms an accountant needs.

Owns: the frozen event records that go into the ledger and the accountants, their validation and their JSON
form (``to_dict`` / ``event_from_dict``, tagged by a ``"type"`` key).

Privacy unit: the ledger's (one example by default, or one user/group); every event's parameters are stated for
that unit under add/remove-one adjacency.

Sensitive: every field of every event determines the guarantee. A wrong field is a wrong ε, so constructors refuse
anything that is not a finite, in-range number of the right kind (``bool`` is not an ``int``, a string is not a
float). Events that no accountant here can verify (``ShuffledGaussianEvent``) or that carry no guarantee at all
(``NonPrivateEvent``) can be *recorded* so that the ledger says what ran, but they are never turned into an ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from privtune.errors import UserError

__all__ = [
    "Event",
    "GaussianEvent",
    "NonPrivateEvent",
    "PoissonGaussianEvent",
    "ShuffledGaussianEvent",
    "event_from_dict",
]


RANDOMNESS = ("secret", "reproducible")


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}", f"pass {name} as a float")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be finite, got {value}", f"pass a finite {name}")
    return value


def _check_positive(name: str, value: Any) -> float:
    value = _check_real(name, value)
    if value <= 0.0:
        raise UserError(f"{name} must be > 0, got {value}", f"pass a positive {name}")
    return value


def _check_count(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # 439.0 from a YAML file is fine, 439.5 is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"{name} must be an integer, got {value!r}", f"pass a whole number of {name}")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}", f"pass {name} >= {minimum}")
    return value


def _check_sample_rate(value: Any) -> float:
    value = _check_real("sample_rate", value)
    if not 0.0 < value <= 1.0:
        raise UserError(
            f"sample_rate q={value} is outside (0, 1]", "use q = expected batch size / dataset size"
        )
    return value


def _check_noise(value: Any) -> float:
    value = _check_real("noise_multiplier", value)
    if value <= 0.0:
        raise UserError(
            f"noise_multiplier σ={value} gives no DP guarantee",
            "use σ > 0 (a debug run without noise is recorded as a NonPrivateEvent)",
        )
    return value


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base class of all events. ``type`` tags the JSON form; ``sampler`` names the sampling that actually ran."""

    type: ClassVar[str] = ""  # JSON tag; every subclass also defines ``sampler`` (what sampling ran)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a ``"type"`` key; ``event_from_dict`` inverts it exactly."""
        out: dict[str, Any] = {"type": self.type}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Inverse of ``to_dict`` without the ``"type"`` key; missing or unknown keys are a ``UserError``."""
        return cls(**cls._kwargs(data))

    @classmethod
    def _kwargs(cls, data: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in data)
        unknown = sorted(k for k in data if k not in names)
        if missing or unknown:
            raise UserError(
                f"{cls.type} event has missing keys {missing} / unknown keys {unknown}",
                "restore the ledger from a good copy; never edit it by hand",
            )
        return {n: data[n] for n in names}


@dataclass(frozen=True, kw_only=True)
class PoissonGaussianEvent(Event):
    """``steps`` DP-SGD steps: each example joins each batch independently with probability ``sample_rate``
    (Poisson sampling), the clipped sum gets Gaussian noise of std ``noise_multiplier`` × clip norm.

    ``sampler`` must say what actually ran and may only be ``"poisson"``: fixed-size or shuffled batches are a
    different mechanism (record a ``ShuffledGaussianEvent``), never accounted with the Poisson bound.
    """

    type: ClassVar[str] = "poisson_gaussian"

    sample_rate: float
    noise_multiplier: float
    steps: int
    sampler: str = "poisson"
    # "secret": the sample and the noise came from a secret key; "reproducible": from a public seed, so the
    # accountant's bound does not hold for anyone who has the seed (privtune budget refuses it by default).
    randomness: str = "secret"

    def __post_init__(self) -> None:
        if self.randomness not in RANDOMNESS:
            raise UserError(f"a PoissonGaussianEvent was built with randomness {self.randomness!r}",
                            f"use one of {', '.join(RANDOMNESS)}")
        if self.sampler != "poisson":
            raise UserError(
                f"a PoissonGaussianEvent was built for sampler {self.sampler!r}",
                "only Poisson sampling is accounted as Poisson; record a ShuffledGaussianEvent for shuffled batches",
            )
        object.__setattr__(self, "sample_rate", _check_sample_rate(self.sample_rate))  # privacy-critical: q
        object.__setattr__(
            self, "noise_multiplier", _check_noise(self.noise_multiplier)
        )  # privacy-critical: σ
        object.__setattr__(self, "steps", _check_count("steps", self.steps))  # privacy-critical: T


@dataclass(frozen=True, kw_only=True)
class GaussianEvent(Event):
    """``count`` releases of a function of L2 sensitivity ``sensitivity`` (add/remove one unit) plus Gaussian noise.

    Stored normalised: ``noise_multiplier`` = noise std / sensitivity, which is all the guarantee depends on; the
    absolute ``std`` is kept for the reader. Build it from what the code did with ``GaussianEvent.from_std`` —
    Paper B's histogram over clusters is ``GaussianEvent.from_std(std=10.0, sensitivity=1.0)`` (each example counts
    in exactly one cluster). The sensitivity is the caller's claim: with user-level units, a user contributing to
    k clusters has sensitivity √k (or k for a count per user), not 1.
    """

    type: ClassVar[str] = "gaussian"
    sampler: ClassVar[str] = "full_dataset"

    noise_multiplier: float
    sensitivity: float = 1.0
    count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", _check_noise(self.noise_multiplier)
        )  # privacy-critical: σ
        object.__setattr__(self, "sensitivity", _check_positive("sensitivity", self.sensitivity))
        object.__setattr__(self, "count", _check_count("count", self.count))

    @classmethod
    def from_std(cls, *, std: float, sensitivity: float, count: int = 1) -> GaussianEvent:
        """The event for noise of absolute standard deviation ``std`` on a function of L2 ``sensitivity``."""
        std = _check_real("std", std)
        if std <= 0.0:
            raise UserError(f"Gaussian noise std={std} gives no DP guarantee", "use std > 0")
        sensitivity = _check_positive("sensitivity", sensitivity)
        return cls(noise_multiplier=std / sensitivity, sensitivity=sensitivity, count=count)

    @property
    def std(self) -> float:
        """Absolute noise standard deviation (``noise_multiplier`` × ``sensitivity``)."""
        return self.noise_multiplier * self.sensitivity

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["std"] = self.std  # for the reader; checked for consistency on load
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GaussianEvent:
        data = dict(data)
        std = data.pop("std", None)
        event = cls(**cls._kwargs(data))
        if std is not None and not math.isclose(_check_real("std", std), event.std, rel_tol=1e-9):
            raise UserError(
                f"gaussian event has std={std} but noise_multiplier × sensitivity = {event.std}",
                "the ledger is corrupted; restore it from a good copy",
            )
        return event


@dataclass(frozen=True, kw_only=True)
class ShuffledGaussianEvent(Event):
    """DP-SGD over fixed-size batches of ``batch_size`` taken from a shuffled dataset of ``dataset_size`` units.

    Recorded so that the ledger says what ran; **no accountant here accepts it**. Shuffled epochs are not Poisson
    sampling (each unit is in exactly one batch per epoch), and dp_accounting has no tight accountant for them; its
    one fixed-size bound (sampling without replacement, RDP only) is for replace-one adjacency and independent
    batches, neither of which holds here. See docs/privacy-ledger.md, "Sampler rule".
    """

    type: ClassVar[str] = "shuffled_gaussian"
    sampler: ClassVar[str] = "shuffle"

    batch_size: int
    dataset_size: int
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", _check_count("batch_size", self.batch_size))
        object.__setattr__(self, "dataset_size", _check_count("dataset_size", self.dataset_size))
        if self.batch_size > self.dataset_size:
            raise UserError(
                f"batch_size {self.batch_size} exceeds dataset_size {self.dataset_size}",
                "use a batch no larger than the dataset",
            )
        object.__setattr__(self, "noise_multiplier", _check_noise(self.noise_multiplier))
        object.__setattr__(self, "steps", _check_count("steps", self.steps))


@dataclass(frozen=True, kw_only=True)
class NonPrivateEvent(Event):
    """Something touched the private data without a DP guarantee (a σ = 0 debug run, a non-private baseline).

    Recording it is honest bookkeeping; any composition that includes it refuses to state an ε.
    """

    type: ClassVar[str] = "non_private"
    sampler: ClassVar[str] = "n/a"

    reason: str
    steps: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip() or "\n" in self.reason:
            raise UserError("a NonPrivateEvent needs a one-line reason", "say what ran without noise")
        if self.steps is not None:
            object.__setattr__(self, "steps", _check_count("steps", self.steps))


_EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls for cls in (PoissonGaussianEvent, GaussianEvent, ShuffledGaussianEvent, NonPrivateEvent)
}


def event_from_dict(data: Any) -> Event:
    """Rebuild an event from ``Event.to_dict()`` output; anything malformed is a ``UserError``."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise UserError(
            "an event is not a JSON object with a 'type' key", "restore the ledger from a good copy"
        )
    body = {k: v for k, v in data.items() if k != "type"}
    cls = _EVENT_TYPES.get(data["type"])
    if cls is None:
        raise UserError(
            f"unknown event type {data['type']!r}",
            f"known types are {sorted(_EVENT_TYPES)}; upgrade privtune or restore the ledger",
        )
    return cls.from_dict(body)
