"""Membership inference on whole examples and on their sensitive tokens only, from per-token scores.

Owns: the per-example attack statistics and their metrics (AUC, TPR at low FPR, bootstrap CIs via
``privtune.eval.stats``). Everything here is pure numpy over arrays the scorer already produced
(``TokenScores`` from ``privtune.eval.scoring``: one NLL per predicted token, aligned with that token's sensitive
flag), so no text is ever scored one at a time and the eval stage can shard the forward passes as it likes.

Statistics (each oriented so that a *higher* score means "more likely a member"):

- ``loss``       -mean token NLL (Yeom et al. 2018).
- ``zlib``       -(NLL sum / zlib-compressed length of the text in bytes) (Carlini et al. 2021): the model's
                 surprise relative to a generic compressor's, so texts that are merely simple do not look
                 memorized.
- ``min_k``      mean of the lowest k% token log-probabilities, k = 20% by default (Shi et al. 2024): the
                 count is ``max(1, floor(k * n))`` of the ``n`` tokens in scope.
- ``reference``  mean reference NLL - mean target NLL, i.e. minus the log of the perplexity ratio
                 target / reference (Carlini et al. 2021; Paper A's "gain over the base model" per example).
                 Needs the reference (base) model's token NLLs on the same tokens.

Scopes: ``example`` uses every predicted token; ``sensitive`` only the tokens whose sensitive flag is set (the
flag of the *predicted* token: ``nll[t]`` scores token t+1 and ``sensitive[t]`` is that token's flag, as in
``scoring.py``); ``zlib`` then compresses the example's sensitive characters (its span texts joined by newlines).
An example with no token in scope has no score (NaN) and is left out of that scope's metrics; the counts used
are reported.

Members are training examples *without* canary copies (canaries are measured by exposure, and their repeated
copies would count one secret ten times); non-members are test examples.

Sensitive: the inputs are computed from private text and ``texts`` / ``sensitive_texts`` hold it in clear; the
outputs are aggregate metrics. Per-example scores (``attack_scores``) stay in the run directory.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privtune.eval.stats import DEFAULT_FPRS, roc_metrics

STATISTICS = ("loss", "zlib", "min_k", "reference")
SCOPES = ("example", "sensitive")


@dataclass
class MIAInputs:
    """Per-example token scores of one population (members or non-members), aligned example by example.

    ``nll[i]`` and ``sensitive[i]`` are example i's arrays from ``TokenScores``; ``reference_nll[i]`` the
    reference model's NLLs on the *same* tokens; ``texts[i]`` the example's text and ``sensitive_texts[i]`` its
    sensitive characters, both only for ``zlib``.
    """

    nll: Sequence[np.ndarray]
    sensitive: Sequence[np.ndarray]
    texts: Sequence[str] | None = None
    sensitive_texts: Sequence[str] | None = None
    reference_nll: Sequence[np.ndarray] | None = None

    def __post_init__(self) -> None:
        n = len(self.nll)
        for name in ("sensitive", "texts", "sensitive_texts", "reference_nll"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"MIAInputs.{name} has {len(value)} examples, nll has {n}")
        for i in range(n):
            if len(self.sensitive[i]) != len(self.nll[i]):
                raise ValueError(f"example {i}: {len(self.sensitive[i])} sensitive flags for {len(self.nll[i])} NLLs")
            if self.reference_nll is not None and len(self.reference_nll[i]) != len(self.nll[i]):
                raise ValueError(
                    f"example {i}: reference model scored {len(self.reference_nll[i])} tokens, target "
                    f"{len(self.nll[i])}; the reference statistic needs the same tokenizer"
                )

    def __len__(self) -> int:
        return len(self.nll)

    @classmethod
    def from_scores(cls, scores, records=None, *, reference=None, exclude_canaries: bool = True) -> MIAInputs:
        """From ``TokenScores`` (and the matching ``Record`` list, same order and length; optional reference
        ``TokenScores``). Canary copies are dropped when ``exclude_canaries`` (needs ``records``)."""
        n = len(scores.nll)
        if records is not None and len(records) != n:
            raise ValueError(f"{len(records)} records for {n} scored examples; pass the records that were scored")
        if reference is not None and len(reference.nll) != n:
            raise ValueError(f"reference scores cover {len(reference.nll)} examples, target scores {n}")
        if exclude_canaries and records is None:
            raise ValueError("exclude_canaries needs the records (canary copies are recognised by canary_id)")
        keep = [i for i in range(n) if records is None or not exclude_canaries or records[i].canary_id is None]
        return cls(
            nll=[scores.nll[i] for i in keep],
            sensitive=[scores.sensitive[i] for i in keep],
            texts=None if records is None else [records[i].text for i in keep],
            sensitive_texts=None if records is None else ["\n".join(records[i].span_texts()) for i in keep],
            reference_nll=None if reference is None else [reference.nll[i] for i in keep],
        )


def zlib_length(texts: Sequence[str]) -> np.ndarray:
    """Bytes of ``zlib.compress`` (default level) of each text's UTF-8 encoding."""
    return np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)


def min_k_mean(logprobs: np.ndarray, k: float) -> float:
    """Mean of the ``max(1, floor(k * n))`` lowest values of ``logprobs`` (NaN when empty)."""
    if logprobs.size == 0:
        return math.nan
    count = max(1, int(math.floor(k * logprobs.size + 1e-9)))
    return float(np.partition(logprobs, count - 1)[:count].mean())


def attack_scores(inputs: MIAInputs, *, scope: str = "example", min_k: float = 0.2) -> dict[str, np.ndarray]:
    """Per-example scores of every statistic the inputs allow (higher = more likely member; NaN = no token in
    scope). ``zlib`` needs ``texts`` (scope ``example``) or ``sensitive_texts`` (scope ``sensitive``);
    ``reference`` needs ``reference_nll``."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: choose one of {', '.join(SCOPES)}")
    if not 0.0 < min_k <= 1.0:
        raise ValueError(f"min_k={min_k} must lie in (0, 1]")
    n = len(inputs)
    loss = np.full(n, np.nan)
    total = np.full(n, np.nan)
    mink = np.full(n, np.nan)
    ref = np.full(n, np.nan) if inputs.reference_nll is not None else None
    for i in range(n):
        nll = np.asarray(inputs.nll[i], dtype=np.float64)
        keep = np.asarray(inputs.sensitive[i], dtype=bool) if scope == "sensitive" else np.ones(len(nll), bool)
        if not keep.any():
            continue
        sel = nll[keep]
        loss[i] = -sel.mean()
        total[i] = sel.sum()
        mink[i] = min_k_mean(-sel, min_k)
        if ref is not None:
            ref[i] = np.asarray(inputs.reference_nll[i], dtype=np.float64)[keep].mean() - sel.mean()
    out = {"loss": loss}
    texts = inputs.texts if scope == "example" else inputs.sensitive_texts
    if texts is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["zlib"] = -total / zlib_length(texts)
    out["min_k"] = mink
    if ref is not None:
        out["reference"] = ref
    return out


def membership_inference(
    members: MIAInputs,
    nonmembers: MIAInputs,
    *,
    min_k: float = 0.2,
    scopes: Sequence[str] = SCOPES,
    fprs: Sequence[float] = DEFAULT_FPRS,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict:
    """Metrics of every statistic in every scope.

    Returns ``{"settings": {...}, <scope>: {<statistic>: roc_metrics(...) | None}}``: a statistic whose inputs
    are missing (no texts, no reference) is absent; one with fewer than one scored member or non-member in that
    scope is ``None``. ``roc_metrics`` keys: ``members``, ``nonmembers``, ``auc``, ``auc_ci``, ``tpr@<f>``,
    ``tpr@<f>_ci``, ``fpr_resolution``, ``bootstrap``, ``ci``.
    """
    out: dict = {
        "settings": {"min_k": min_k, "fprs": list(fprs), "bootstrap": n_bootstrap, "ci": ci, "seed": seed,
                     "members": len(members), "nonmembers": len(nonmembers)},
    }
    for scope in scopes:
        pos = attack_scores(members, scope=scope, min_k=min_k)
        neg = attack_scores(nonmembers, scope=scope, min_k=min_k)
        results: dict = {}
        for stat in STATISTICS:
            if stat not in pos or stat not in neg:
                continue
            p, q = pos[stat], neg[stat]
            p, q = p[np.isfinite(p)], q[np.isfinite(q)]
            if len(p) == 0 or len(q) == 0:
                results[stat] = None
                continue
            results[stat] = roc_metrics(p, q, fprs=fprs, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        out[scope] = results
    return out
