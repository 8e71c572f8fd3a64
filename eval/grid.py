"""Paper A's 2×2 grid: {train, test} × {sensitive, non-sensitive} per-token NLL and greedy hit rate.

Owns: aggregating per-token scores into the grid, the three privacy readings and the utility reading, and
rendering them as a table.

Readings (notes/papers.md):
- privacy risk = how well the model predicts the sensitive tokens of its *training* set (lower NLL = more
  memorized). Reported three ways: the absolute train-sensitive NLL; its drop from the base model (``gain``); and
  the gap test-sensitive − train-sensitive NLL (what it learned about *these* people beyond the format).
- utility = NLL and perplexity on the non-sensitive tokens of the *test* set.
"""

from __future__ import annotations

import math

import numpy as np

from privtune.eval.scoring import TokenScores

CELLS = (("train", True), ("train", False), ("test", True), ("test", False))
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5)


def cell_name(split: str, sensitive: bool) -> str:
    return f"{split}_{'sensitive' if sensitive else 'nonsensitive'}"


def _summary(nll: np.ndarray, hit: np.ndarray) -> dict:
    if nll.size == 0:
        return {"tokens": 0, "nll_mean": None, "hit_rate": None, "nll_median": None,
                **{f"nll_q{int(q * 100):02d}": None for q in QUANTILES}}
    quantiles = np.quantile(nll.astype(np.float64), QUANTILES)
    return {
        "tokens": int(nll.size),
        "nll_mean": float(nll.astype(np.float64).mean()),
        "nll_median": float(np.median(nll)),
        "hit_rate": float(hit.mean()),
        **{f"nll_q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)},
    }


def grid(scores: dict[str, TokenScores]) -> dict:
    """``scores`` maps split name ("train", "test") to its token scores; returns one summary per cell."""
    out = {}
    for split, sensitive in CELLS:
        nll, hit, sens = scores[split].flat()
        keep = sens if sensitive else ~sens
        out[cell_name(split, sensitive)] = _summary(nll[keep], hit[keep])
    return out


def readings(model_grid: dict, base_grid: dict | None = None) -> dict:
    """Privacy and utility readings of one model, relative to the base model when given."""
    train_s = model_grid["train_sensitive"]["nll_mean"]
    test_s = model_grid["test_sensitive"]["nll_mean"]
    test_ns = model_grid["test_nonsensitive"]["nll_mean"]
    out = {
        "privacy_train_sensitive_nll": train_s,
        "privacy_train_test_gap": None if train_s is None or test_s is None else test_s - train_s,
        "utility_test_nonsensitive_nll": test_ns,
        "utility_test_nonsensitive_ppl": None if test_ns is None else math.exp(min(test_ns, 700.0)),
    }
    if base_grid is not None:
        base_s = base_grid["train_sensitive"]["nll_mean"]
        out["privacy_gain_over_base"] = None if train_s is None or base_s is None else base_s - train_s
    return out


def render_grid(title: str, model_grid: dict):
    """A rich table: rows = split, columns = sensitive / non-sensitive, cells = NLL (hit rate)."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    table.add_column("split")
    table.add_column("sensitive: NLL  (hit)", justify="right")
    table.add_column("non-sensitive: NLL  (hit)", justify="right")
    table.add_column("tokens (s / ns)", justify="right")
    for split in ("train", "test"):
        s, ns = model_grid[cell_name(split, True)], model_grid[cell_name(split, False)]
        table.add_row(split, _fmt(s), _fmt(ns), f"{s['tokens']} / {ns['tokens']}")
    return table


def _fmt(cell: dict) -> str:
    if not cell["tokens"]:
        return "—"
    return f"{cell['nll_mean']:.3f}  ({cell['hit_rate']:.1%})"
