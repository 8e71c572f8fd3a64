"""Events: validation on construction (every bad parameter is a one-line UserError) and exact JSON round trips."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.accounting import (
    GaussianEvent,
    NonPrivateEvent,
    PoissonGaussianEvent,
    ShuffledGaussianEvent,
    event_from_dict,
)
from privtune.errors import UserError


def _roundtrip(event):
    """Through real JSON text, as the ledger stores it."""
    return event_from_dict(json.loads(json.dumps(event.to_dict())))


@settings(max_examples=60, deadline=None)
@given(
    q=st.floats(min_value=1e-9, max_value=1.0, exclude_min=False),
    sigma=st.floats(min_value=1e-6, max_value=1e6),
    steps=st.integers(min_value=1, max_value=10**9),
)
def test_poisson_event_roundtrip(q, sigma, steps):
    event = PoissonGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=steps)
    assert _roundtrip(event) == event
    assert event.to_dict()["type"] == "poisson_gaussian"
    assert event.sampler == "poisson"


@settings(max_examples=40, deadline=None)
@given(
    std=st.floats(min_value=1e-3, max_value=1e4),
    sensitivity=st.floats(min_value=1e-3, max_value=1e3),
    count=st.integers(min_value=1, max_value=1000),
)
def test_gaussian_event_roundtrip_and_normalisation(std, sensitivity, count):
    event = GaussianEvent.from_std(std=std, sensitivity=sensitivity, count=count)
    assert math.isclose(event.noise_multiplier, std / sensitivity)
    assert math.isclose(event.std, std)
    assert _roundtrip(event) == event
    assert event.sampler == "full_dataset"


def test_paper_b_histogram_event():
    event = GaussianEvent.from_std(std=10.0, sensitivity=1.0)
    assert event.noise_multiplier == 10.0 and event.count == 1
    assert event.to_dict() == {
        "type": "gaussian",
        "noise_multiplier": 10.0,
        "sensitivity": 1.0,
        "count": 1,
        "std": 10.0,
    }
    # Doubling the sensitivity halves the noise multiplier: the guarantee depends on std / sensitivity only.
    assert GaussianEvent.from_std(std=10.0, sensitivity=2.0).noise_multiplier == 5.0


def test_shuffled_and_non_private_roundtrip():
    shuffled = ShuffledGaussianEvent(batch_size=64, dataset_size=1000, noise_multiplier=1.1, steps=30)
    assert _roundtrip(shuffled) == shuffled and shuffled.sampler == "shuffle"
    debug = NonPrivateEvent(reason="sigma=0 debug run", steps=12)
    assert _roundtrip(debug) == debug and debug.sampler == "n/a"


def test_whole_float_steps_accepted():
    assert PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=439.0).steps == 439


def test_events_are_frozen_and_keyword_only():
    event = PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=3)
    with pytest.raises(AttributeError):
        event.steps = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        PoissonGaussianEvent(0.1, 1.0, 3)  # type: ignore[misc]


BAD_EVENTS = {
    "q zero": lambda: PoissonGaussianEvent(sample_rate=0.0, noise_multiplier=1.0, steps=1),
    "q above one": lambda: PoissonGaussianEvent(sample_rate=1.5, noise_multiplier=1.0, steps=1),
    "q negative": lambda: PoissonGaussianEvent(sample_rate=-0.1, noise_multiplier=1.0, steps=1),
    "q nan": lambda: PoissonGaussianEvent(sample_rate=float("nan"), noise_multiplier=1.0, steps=1),
    "q string": lambda: PoissonGaussianEvent(sample_rate="0.1", noise_multiplier=1.0, steps=1),
    "sigma zero": lambda: PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=0.0, steps=1),
    "sigma negative": lambda: PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=-1.0, steps=1),
    "sigma inf": lambda: PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=float("inf"), steps=1),
    "sigma bool": lambda: PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=True, steps=1),
    "steps zero": lambda: PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=0),
    "steps fractional": lambda: PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=2.5),
    "steps bool": lambda: PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=True),
    "poisson event, shuffled sampler": lambda: PoissonGaussianEvent(
        sample_rate=0.1, noise_multiplier=1.0, steps=1, sampler="shuffle"
    ),
    "gaussian std zero": lambda: GaussianEvent.from_std(std=0.0, sensitivity=1.0),
    "gaussian sensitivity zero": lambda: GaussianEvent.from_std(std=10.0, sensitivity=0.0),
    "gaussian sigma zero": lambda: GaussianEvent(noise_multiplier=0.0),
    "gaussian count zero": lambda: GaussianEvent(noise_multiplier=1.0, count=0),
    "shuffled batch > N": lambda: ShuffledGaussianEvent(
        batch_size=11, dataset_size=10, noise_multiplier=1.0, steps=1
    ),
    "shuffled sigma zero": lambda: ShuffledGaussianEvent(
        batch_size=1, dataset_size=10, noise_multiplier=0, steps=1
    ),
    "non-private without reason": lambda: NonPrivateEvent(reason=" "),
    "non-private two-line reason": lambda: NonPrivateEvent(reason="a\nb"),
    "dict unknown type": lambda: event_from_dict({"type": "laplace", "scale": 1.0}),
    "dict without type": lambda: event_from_dict({"sample_rate": 0.1}),
    "dict not a dict": lambda: event_from_dict(["poisson_gaussian"]),
    "dict missing key": lambda: event_from_dict({"type": "poisson_gaussian", "sample_rate": 0.1, "steps": 3}),
    "dict extra key": lambda: event_from_dict(
        {"type": "gaussian", "noise_multiplier": 1.0, "sensitivity": 1.0, "count": 1, "epsilon": 0.1}
    ),
    "dict std inconsistent": lambda: event_from_dict(
        {"type": "gaussian", "noise_multiplier": 10.0, "sensitivity": 1.0, "count": 1, "std": 5.0}
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_EVENTS))
def test_validation_errors_are_one_line_user_errors(name, one_line):
    with pytest.raises(UserError) as err:
        BAD_EVENTS[name]()
    one_line(err)


def test_poisson_refuses_shuffled_sampler_with_the_fix(one_line):
    with pytest.raises(UserError) as err:
        PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=1.0, steps=1, sampler="shuffle")
    assert "ShuffledGaussianEvent" in one_line(err)
