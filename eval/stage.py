"""The evaluation stage: score a run's model (and the base model) on its prepared data.

Owns: loading the prepared splits, choosing which examples to score, and writing ``eval/metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from privtune.eval.grid import grid, readings
from privtune.eval.scoring import score_tokens
from privtune.launch.config import RunConfig
from privtune.launch.progress import info
from privtune.launch.rundir import atomic_write_json


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _base_cache_path(cfg: RunConfig, run_dir: Path) -> Path:
    """Base-model scores depend only on the model, the tokenized data and which examples are scored."""
    digest = hashlib.sha256()
    digest.update(f"{cfg.model.name}|{cfg.model.dtype}|{cfg.eval.max_examples}|".encode())
    for split in ("train", "test"):
        digest.update((run_dir / "data" / f"tokens.{split}.jsonl").read_bytes())
    return Path(cfg.output_dir) / ".cache" / f"base-grid-{digest.hexdigest()[:20]}.json"


def evaluate_run(cfg: RunConfig, run_dir: Path, out_dir: Path) -> dict:
    from privtune.corpora import load_prepared
    from privtune.trainers.models import load_model, load_trained

    data = load_prepared(run_dir / "data")
    if cfg.performance.num_threads:
        torch.set_num_threads(cfg.performance.num_threads)
    limit = cfg.eval.max_examples
    splits = {"train": data.train, "test": data.test}
    selected = {name: (split.input_ids[:limit], split.sensitive[:limit]) for name, split in splits.items()}

    metrics = {
        "model": cfg.model.name,
        "method": cfg.train.method,
        "examples": {name: len(ids) for name, (ids, _) in selected.items()},
    }
    scored_tokens, scoring_seconds = 0, 0.0
    models = []
    if cfg.eval.base_model or cfg.train.method == "none":
        models.append(("base", lambda: load_model(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.seed)))
    if (run_dir / "model" / "COMPLETED").exists():
        models.append(("trained", lambda: load_trained(run_dir / "model", dtype=cfg.model.dtype, seed=cfg.seed)))
    for label, load in models:
        cache = _base_cache_path(cfg, run_dir) if label == "base" else None
        if cache is not None and cache.exists():
            metrics[label] = {"grid": json.loads(cache.read_text())}
            info("[bold]eval[/]  base model scores reused from the cache")
            continue
        model, tokenizer = load()
        model.to(_device())
        started = time.perf_counter()
        scores = {
            name: score_tokens(model, ids, sens, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id,
                               desc=f"{label} model, {name}")
            for name, (ids, sens) in selected.items()
        }
        scoring_seconds += time.perf_counter() - started
        scored_tokens += sum(s.num_tokens for s in scores.values())
        metrics[label] = {"grid": grid(scores)}
        if cache is not None:
            atomic_write_json(cache, metrics[label]["grid"])
        del model
    base_grid = metrics.get("base", {}).get("grid")
    for label in ("base", "trained"):
        if label in metrics:
            metrics[label]["readings"] = readings(metrics[label]["grid"], base_grid if label == "trained" else None)
    efficiency = run_dir / "model" / "efficiency.json"
    if efficiency.exists():
        metrics["cost"] = json.loads(efficiency.read_text())
        metrics["guarantee"] = json.loads((run_dir / "model" / "privtune.json").read_text())["guarantee"]
    seconds, tokens = scoring_seconds, scored_tokens
    metrics["scoring"] = {"seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    info(f"[bold]eval[/]  scored {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tok/s)")
    return metrics
