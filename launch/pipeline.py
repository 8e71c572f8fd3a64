"""The stage runner: ``privtune run`` = data → train → eval, each stage skipped once it finished.

Owns: the order of stages and their idempotence. A run dir exists only once its data is prepared (see
``rundir.create_run_dir``); each later stage publishes its folder atomically, so a re-run skips finished stages and
redoes an interrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from privtune.launch.config import RunConfig
from privtune.launch.errors import UserError
from privtune.launch.progress import info
from privtune.launch.rundir import check_existing_run, create_run_dir, mark_done, stage_done, staged_dir


def prepare_data(cfg: RunConfig, data_dir: Path) -> dict:
    """Build the corpus, split it, tokenize with per-token sensitive masks, and save it under ``data_dir``."""
    from privtune.corpora import build_corpus, save_prepared, split_corpus, tokenize
    from privtune.trainers.models import load_tokenizer

    corpus = build_corpus(cfg.data)
    train, test = split_corpus(corpus, test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    train_tok = tokenize(train, tokenizer, max_length=cfg.data.max_length)
    test_tok = tokenize(test, tokenizer, max_length=cfg.data.max_length)
    meta = {"source": corpus.source, "spans_origin": corpus.spans_origin, "tokenizer": cfg.model.name}
    return save_prepared(data_dir, train, test, train_tok, test_tok, corpus.canaries, meta)


def preflight(cfg: RunConfig) -> None:
    """Cheap checks of everything a run needs, so bad input fails before any work starts."""
    from privtune.trainers.models import resolve_model_source

    resolve_model_source(cfg.model.name)
    if cfg.data.source not in ("customersim", "synbio") and not Path(cfg.data.source).expanduser().exists():
        raise UserError(f"data source {cfg.data.source} does not exist",
                        "set data.source to a .jsonl or .csv file, a `datasets` directory, customersim or synbio")


def ensure_data(cfg: RunConfig) -> tuple[Path, bool]:
    """The run dir with prepared data; (path, True) if it already existed."""
    if check_existing_run(cfg):
        return cfg.run_dir, True
    preflight(cfg)
    info(f"[bold]data[/]  preparing {cfg.data.source} for {cfg.model.name} → {cfg.run_dir}")
    create_run_dir(cfg, lambda tmp: prepare_data(cfg, tmp / "data"))
    return cfg.run_dir, False


def run_eval_stage(cfg: RunConfig, run_dir: Path) -> dict:
    """Score on every rank, aggregate and publish ``eval/`` on the main process."""
    from privtune.eval.stage import evaluate_run, finish

    if stage_done(run_dir, "eval"):
        info("[bold]eval[/]  already done, skipping")
        return json.loads((run_dir / "eval" / "metrics.json").read_text())
    state = _distributed()
    if state is not None and not state.is_main_process:
        evaluate_run(cfg, run_dir, None)
        return {}
    with staged_dir(run_dir / "eval") as tmp:
        metrics = evaluate_run(cfg, run_dir, tmp)
        mark_done(tmp)
    finish(run_dir)
    return metrics


def run_train_stage(cfg: RunConfig, run_dir: Path) -> None:
    """Train and publish ``model/`` (with ``efficiency.json``); resumes from the newest checkpoint."""
    from privtune.trainers.recipe import run_training

    if cfg.train.method == "none" or stage_done(run_dir, "model"):
        if cfg.train.method != "none":
            info("[bold]train[/]  already done, skipping")
        return
    info(f"[bold]train[/]  {cfg.train.method} on {cfg.model.name}")
    state = _distributed()
    if state is None or state.is_main_process:
        with staged_dir(run_dir / "model") as tmp:
            stats = run_training(cfg, run_dir, tmp)
            mark_done(tmp, {"steps": stats["steps"]})
    else:  # other ranks train alongside; only the main process publishes the model
        with tempfile.TemporaryDirectory() as tmp:
            run_training(cfg, run_dir, Path(tmp))
    if state is not None:
        state.wait_for_everyone()


def _distributed():
    """accelerate's process state when launched with several processes (torchrun, srun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_pipeline(cfg: RunConfig) -> dict:
    started = time.perf_counter()
    state = _distributed()
    if state is None:
        run_dir, _ = ensure_data(cfg)
    else:
        with state.main_process_first():  # rank 0 prepares the data, the others then find it
            run_dir, _ = ensure_data(cfg)
    run_train_stage(cfg, run_dir)
    metrics = run_eval_stage(cfg, run_dir)
    if state is not None and not state.is_main_process:
        return {"rank": state.process_index}
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    return metrics
