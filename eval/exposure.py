"""Canary exposure (Secret Sharer, Carlini et al. 2019): how far the model ranks a planted secret above chance.

Owns: turning the candidates' scores into a rank and an exposure — exact ranks with ties, the skew-normal
extrapolation, the choice between them — and the cross-check of every result. Scoring the candidates (the
candidate space, the shared-prefix forwards, the KV-cache digit trie) is ``privtune.eval.candidates``'.

Definitions:

- **Candidates** R and their **score** (full-text log-perplexity, nats): see ``privtune.eval.candidates``.
- **Rank**: 1-based, ascending NLL. **Ties** (|NLL difference| <= ``tie_atol``, default 1e-3 nats; float32 noise
  between batch shapes and cached / uncached forwards reaches ~7e-4 nats on the embedded model) are split:
  ``rank`` is the mid-rank ``1 + #better + #tied / 2``, the expected rank of the secret when an attacker breaks
  ties at random; ``rank_best`` (``1 + #better``) and ``rank_worst`` (``1 + #better + #tied``) bound it. A model
  with uniform output therefore gets ``exposure ≈ 1`` bit, not the maximum: counting only strictly better
  candidates would report a model that knows nothing as fully exposed.
- **Exposure** = log2|R| - log2(rank); ``exposure_max`` / ``exposure_min`` use ``rank_best`` / ``rank_worst``.

Methods:

- ``exact``: every candidate is scored (by the digit trie where the tokenizer splits digits, else batched; see
  ``privtune.eval.candidates`` for the cost and memory of each).
- ``extrapolate`` (Carlini et al. §4.3): score a seeded sample of candidates (the secret excluded), fit a
  skew-normal to their NLLs (``scipy.stats.skewnorm``), and read the rank from the fitted CDF F at the secret's
  NLL: ``rank = 1 + (|R| - 1) F(nll)``, so the exposure is comparable to the exact one and at most log2|R|.
  ``exposure_tail = -log2 F(nll)`` is the paper's unbounded estimate (it exceeds log2|R| when the secret lies
  beyond every candidate). The fit's own error grows into the tail: with 5000 samples of a skew-normal, the
  standard deviation of ``-log2 F`` is ~0.16 bits at F = 1e-2, ~0.45 at 1e-4, ~0.8 at 1e-6.
- ``auto``: exact when |R| <= 10^6 and the exact pass forwards at most ``max_exact_tokens`` tokens (default
  200 000, a CPU-sized budget for the embedded model: docs/performance-notes.md); else extrapolate. The limit is
  a token count, not a device check, so one config picks the same method on every machine; raise it for GPU
  runs (the default 6-digit canary "My ID is {secret}." costs 1.11 M tokens exactly, 30 k extrapolated).

Every result is cross-checked: the secret's NLL from the chosen path must match a plain, cache-free forward of
the canary text, or the function raises (a cache layout this code does not handle would otherwise give
silently wrong ranks).

Privacy unit: the canary (its ``repetitions`` copies are one secret). Sensitive: the secret digits. Results carry
``canary_id`` and numbers only, never the secret.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from privtune.eval.candidates import (
    CandidateLayout,
    candidate_layout,
    candidate_nlls,
    encode,
    full_nll,
    scoring_cost,
)
from privtune.eval.scoring import eval_mode

__all__ = [
    "DEFAULT_MAX_EXACT_TOKENS",
    "DEFAULT_SAMPLE_SIZE",
    "DEFAULT_TIE_ATOL",
    "EXACT_LIMIT",
    "METHODS",
    "CandidateLayout",
    "canary_exposure",
    "candidate_layout",
    "candidate_nlls",
    "exposure_cost",
    "exposure_from_nlls",
    "extrapolated_exposure",
]

EXACT_LIMIT = 10**6
DEFAULT_MAX_EXACT_TOKENS = 200_000
DEFAULT_SAMPLE_SIZE = 5_000
DEFAULT_TIE_ATOL = 1e-3
METHODS = ("auto", "exact", "extrapolate")


def exposure_cost(tokenizer, canary, *, sample_size: int = DEFAULT_SAMPLE_SIZE) -> dict:
    """Tokens each method would forward (after the shared prefix), and the exact scorer that would run."""
    return scoring_cost(candidate_layout(tokenizer, canary), canary.secret_digits, sample_size)


# ---------------------------------------------------------------------------------------------------------------
# From scores to exposure


def exposure_from_nlls(nlls: np.ndarray, secret_index: int, *, tie_atol: float = DEFAULT_TIE_ATOL) -> dict:
    """Exact rank and exposure of candidate ``secret_index`` among ``nlls`` (one per candidate).

    Returns ``{"candidates", "log_perplexity", "rank", "rank_best", "rank_worst", "exposure", "exposure_max",
    "exposure_min", "ties"}`` with the tie rule of the module docstring.
    """
    nlls = np.asarray(nlls, dtype=np.float64)
    secret = nlls[secret_index]
    better = int(np.count_nonzero(nlls < secret - tie_atol))
    tied = int(np.count_nonzero(np.abs(nlls - secret) <= tie_atol)) - 1  # the secret itself is not a tie
    size = len(nlls)
    rank = 1.0 + better + tied / 2.0
    log_size = math.log2(size)
    return {
        "candidates": size,
        "log_perplexity": float(secret),
        "rank": rank,
        "rank_best": 1 + better,
        "rank_worst": 1 + better + tied,
        "exposure": log_size - math.log2(rank),
        "exposure_max": log_size - math.log2(1 + better),
        "exposure_min": log_size - math.log2(1 + better + tied),
        "ties": tied,
    }


def extrapolated_exposure(sample_nlls: np.ndarray, secret_nll: float, candidates: int) -> dict:
    """Rank and exposure from a skew-normal fit to the NLLs of sampled candidates (Carlini et al. §4.3).

    Returns ``{"candidates", "log_perplexity", "rank", "exposure", "exposure_tail", "sample_size",
    "sample_fraction_below", "skewnorm": {"a", "loc", "scale", "ks"}}``; ``exposure_tail`` is ``-log2 F`` or
    ``None`` where F underflows to 0.
    """
    from scipy import stats

    sample = np.asarray(sample_nlls, dtype=np.float64)
    if sample.size < 10:
        raise ValueError(f"a skew-normal fit needs at least 10 sampled candidates, got {sample.size}")
    a, loc, scale = stats.skewnorm.fit(sample)
    log_cdf = float(stats.skewnorm.logcdf(secret_nll, a, loc, scale))
    cdf = math.exp(log_cdf) if math.isfinite(log_cdf) else 0.0
    rank = 1.0 + (candidates - 1) * cdf
    ks = float(stats.kstest(sample, "skewnorm", args=(a, loc, scale)).statistic)
    return {
        "candidates": candidates,
        "log_perplexity": float(secret_nll),
        "rank": rank,
        "exposure": math.log2(candidates) - math.log2(rank),
        "exposure_tail": -log_cdf / math.log(2) if math.isfinite(log_cdf) else None,
        "sample_size": int(sample.size),
        "sample_fraction_below": float(np.mean(sample < secret_nll)),
        "skewnorm": {"a": float(a), "loc": float(loc), "scale": float(scale), "ks": ks},
    }


def _check_secret(model, tokenizer, canary, got: float, *, device: torch.device) -> None:
    ids = encode(tokenizer, [canary.text])[0]
    with torch.inference_mode(), eval_mode(model):
        want = float(full_nll(model, [ids], batch_size=1, device=device)[0])
    low_precision = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tolerance = (0.5 + 1e-2 * abs(want)) if low_precision else (1e-3 + 1e-4 * abs(want))
    if not abs(got - want) <= tolerance:
        raise RuntimeError(
            f"canary {canary.canary_id}: the secret's NLL from the shared-prefix scorer ({got:.6f}) differs from a "
            f"plain forward ({want:.6f}): this model's KV cache layout is not supported by the shared-prefix "
            f"scorer ({type(model).__name__}); report the model class"
        )


def canary_exposure(
    model,
    tokenizer,
    canary,
    *,
    batch_size: int = 512,
    method: str = "auto",
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    max_exact_tokens: int | None = DEFAULT_MAX_EXACT_TOKENS,
    tie_atol: float = DEFAULT_TIE_ATOL,
) -> dict:
    """Exposure of one canary under ``model`` (definitions and methods in the module docstring).

    ``batch_size`` rows per forward; ``sample_size`` candidates for the extrapolation, drawn with ``seed``;
    ``max_exact_tokens`` the cost above which ``auto`` extrapolates (``None``: no limit up to |R| = 10^6).

    Returns ``{"canary_id", "secret_digits", "candidates", "method" ("exact" | "extrapolate"), "scorer"
    ("digit-trie" | "batched"), "sample_size" (None for exact), "log_perplexity" (secret, nats), "rank",
    "rank_best", "rank_worst", "exposure", "exposure_max", "exposure_min", "ties" (exact only, else None),
    "exposure_tail", "sample_fraction_below", "skewnorm" (extrapolate only, else None), "forward_tokens",
    "exact_tokens" (what exact costs), "seconds", "tie_atol"}``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if sample_size < 10:
        raise ValueError(f"sample_size={sample_size} is too small for a skew-normal fit (at least 10)")
    started = time.perf_counter()
    device = next(model.parameters()).device
    layout = candidate_layout(tokenizer, canary)
    cost = scoring_cost(layout, canary.secret_digits, sample_size)
    space = canary.candidates_size()
    secret_index = int(canary.secret)
    if method == "auto":
        cheap = max_exact_tokens is None or cost["exact_tokens"] <= max_exact_tokens
        method = "exact" if space <= EXACT_LIMIT and (cheap or sample_size + 1 >= space) else "extrapolate"

    base = {"canary_id": canary.canary_id, "secret_digits": canary.secret_digits, "candidates": space,
            "method": method, "exact_tokens": cost["exact_tokens"], "tie_atol": tie_atol}
    if method == "exact":
        nlls, info = candidate_nlls(model, tokenizer, canary, batch_size=batch_size, layout=layout)
        result = {**base, **exposure_from_nlls(nlls, secret_index, tie_atol=tie_atol), "sample_size": None,
                  "exposure_tail": None, "sample_fraction_below": None, "skewnorm": None}
    else:
        rng = np.random.default_rng(seed)
        draw = rng.choice(space - 1, size=min(sample_size, space - 1), replace=False)
        draw = np.sort(draw + (draw >= secret_index))  # skip the secret
        nlls, info = candidate_nlls(model, tokenizer, canary, batch_size=batch_size,
                                    indices=np.concatenate([[secret_index], draw]), layout=layout)
        fit = extrapolated_exposure(nlls[1:], float(nlls[0]), space)
        result = {**base, **fit, "rank_best": fit["rank"], "rank_worst": fit["rank"],
                  "exposure_max": fit["exposure"], "exposure_min": fit["exposure"], "ties": None}
    _check_secret(model, tokenizer, canary, result["log_perplexity"], device=device)
    result.update(scorer=info["scorer"], forward_tokens=info["forward_tokens"],
                  seconds=round(time.perf_counter() - started, 3))
    return result
