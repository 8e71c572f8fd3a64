"""The privacy measures of the eval stage beyond the 2×2 grid: membership inference, canary exposure, extraction.

Owns: running ``eval.mia``, ``eval.exposure`` and ``eval.extraction`` on a run's models with the settings of
``EvalConfig``, on the main process after the grid's per-token scores are merged.

- membership inference: members = scored training examples (canary copies excluded), non-members = scored test
  examples; every statistic on whole examples and on sensitive tokens only; the trained model's reference
  statistic uses the base model. One ROC curve per attack is kept (down-sampled) for the report's plot.
- canary exposure: every canary, under every scored model (the base model is the no-memorization baseline).
- extraction: greedy continuation from the prefix before each sensitive span of the scored training records.

The base model's exposure and extraction depend only on the model, the data and the eval settings, so the runs of a
sweep that share them compute them once (``runs/.cache/base-*.measures-*.json``).

Sensitive: extraction continuations may contain training PII; only match rates are stored, never the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from privtune.atomic import atomic_write_json
from privtune.eval.config import EvalRun
from privtune.eval.scoring import TokenScores
from privtune.progress import info

ROC_POINTS = 200


def _curve(members: np.ndarray, nonmembers: np.ndarray) -> dict:
    from privtune.eval.stats import roc_curve

    curve = roc_curve(members, nonmembers)
    keep = np.unique(np.linspace(0, len(curve["fpr"]) - 1, min(ROC_POINTS, len(curve["fpr"]))).astype(int))
    return {"fpr": curve["fpr"][keep].round(6).tolist(), "tpr": curve["tpr"][keep].round(6).tolist()}


def membership(cfg: EvalRun, scores: dict[str, dict[str, TokenScores]], records: dict[str, list]) -> dict:
    """``scores[label][split]``; ``records[split]`` the scored records in the same order."""
    from privtune.eval.mia import MIAInputs, attack_scores, membership_inference

    out = {}
    for label, by_split in scores.items():
        reference = scores.get("base") if label == "trained" else None
        members = MIAInputs.from_scores(by_split["train"], records["train"],
                                        reference=reference["train"] if reference else None)
        nonmembers = MIAInputs.from_scores(by_split["test"], records["test"], exclude_canaries=False,
                                           reference=reference["test"] if reference else None)
        if len(members) < 2 or len(nonmembers) < 2:
            continue
        result = membership_inference(members, nonmembers, n_bootstrap=cfg.eval.mia_bootstrap, seed=cfg.seed)
        curves = {}
        for scope in ("example", "sensitive"):
            pos, neg = attack_scores(members, scope=scope), attack_scores(nonmembers, scope=scope)
            for stat in pos:
                p, n = np.asarray(pos[stat], float), np.asarray(neg[stat], float)
                p, n = p[np.isfinite(p)], n[np.isfinite(n)]
                if p.size and n.size:
                    curves[f"{scope}/{stat}"] = _curve(p, n)
        result["roc"] = curves
        out[label] = result
    return out


def exposure_and_extraction(cfg: EvalRun, loaders, canaries, train_records, *,
                            base_cache: Path | None = None) -> tuple[dict, dict]:
    """Both measures for every model; the base model's come from ``base_cache`` when an earlier run wrote it."""
    from privtune.eval.exposure import canary_exposure
    from privtune.eval.extraction import extract_spans

    exposure, extraction = {}, {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for label, load in loaders:
        if not (cfg.eval.exposure and canaries) and not cfg.eval.extraction_max_spans:
            break
        if label == "base" and base_cache is not None and base_cache.exists():
            cached = json.loads(base_cache.read_text())
            exposure.update({"base": cached["exposure"]} if cached["exposure"] else {})
            extraction.update({"base": cached["extraction"]} if cached["extraction"] else {})
            info("[bold]eval[/]  base model: exposure and extraction from an earlier run's cache")
            continue
        model, tokenizer = load()
        model.to(device)
        if cfg.eval.exposure and canaries:
            exposure[label] = [canary_exposure(model, tokenizer, canary, batch_size=cfg.eval.exposure_batch_size,
                                               method=cfg.eval.exposure_method, seed=cfg.seed,
                                               sample_size=cfg.eval.exposure_sample_size)
                               for canary in canaries]
            best = max(e["exposure"] for e in exposure[label])
            info(f"[bold]eval[/]  {label} model: canary exposure {best:.2f} bits of {np.log2(canaries[0].candidates_size()):.1f}")
        if cfg.eval.extraction_max_spans:
            real = [r for r in train_records if r.canary_id is None]
            extraction[label] = extract_spans(model, tokenizer, real, batch_size=cfg.eval.batch_size,
                                              max_spans=cfg.eval.extraction_max_spans, seed=cfg.seed,
                                              max_length=cfg.data.max_length)
        del model
        if label == "base" and base_cache is not None:
            atomic_write_json(base_cache, {"exposure": exposure.get("base"), "extraction": extraction.get("base")})
    return exposure, extraction


def run_measures(cfg: EvalRun, run_dir: Path, loaders, scores, data, limit, *,
                 base_cache: Path | None = None) -> dict:
    records = {"train": data.train_records[:limit], "test": data.test_records[:limit]}
    out = {}
    if cfg.eval.mia:
        out["mia"] = membership(cfg, scores, records)
    exposure, extraction = exposure_and_extraction(cfg, loaders, data.canaries, records["train"],
                                                   base_cache=base_cache)
    if exposure:
        out["exposure"] = exposure
    if extraction:
        out["extraction"] = extraction
    return out
