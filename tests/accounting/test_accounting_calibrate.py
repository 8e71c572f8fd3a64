"""Calibration: Paper B's published σ, the hard limit (ε(σ) ≤ target), tightness, and the refusals."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from privtune.accounting import calibrate, calibrate_noise, compute_epsilon
from privtune.accounting.calibrate import SIGMA_MAX
from privtune.errors import UserError


@pytest.mark.parametrize("target,published_sigma", [(5.94, 0.81), (2.86, 1.13)])
def test_paper_b_published_sigma(paper_b, paper_b_sigmas, target, published_sigma):
    """Paper B reports σ ≈ 0.81 / 1.13 for ε = 5.94 / 2.86 (PRV accountant); PLD must land within a few %."""
    sigma = paper_b_sigmas[target]
    assert sigma == pytest.approx(published_sigma, rel=0.03)
    eps = compute_epsilon(
        noise_multiplier=sigma,
        delta=paper_b["delta"],
        sample_rate=paper_b["sample_rate"],
        steps=paper_b["steps"],
    )
    assert eps <= target


def _check_hard_limit_and_tight(*, target, delta, q, steps, accountant):
    found = calibrate(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=accountant)
    again = compute_epsilon(
        noise_multiplier=found.sigma, delta=delta, sample_rate=q, steps=steps, accountant=accountant
    )
    assert again == found.epsilon <= target  # the hard limit, recomputed independently
    below = compute_epsilon(
        noise_multiplier=found.sigma * (1 - 1e-3),
        delta=delta,
        sample_rate=q,
        steps=steps,
        accountant=accountant,
    )
    assert below > target  # tight: 0.1 % less noise already breaks the target
    assert found.lower_sigma >= found.sigma * (1 - 1e-4) and found.lower_epsilon > target
    return found


@pytest.mark.parametrize(
    "target,delta,q,steps,accountant",
    [
        (1.0, 1e-6, 1e-3, 100_000, "pld"),  # T = 1e5: the timing case of the brief
        (8.0, 1e-5, 0.5, 50, "pld"),
        (0.5, 1e-5, 1.0, 1, "pld"),  # a single Gaussian release
        (3.0, 1e-6, 0.004, 100_000, "rdp"),
    ],
)
def test_calibration_hard_limit_and_tightness(target, delta, q, steps, accountant):
    found = _check_hard_limit_and_tight(target=target, delta=delta, q=q, steps=steps, accountant=accountant)
    assert found.evaluations <= 20


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.floats(min_value=0.3, max_value=10.0),
    log10_delta=st.floats(min_value=-9.0, max_value=-5.0),
    q=st.floats(min_value=0.002, max_value=0.3),
    steps=st.integers(min_value=1, max_value=2000),
)
def test_calibration_never_exceeds_random_targets(target, log10_delta, q, steps):
    delta = 10.0**log10_delta
    try:
        found = calibrate(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    except UserError:  # out of the calibrated σ range for this draw
        assume(False)
    assert compute_epsilon(noise_multiplier=found.sigma, delta=delta, sample_rate=q, steps=steps) <= target
    assert found.lower_epsilon > target and found.lower_sigma >= found.sigma * (1 - 1e-4)


def test_pld_needs_less_noise_than_rdp_for_the_same_target(paper_b, paper_b_sigmas):
    rdp_sigma = calibrate_noise(
        target_epsilon=5.94,
        delta=paper_b["delta"],
        sample_rate=paper_b["sample_rate"],
        steps=paper_b["steps"],
        accountant="rdp",
    )
    assert paper_b_sigmas[5.94] < rdp_sigma < paper_b_sigmas[5.94] * 1.1


def test_unreachable_target_is_refused(one_line):
    with pytest.raises(UserError) as err:
        calibrate_noise(target_epsilon=1e-4, delta=1e-6, sample_rate=0.5, steps=100_000)
    message = one_line(err)
    assert "unreachable" in message and f"{SIGMA_MAX:g}" in message


def test_target_met_below_sigma_range_is_refused(one_line):
    with pytest.raises(UserError) as err:
        calibrate_noise(target_epsilon=500.0, delta=1e-5, sample_rate=0.01, steps=10, accountant="rdp")
    one_line(err)


BAD = {
    "target zero": dict(target_epsilon=0.0),
    "target negative": dict(target_epsilon=-1.0),
    "target nan": dict(target_epsilon=float("nan")),
    "target inf": dict(target_epsilon=float("inf")),
    "delta zero": dict(delta=0.0),
    "delta one": dict(delta=1.0),
    "q zero": dict(sample_rate=0.0),
    "q above one": dict(sample_rate=1.2),
    "steps zero": dict(steps=0),
    "steps fractional": dict(steps=10.5),
    "unknown accountant": dict(accountant="prv"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_calibration_validation(name, one_line):
    kwargs = dict(target_epsilon=2.0, delta=1e-6, sample_rate=0.01, steps=100, accountant="pld") | BAD[name]
    with pytest.raises(UserError) as err:
        calibrate_noise(**kwargs)
    one_line(err)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=0.0),
        dict(noise_multiplier=-1.0),
        dict(sample_rate=0.0),
        dict(sample_rate=2.0),
        dict(steps=0),
        dict(delta=0.0),
    ],
)
def test_compute_epsilon_validation(kwargs, one_line):
    args = dict(noise_multiplier=1.0, delta=1e-6, sample_rate=0.01, steps=100) | kwargs
    with pytest.raises(UserError) as err:
        compute_epsilon(**args)
    one_line(err)


def test_privacy_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        calibrate_noise(2.0, 1e-6, 0.01, 100)  # type: ignore[misc]
    with pytest.raises(TypeError):
        compute_epsilon(1.0, 1e-6, 0.01, 100)  # type: ignore[misc]
