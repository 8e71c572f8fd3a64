"""The win-rate statistics, over instructions (the unit every interval resamples), in plain numpy.

Owns the definitions:

- **Per-instruction score for A**, from its two un-swapped verdicts (orders AB and BA): 1 when both say A, 0 when
  both say B, 0.5 otherwise (one each, a tie in either order, or both ties). A win needs the judge to prefer A in
  both positions, so a judge's position bias cannot make a win by itself.
- **Win rate**: the mean score over the instructions judged in both orders. An instruction with a failed answer
  or a failed judgment in either order has no score: it is excluded and listed, and the rate says over how many.
- **Position consistency**: the fraction of those instructions whose two verdicts agree after un-swapping (both
  A, both B, or both ties). A judge that always prefers the first position has 0.
- **Bootstrap CI**: percentile interval of the mean score over instructions resampled with replacement
  (default 2000 resamples, seed 0, 95%).
- **Length-controlled win rate** (AlpacaEval's LC idea, simplified): a logistic regression of the score (as a
  fractional outcome: 0.5 counts as half a win) on ``x = tanh(d / sd(d))``, ``d`` = A's answer length − B's in
  characters, ``P(A wins | x) = sigmoid(θ + βx)``, fitted by Newton's method with a normal prior of sd 1 on β (so
  a set perfectly separated by length stays finite); LC = ``sigmoid(θ)``, the predicted win rate for answers of
  equal length. Assumptions: one length effect shared by every instruction, logistic in the squashed,
  standardised difference; no per-instruction difficulty term (AlpacaEval fits one against a fixed baseline,
  which a two-model comparison does not have). With no length variation (sd = 0) LC equals the win rate.

Sensitive: nothing here sees text; only scores and lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


def instruction_score(ab: str, ba: str) -> float:
    if ab == ba == "A":
        return 1.0
    if ab == ba == "B":
        return 0.0
    return 0.5


def consistent(ab: str, ba: str) -> bool:
    return ab == ba


def bootstrap_ci(scores: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no scores to resample")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2**22 // values.size)  # resample in chunks: resamples × n indices may not fit at once
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        means[start : start + count] = values[rng.integers(0, values.size, (count, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def length_feature(len_a: Sequence[float], len_b: Sequence[float]) -> np.ndarray:
    d = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    sd = d.std()
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def _objective(theta: float, beta: float, x: np.ndarray, y: np.ndarray, prior_sd: float) -> float:
    z = theta + beta * x
    # -log-likelihood of a fractional outcome: y log σ(z) + (1-y) log σ(-z), with log σ(z) = -logaddexp(0, -z)
    return float(np.sum(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)) + beta**2 / (2 * prior_sd**2))


def length_controlled(scores: Sequence[float], feature: Sequence[float], *, prior_sd: float = 1.0,
                      iterations: int = 100) -> float:
    y, x = np.asarray(scores, dtype=np.float64), np.asarray(feature, dtype=np.float64)
    if y.size == 0:
        raise ValueError("no scores")
    if np.all(y == 1) or np.all(y == 0):  # θ's maximum is at ±∞: the rate is exactly that extreme
        return float(y[0])
    theta, beta = float(np.log(y.mean() / (1 - y.mean()))), 0.0
    current = _objective(theta, beta, x, y, prior_sd)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(theta + beta * x)))
        w = p * (1 - p)
        grad = np.array([np.sum(p - y), np.sum((p - y) * x) + beta / prior_sd**2])
        hess = np.array([[w.sum(), (w * x).sum()], [(w * x).sum(), (w * x * x).sum() + 1 / prior_sd**2]])
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-8:  # step halving: the objective is convex, a short enough Newton step decreases it
            candidate = _objective(theta - scale * step[0], beta - scale * step[1], x, y, prior_sd)
            if candidate <= current:
                break
            scale /= 2
        theta, beta = theta - scale * step[0], beta - scale * step[1]
        if current - candidate < 1e-12:
            break
        current = candidate
    return float(1 / (1 + np.exp(-theta)))


def summarize(scored: Sequence[dict], *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
              seed: int = 0) -> dict:
    """The statistics of instructions judged in both orders: rows ``{"AB", "BA", "len_a", "len_b"}``."""
    if not scored:
        return {"over": 0, "win_rate": None, "ci": None, "length_controlled_win_rate": None,
                "position_consistency": None, "outcomes": {"A": 0, "B": 0, "split": 0}, "tie_verdicts": 0}
    scores = [instruction_score(r["AB"], r["BA"]) for r in scored]
    low, high = bootstrap_ci(scores, resamples=resamples, level=level, seed=seed)
    feature = length_feature([r["len_a"] for r in scored], [r["len_b"] for r in scored])
    return {"over": len(scores), "win_rate": float(np.mean(scores)), "ci": [low, high],
            "length_controlled_win_rate": length_controlled(scores, feature),
            "position_consistency": float(np.mean([consistent(r["AB"], r["BA"]) for r in scored])),
            "outcomes": {"A": scores.count(1.0), "B": scores.count(0.0), "split": scores.count(0.5)},
            "tie_verdicts": sum((r["AB"] == "tie") + (r["BA"] == "tie") for r in scored)}
