"""Noise calibration: the smallest σ whose ε stays within a target, for Poisson-sampled DP-SGD.

Owns: ``compute_epsilon`` (ε of T Poisson-subsampled Gaussian steps) and ``calibrate_noise`` / ``calibrate``
(σ for a target ε).

Privacy unit: the one whose inclusion probability is ``sample_rate`` (example or group); add/remove adjacency.

Sensitive: the target is a hard limit. The returned σ is always the *upper* end of a bracket whose both ends were
evaluated with the chosen accountant at its default settings: ε(σ) ≤ target is checked, not assumed, and
ε(σ_lo) > target at σ_lo ≥ σ·(1 − 1e-4), so the answer is also tight. A cheap Gaussian-DP (CLT) approximation
only picks the starting point; it never decides the answer.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from scipy import optimize, special

from privtune.accounting.accountants import check_delta, make_accountant
from privtune.accounting.events import PoissonGaussianEvent
from privtune.errors import UserError

__all__ = ["SIGMA_MAX", "SIGMA_MIN", "Calibration", "calibrate", "calibrate_noise", "compute_epsilon"]

SIGMA_MIN = 0.1  # below this the PLD grid gets huge and no sensible DP-SGD run lives there
SIGMA_MAX = 1e4  # above this the target is treated as unreachable
_REL_TOL = 1e-4  # final bracket: σ_lo ≥ σ_hi · (1 − 1e-4)
_MAX_EVALUATIONS = 80


def compute_epsilon(
    *, noise_multiplier: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld"
) -> float:
    """ε at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps (rate q, noise multiplier σ)."""
    event = PoissonGaussianEvent(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps)
    acc = make_accountant(accountant)
    acc.record(event)
    return acc.epsilon(delta)


@dataclass(frozen=True)
class Calibration:
    """The outcome of ``calibrate``: ``sigma`` with its ``epsilon`` ≤ ``target_epsilon``, and the bracket."""

    sigma: float
    epsilon: float
    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: str
    lower_sigma: float  # evaluated, ε(lower_sigma) > target
    lower_epsilon: float
    evaluations: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld"
) -> float:
    """Smallest σ (to 1e-4 relative) with ε(σ) ≤ ``target_epsilon`` under ``accountant``; never above it."""
    return calibrate(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
    ).sigma


def _gdp_epsilon(mu: float, delta: float) -> float:
    """ε of μ-Gaussian DP at δ (Dong, Roth & Su): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""

    def excess(eps: float) -> float:
        upper = special.ndtr(-eps / mu + mu / 2)
        lower = math.exp(min(700.0, eps + special.log_ndtr(-eps / mu - mu / 2)))
        return upper - lower - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0 and hi < 1e6:
        hi *= 2
    return optimize.brentq(excess, 0.0, hi, xtol=1e-10)


def _gdp_mu(sigma: float, *, sample_rate: float, steps: int) -> float:
    """μ of the central-limit (μ-GDP) approximation of T Poisson-subsampled Gaussian steps: q·sqrt(T(e^{1/σ²}−1))."""
    if sample_rate >= 1.0:
        return math.sqrt(steps) / sigma
    return sample_rate * math.sqrt(steps * math.expm1(min(1.0 / sigma**2, 700.0)))


def _gdp_guess(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> tuple[float, float]:
    """(σ, d log ε / d log σ) from the μ-GDP approximation of DP-SGD. A starting point only: never a bound."""
    mu_hi = 1.0
    while _gdp_epsilon(mu_hi, delta) < target_epsilon and mu_hi < 1e4:
        mu_hi *= 2
    mu = optimize.brentq(lambda m: _gdp_epsilon(m, delta) - target_epsilon, 1e-9, mu_hi, xtol=1e-12)
    if sample_rate >= 1.0:
        sigma = math.sqrt(steps) / mu
    else:
        sigma = 1.0 / math.sqrt(math.log1p((mu / sample_rate) ** 2 / steps))
    sigma = min(max(sigma, SIGMA_MIN), SIGMA_MAX)
    eps = _gdp_epsilon(_gdp_mu(sigma, sample_rate=sample_rate, steps=steps), delta)
    eps_up = _gdp_epsilon(_gdp_mu(sigma * 1.01, sample_rate=sample_rate, steps=steps), delta)
    slope = math.log(eps_up / eps) / math.log(1.01) if eps > 0 and eps_up > 0 else -1.0
    return sigma, (slope if slope < -0.1 else -1.0)


def calibrate(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld"
) -> Calibration:
    """Find σ for a target ε; see the module docstring for the guarantee. Raises ``UserError`` if unreachable."""
    started = time.perf_counter()
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, (int, float))
        or not math.isfinite(target_epsilon)
        or target_epsilon <= 0
    ):
        raise UserError(f"target_epsilon={target_epsilon!r} is not a finite number > 0", "pass ε > 0")
    target = float(target_epsilon)
    delta = check_delta(delta)
    make_accountant(accountant)  # refuse an unknown name before any work
    # Validates q and T exactly as the ledger will.
    probe = PoissonGaussianEvent(sample_rate=sample_rate, noise_multiplier=1.0, steps=steps)
    q, steps = probe.sample_rate, probe.steps

    cache: dict[float, float] = {}

    def eps_at(x: float) -> float:
        if x not in cache:
            if len(cache) >= _MAX_EVALUATIONS:
                raise UserError(
                    f"noise calibration did not converge in {_MAX_EVALUATIONS} evaluations",
                    "report this bug; meanwhile set noise_multiplier explicitly",
                )
            cache[x] = compute_epsilon(
                noise_multiplier=math.exp(x), delta=delta, sample_rate=q, steps=steps, accountant=accountant
            )
        return cache[x]

    def g(x: float) -> float:  # > 0: too little noise; ≤ 0: within target. Smooth in log-log.
        return math.log(max(eps_at(x), 1e-300)) - math.log(target)

    x_min, x_max = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
    try:
        sigma0, slope = _gdp_guess(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    except (ValueError, ArithmeticError):  # the approximation broke down far outside its range: start neutral
        sigma0, slope = 1.0, -1.0
    x0 = math.log(sigma0)
    g0 = g(x0)

    # 1. Bracket: step along the secant (the first step with the approximation's slope), overshooting a little.
    x_prev, g_prev = x0, g0
    for _ in range(_MAX_EVALUATIONS):
        if g_prev > 0 and x_prev >= x_max:
            raise UserError(
                f"target ε={target:g} at δ={delta:g} is unreachable: even σ={SIGMA_MAX:g} gives "
                f"ε={eps_at(x_max):.4g} (q={q:g}, T={steps})",
                "raise the target ε or δ, or lower the sampling rate or the number of steps",
            )
        if g_prev <= 0 and x_prev <= x_min:
            raise UserError(
                f"target ε={target:g} is met even at σ={SIGMA_MIN:g} (ε={eps_at(x_min):.4g}), below the "
                "calibrated range",
                "lower the target ε or set the noise multiplier explicitly",
            )
        step = -g_prev / slope
        # Overshoot by 5 % (so the next point tends to land past the root), at least 1e-4, at most ×e² per step.
        step = math.copysign(min(max(abs(step) * 1.05, 1e-4), 2.0), step)
        x_next = min(max(x_prev + step, x_min), x_max)
        g_next = g(x_next)
        if (g_next > 0) != (g_prev > 0):
            break
        if x_next != x_prev and g_next != g_prev:
            slope = (g_next - g_prev) / (x_next - x_prev)
        if not slope < 0:
            slope = -1.0
        x_prev, g_prev = x_next, g_next
    else:
        raise UserError(
            f"noise calibration found no bracket for ε={target:g} in {_MAX_EVALUATIONS} steps",
            "report this bug; meanwhile set noise_multiplier explicitly",
        )
    if g_next > 0:
        x_lo, g_lo, x_hi, g_hi = x_next, g_next, x_prev, g_prev
    else:
        x_lo, g_lo, x_hi, g_hi = x_prev, g_prev, x_next, g_next

    # 2. Shrink: regula falsi with the Illinois fix, and each probe nudged by 0.4·tol towards the end that did not
    #    move last, so that once the root is known well two probes close the bracket from both sides. Whenever
    #    two probes in a row fail to halve the bracket, the next one bisects (RDP's ε(σ) has kinks).
    tol = math.log1p(_REL_TOL)
    w_lo, w_hi = g_lo, g_hi  # Illinois weights
    last = ""
    widths = [x_hi - x_lo]
    while x_hi - x_lo > tol:
        width = x_hi - x_lo
        slow = len(widths) >= 3 and widths[-1] > 0.5 * widths[-3]
        if w_lo - w_hi > 0 and not slow:
            x = x_lo + w_lo * width / (w_lo - w_hi)
            x += 0.4 * tol if last == "lo" else -0.4 * tol if last == "hi" else 0.0
        else:
            x = 0.5 * (x_lo + x_hi)
            widths.clear()
        margin = min(0.25 * tol, 0.25 * width)
        x = min(max(x, x_lo + margin), x_hi - margin)
        gx = g(x)
        if gx > 0:
            x_lo, g_lo, w_lo = x, gx, gx
            w_hi = w_hi / 2 if last == "lo" else g_hi
            last = "lo"
        else:
            x_hi, g_hi, w_hi = x, gx, gx
            w_lo = w_lo / 2 if last == "hi" else g_lo
            last = "hi"
        widths.append(x_hi - x_lo)

    sigma = math.exp(x_hi)
    epsilon = eps_at(x_hi)
    if not epsilon <= target:  # the invariant of the bracket; checked, never assumed
        raise AssertionError(f"calibration bracket broken: ε({sigma}) = {epsilon} > {target}")
    return Calibration(
        sigma=sigma,
        epsilon=epsilon,
        target_epsilon=target,
        delta=delta,
        sample_rate=q,
        steps=steps,
        accountant=accountant,
        lower_sigma=math.exp(x_lo),
        lower_epsilon=eps_at(x_lo),
        evaluations=len(cache),
        seconds=time.perf_counter() - started,
    )
