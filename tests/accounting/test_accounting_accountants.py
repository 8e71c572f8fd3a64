"""Accountants against closed forms, against each other and against Opacus; their refusals and their state.

References:
- analytic Gaussian mechanism (Balle & Wang 2018): δ(ε) = Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ), exact for one
  Gaussian release (q = 1, T = 1). PLD must sit just above it (it is an upper bound), RDP above that.
- Opacus's PRV accountant (the kind Paper B used): its ε_upper − 2·eps_error ≤ true ε ≤ our PLD ε, and our PLD ε
  exceeds ε_upper by at most its own rounding slack.
- Opacus's RDP analysis with the same orders. On integer orders dp_accounting and Opacus evaluate the same
  binomial sum and agree to rounding. On fractional orders dp_accounting sums |terms| of the series (an upper bound
  on A_α) where Opacus sums them with signs (exact), so ours is never below Opacus's and differs by < 1e-3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant as OpacusPRV
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import optimize, special

from privtune.accounting import (
    RDP_ORDERS,
    GaussianEvent,
    NoGuaranteeError,
    NonPrivateEvent,
    PLDAccountant,
    PoissonGaussianEvent,
    RDPAccountant,
    ShuffledGaussianEvent,
    auto_discretization,
    make_accountant,
)
from privtune.errors import UserError


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Exact ε of one Gaussian release with noise std σ (Balle & Wang 2018, Theorem 8)."""

    def excess(eps: float) -> float:
        a = sensitivity / (2 * sigma)
        b = eps * sigma / sensitivity
        return special.ndtr(a - b) - math.exp(eps) * special.ndtr(-a - b) - delta

    return optimize.brentq(excess, 0.0, 200.0, xtol=1e-13, rtol=1e-13)


def _eps(accountant_name: str, *events, delta: float) -> float:
    acc = make_accountant(accountant_name)
    acc.extend(events)
    return acc.epsilon(delta)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0, 10.0, 30.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_single_gaussian_matches_analytic_gaussian_mechanism(sigma, delta):
    exact = analytic_gaussian_epsilon(sigma, delta)
    events = (
        GaussianEvent(noise_multiplier=sigma),
        PoissonGaussianEvent(sample_rate=1.0, noise_multiplier=sigma, steps=1),
    )
    for event in events:
        # Automatic grid: an upper bound, within 0.1 % (measured ≤ 0.05 %, at σ = 30).
        pld = _eps("pld", event, delta=delta)
        assert exact - 1e-12 <= pld <= exact * (1 + 1e-3), (pld, exact)
        assert _eps("rdp", event, delta=delta) >= exact
    if sigma >= 2.0:  # a 1e-4 grid closes the gap to ~1e-6 (cheap only where the loss range is narrow)
        fine = PLDAccountant(value_discretization_interval=1e-4)
        fine.record(events[0])
        assert exact - 1e-12 <= fine.epsilon(delta) <= exact * (1 + 5e-6)


def test_gaussian_composition_is_one_gaussian():
    # k releases at σ compose exactly to one release at σ/√k.
    exact = analytic_gaussian_epsilon(2.0 / math.sqrt(4), 1e-6)
    pld = _eps("pld", GaussianEvent(noise_multiplier=2.0, count=4), delta=1e-6)
    assert exact - 1e-9 <= pld <= exact * (1 + 1e-4)


def test_histogram_sensitivity_scales_noise():
    # std 10 on sensitivity 2 is the same mechanism as std 5 on sensitivity 1.
    a = _eps("pld", GaussianEvent.from_std(std=10.0, sensitivity=2.0), delta=1e-6)
    b = _eps("pld", GaussianEvent.from_std(std=5.0, sensitivity=1.0), delta=1e-6)
    assert a == b


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.floats(min_value=1e-3, max_value=1.0),
    sigma=st.floats(min_value=0.6, max_value=8.0),
    steps=st.integers(min_value=1, max_value=3000),
    log10_delta=st.floats(min_value=-9.0, max_value=-4.0),
)
def test_rdp_is_never_below_pld(q, sigma, steps, log10_delta):
    """Both are upper bounds; RDP's conversion is looser than PLD's, up to PLD's own rounding slack."""
    delta = 10.0**log10_delta
    event = PoissonGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=steps)
    pld = PLDAccountant()
    pld.record(event)
    rdp = _eps("rdp", event, delta=delta)
    pld_eps = pld.epsilon(delta)
    if rdp < pld_eps:  # only then is the slack needed (computing it costs a second, finer PLD)
        slack = pld.report(delta)["discretization_slack"]
        assert rdp >= pld_eps - 2 * slack - 1e-9, (rdp, pld_eps, slack)


def test_pld_auto_grid_is_close_to_a_much_finer_grid():
    """The automatic grid's pessimism stays within 1 % of ε (claimed ≈0.5 % in auto_discretization)."""
    for event, delta in [
        (PoissonGaussianEvent(sample_rate=1e-3, noise_multiplier=1.5, steps=20_000), 1e-6),
        (PoissonGaussianEvent(sample_rate=0.05, noise_multiplier=1.0, steps=500), 1e-6),
    ]:
        auto = PLDAccountant()
        auto.record(event)
        fine = PLDAccountant(value_discretization_interval=auto.discretization() / 5)
        fine.record(event)
        a, f = auto.epsilon(delta), fine.epsilon(delta)
        assert f <= a <= f * 1.01, (event, a, f)


def test_auto_discretization_follows_the_loss_spread():
    paper_b = PoissonGaussianEvent(sample_rate=4096 / 180_000, noise_multiplier=0.81, steps=439)
    tiny_q = PoissonGaussianEvent(sample_rate=1e-4, noise_multiplier=2.0, steps=100_000)
    assert auto_discretization([paper_b]) == 2e-3
    assert auto_discretization([tiny_q]) < 1e-4
    # All events of one composition share one grid: the finest any of them needs, unless that would make the
    # widest event's PLD too large; then the grid is coarser (still an upper bound, slack shown in reports).
    assert (
        auto_discretization([tiny_q])
        <= auto_discretization([paper_b, tiny_q])
        <= auto_discretization([paper_b])
    )
    assert PLDAccountant(value_discretization_interval=2e-4).discretization() == 2e-4


@pytest.mark.parametrize("sigma", [0.81, 1.13])
def test_pld_agrees_with_opacus_prv_on_paper_b(paper_b, sigma):
    eps_error = 0.01
    prv = OpacusPRV()
    prv.history = [(sigma, paper_b["sample_rate"], paper_b["steps"])]
    prv_upper = prv.get_epsilon(
        delta=paper_b["delta"], eps_error=eps_error, delta_error=paper_b["delta"] / 1000
    )
    pld = PLDAccountant()
    pld.record(
        PoissonGaussianEvent(
            sample_rate=paper_b["sample_rate"], noise_multiplier=sigma, steps=paper_b["steps"]
        )
    )
    report = pld.report(paper_b["delta"])
    assert prv_upper - 2 * eps_error <= report["epsilon"] <= prv_upper + report["discretization_slack"]


INTEGER_ORDERS = [float(a) for a in range(2, 65)] + [128.0, 256.0]
OPACUS_CASES = [
    (4096 / 180_000, 0.81, 439, 5e-7),
    (4096 / 180_000, 1.13, 439, 5e-7),
    (0.01, 1.0, 1000, 1e-5),
    (0.2, 3.0, 50, 1e-6),
    (1e-3, 1.5, 100_000, 1e-6),
]


@pytest.mark.parametrize("q,sigma,steps,delta", OPACUS_CASES)
def test_rdp_matches_opacus(q, sigma, steps, delta):
    event = PoissonGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=steps)

    def opacus_eps(orders):
        rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        return float(opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])

    ours_int = RDPAccountant(orders=INTEGER_ORDERS)
    ours_int.record(event)
    assert ours_int.epsilon(delta) == pytest.approx(opacus_eps(INTEGER_ORDERS), rel=1e-9)

    ours = RDPAccountant()
    ours.record(event)
    theirs = opacus_eps(list(RDP_ORDERS))
    assert theirs <= ours.epsilon(delta) <= theirs * (1 + 1e-3)


def test_shuffled_batches_are_refused(one_line):
    shuffled = ShuffledGaussianEvent(batch_size=64, dataset_size=1000, noise_multiplier=1.0, steps=10)
    for name in ("pld", "rdp"):
        with pytest.raises(UserError) as err:
            make_accountant(name).record(shuffled)
        assert one_line(err).startswith(
            "fixed-size shuffled batches have no verified accountant here: use sampler poisson"
        )


def test_non_private_event_gives_no_guarantee(one_line):
    for name in ("pld", "rdp"):
        acc = make_accountant(name)
        acc.record(PoissonGaussianEvent(sample_rate=0.01, noise_multiplier=1.0, steps=10))
        acc.record(NonPrivateEvent(reason="sigma=0 debug run"))
        assert not acc.has_guarantee
        with pytest.raises(NoGuaranteeError) as err:
            acc.epsilon(1e-5)
        assert "no formal guarantee" in one_line(err)
        with pytest.raises(NoGuaranteeError):
            acc.delta(1.0)


def test_per_step_records_merge_and_match_one_event():
    q, sigma, steps = 0.02, 1.0, 200
    per_step = PLDAccountant()
    for _ in range(steps):
        per_step.record(PoissonGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=1))
    assert per_step.events == [PoissonGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=steps)]
    whole = PLDAccountant()
    whole.record(PoissonGaussianEvent(sample_rate=q, noise_multiplier=sigma, steps=steps))
    assert per_step.epsilon(1e-6) == whole.epsilon(1e-6)


def test_composition_is_order_independent():
    a = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.0, steps=300)
    b = GaussianEvent(noise_multiplier=10.0)
    for name in ("pld", "rdp"):
        assert _eps(name, a, b, delta=1e-6) == pytest.approx(_eps(name, b, a, delta=1e-6), rel=1e-9)


def test_delta_inverts_epsilon():
    for name in ("pld", "rdp"):
        acc = make_accountant(name)
        acc.record(PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.0, steps=300))
        eps = acc.epsilon(1e-6)
        assert acc.delta(eps) <= 1e-6 * (1 + 1e-6)
        assert acc.delta(eps * 0.98) > 1e-6


def test_empty_accountant_has_zero_epsilon():
    for name in ("pld", "rdp"):
        acc = make_accountant(name)
        assert acc.epsilon(1e-6) == 0.0
        assert acc.report(1e-6)["epsilon"] == 0.0


def test_state_dict_roundtrip_and_refusals(one_line):
    acc = PLDAccountant()
    acc.record(PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.0, steps=300))
    acc.record(GaussianEvent(noise_multiplier=10.0))
    state = acc.state_dict()
    assert state["neighbouring"] == "add_remove" and state["config"] == {
        "value_discretization_interval": "auto"
    }
    again = PLDAccountant()
    again.load_state_dict(state)
    assert again.events == acc.events and again.epsilon(1e-6) == acc.epsilon(1e-6)
    for target, bad in [
        (RDPAccountant(), state),
        (PLDAccountant(value_discretization_interval=1e-4), state),
        (PLDAccountant(), {**state, "neighbouring": "replace_one"}),
        (PLDAccountant(), {"events": "nope"}),
    ]:
        with pytest.raises(UserError) as err:
            target.load_state_dict(bad)
        one_line(err)


def test_reports_carry_error_information():
    event = PoissonGaussianEvent(sample_rate=4096 / 180_000, noise_multiplier=0.81, steps=439)
    pld = PLDAccountant()
    pld.record(event)
    report = pld.report(5e-7)
    assert report["bound"] == "upper"
    assert report["finer_epsilon"] <= report["epsilon"]
    assert 0 <= report["discretization_slack"] < 1e-3
    rdp = RDPAccountant()
    rdp.record(event)
    rreport = rdp.report(5e-7)
    assert rreport["optimal_order"] in RDP_ORDERS and not rreport["order_at_edge"]


BAD_CALLS = {
    "delta zero": lambda: make_accountant("pld").epsilon(0.0),
    "delta one": lambda: make_accountant("pld").epsilon(1.0),
    "delta nan": lambda: make_accountant("rdp").epsilon(float("nan")),
    "delta string": lambda: make_accountant("rdp").epsilon("1e-5"),
    "epsilon negative": lambda: make_accountant("pld").delta(-1.0),
    "epsilon inf": lambda: make_accountant("pld").delta(float("inf")),
    "unknown accountant": lambda: make_accountant("prv"),
    "grid too fine": lambda: PLDAccountant(value_discretization_interval=1e-9),
    "grid not a number": lambda: PLDAccountant(value_discretization_interval="fine"),
    "rdp order one": lambda: RDPAccountant(orders=[1.0, 2.0]),
    "rdp no orders": lambda: RDPAccountant(orders=[]),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_accountant_validation_errors(name, one_line):
    with pytest.raises(UserError) as err:
        BAD_CALLS[name]()
    one_line(err)


def test_record_rejects_non_events():
    with pytest.raises(TypeError):
        make_accountant("pld").record({"type": "gaussian"})  # type: ignore[arg-type]


def test_no_process_global_state():
    """Two accountants never share events or caches."""
    a, b = PLDAccountant(), PLDAccountant()
    a.record(GaussianEvent(noise_multiplier=1.0))
    assert b.events == [] and b.epsilon(1e-5) == 0.0
    assert np.isfinite(a.epsilon(1e-5))
