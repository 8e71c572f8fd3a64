"""ROC curves, AUC, TPR at a fixed FPR, and stratified bootstrap confidence intervals, in plain numpy.

Owns the statistics every attack metric goes through (membership inference here, anything with a member /
non-member score later), so the definitions live in one place:

- **Scores**: higher means "more likely a member". A threshold ``tau`` predicts member iff ``score >= tau``.
- **ROC**: one vertex per distinct score (plus the origin for ``tau = +inf``); ties between a member and a
  non-member move both rates in the same step, so the curve has a diagonal segment there.
- **AUC**: the trapezoid area under that ROC = the Mann-Whitney probability P(member > non-member) + 1/2 P(tie).
- **TPR at FPR <= t**: the highest TPR of any ROC vertex whose FPR does not exceed ``t`` (a step function, never a
  linear interpolation between vertices, so the reading is conservative and attainable by one deterministic
  threshold). With ``n`` non-members the smallest non-zero FPR is ``1/n``: asking for ``t < 1/n`` reads the
  vertex at FPR 0. ``fpr_resolution`` in the results says so.
- **Bootstrap**: stratified (members and non-members resampled separately, each keeping its size), seeded,
  percentile intervals. All resamples are evaluated from weighted histograms over the pooled distinct scores, so
  1000 resamples of 10^4 examples take well under a second.

Sensitive: nothing here sees text or tokens, only per-example scores and labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_FPRS = (0.01, 0.001)


def _as_scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name}: no scores")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: scores must be finite (drop examples without a score first)")
    return arr


def _pooled(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Index of every score among the pooled distinct scores sorted in *descending* order."""
    uniq, inverse = np.unique(np.concatenate([members, nonmembers]), return_inverse=True)
    inverse = (len(uniq) - 1) - inverse.reshape(-1)  # descending: index 0 = highest score
    return inverse[: len(members)], inverse[len(members) :], len(uniq)


def _rates(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative TP and FP counts per vertex (leading origin), for histograms over descending distinct scores.

    Works on a batch: histograms have shape (..., U); the result has shape (..., U + 1).
    """
    zeros = np.zeros((*pos_hist.shape[:-1], 1))
    tp = np.concatenate([zeros, np.cumsum(pos_hist, axis=-1)], axis=-1)
    fp = np.concatenate([zeros, np.cumsum(neg_hist, axis=-1)], axis=-1)
    return tp, fp


def _auc(tp: np.ndarray, fp: np.ndarray, n_pos: float, n_neg: float) -> np.ndarray:
    d_fp = np.diff(fp, axis=-1)
    mid_tp = (tp[..., 1:] + tp[..., :-1]) / 2.0
    return (d_fp * mid_tp).sum(axis=-1) / (n_pos * n_neg)


def _tpr_at(tp: np.ndarray, fp: np.ndarray, n_pos: float, n_neg: float, fpr: float) -> np.ndarray:
    # FP counts are integers (or integer-valued floats): compare counts, not rounded rates.
    limit = fpr * n_neg + 1e-9
    last = (fp <= limit).sum(axis=-1) - 1  # fp is non-decreasing and fp[..., 0] == 0, so last >= 0
    return np.take_along_axis(tp, last[..., None], axis=-1)[..., 0] / n_pos


def roc_curve(members: Sequence[float], nonmembers: Sequence[float]) -> dict[str, np.ndarray]:
    """ROC vertices: ``fpr``, ``tpr`` (both starting at 0) and ``thresholds`` (``+inf`` first, then descending)."""
    pos, neg = _as_scores(members, "members"), _as_scores(nonmembers, "nonmembers")
    pi, ni, u = _pooled(pos, neg)
    tp, fp = _rates(np.bincount(pi, minlength=u).astype(float), np.bincount(ni, minlength=u).astype(float))
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([pos, neg]))[::-1]])
    return {"fpr": fp / len(neg), "tpr": tp / len(pos), "thresholds": thresholds}


def roc_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score > non-member score) + 1/2 P(equal): the area under the ROC."""
    pos, neg = _as_scores(members, "members"), _as_scores(nonmembers, "nonmembers")
    pi, ni, u = _pooled(pos, neg)
    tp, fp = _rates(np.bincount(pi, minlength=u).astype(float), np.bincount(ni, minlength=u).astype(float))
    return float(_auc(tp, fp, len(pos), len(neg)))


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], fpr: float) -> float:
    """Highest TPR of a threshold whose FPR is at most ``fpr`` (no interpolation)."""
    pos, neg = _as_scores(members, "members"), _as_scores(nonmembers, "nonmembers")
    pi, ni, u = _pooled(pos, neg)
    tp, fp = _rates(np.bincount(pi, minlength=u).astype(float), np.bincount(ni, minlength=u).astype(float))
    return float(_tpr_at(tp, fp, len(pos), len(neg), fpr))


def fpr_key(fpr: float) -> str:
    """The metric name for TPR at ``fpr``: ``tpr@0.01``."""
    return f"tpr@{fpr:g}"


def roc_metrics(
    members: Sequence[float],
    nonmembers: Sequence[float],
    *,
    fprs: Sequence[float] = DEFAULT_FPRS,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict:
    """AUC and TPR at each FPR in ``fprs``, each with a stratified percentile bootstrap interval.

    Returns ``{"members", "nonmembers", "auc", "auc_ci", "tpr@<f>", "tpr@<f>_ci" for f in fprs,
    "fpr_resolution", "bootstrap", "ci"}``; ``*_ci`` is ``[low, high]`` or ``None`` when ``n_bootstrap == 0``.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci={ci} must lie in (0, 1)")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 0")
    pos, neg = _as_scores(members, "members"), _as_scores(nonmembers, "nonmembers")
    n_pos, n_neg = len(pos), len(neg)
    pi, ni, u = _pooled(pos, neg)

    tp, fp = _rates(np.bincount(pi, minlength=u).astype(float), np.bincount(ni, minlength=u).astype(float))
    out: dict = {"members": n_pos, "nonmembers": n_neg, "auc": float(_auc(tp, fp, n_pos, n_neg))}
    for f in fprs:
        out[fpr_key(f)] = float(_tpr_at(tp, fp, n_pos, n_neg, f))

    boot = _bootstrap(pi, ni, u, fprs=fprs, n_bootstrap=n_bootstrap, seed=seed)
    lo_q, hi_q = (1.0 - ci) / 2.0, (1.0 + ci) / 2.0
    for name in ("auc", *(fpr_key(f) for f in fprs)):
        if boot is None:
            out[f"{name}_ci"] = None
        else:
            lo, hi = np.quantile(boot[name], [lo_q, hi_q])
            out[f"{name}_ci"] = [float(lo), float(hi)]
    out["fpr_resolution"] = 1.0 / n_neg
    out["bootstrap"] = n_bootstrap
    out["ci"] = ci
    return out


def _bootstrap(
    pi: np.ndarray, ni: np.ndarray, u: int, *, fprs: Sequence[float], n_bootstrap: int, seed: int
) -> dict[str, np.ndarray] | None:
    """Metric values over ``n_bootstrap`` stratified resamples (members and non-members drawn separately)."""
    if n_bootstrap == 0:
        return None
    rng = np.random.default_rng(seed)
    n_pos, n_neg = len(pi), len(ni)
    values: dict[str, list[np.ndarray]] = {"auc": [], **{fpr_key(f): [] for f in fprs}}
    # Chunk the resamples so the (chunk, U) histograms stay around 16 MB.
    chunk = max(1, min(n_bootstrap, 2_000_000 // max(u, n_pos + n_neg)))
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        offsets = (np.arange(b) * u)[:, None]
        pos_draw = pi[rng.integers(0, n_pos, size=(b, n_pos))] + offsets
        neg_draw = ni[rng.integers(0, n_neg, size=(b, n_neg))] + offsets
        pos_hist = np.bincount(pos_draw.ravel(), minlength=b * u).reshape(b, u).astype(float)
        neg_hist = np.bincount(neg_draw.ravel(), minlength=b * u).reshape(b, u).astype(float)
        tp, fp = _rates(pos_hist, neg_hist)
        values["auc"].append(_auc(tp, fp, n_pos, n_neg))
        for f in fprs:
            values[fpr_key(f)].append(_tpr_at(tp, fp, n_pos, n_neg, f))
        done += b
    return {name: np.concatenate(parts) for name, parts in values.items()}
