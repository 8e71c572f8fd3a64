"""The stage runner: ``privtune run`` = data → train → eval, each stage reused only while what it read is unchanged.

Owns: the order of stages. A run dir exists only once its data is prepared (see ``rundir.create_run_dir``); each
later stage publishes its folder atomically with its record (``privtune.fingerprint``), so a re-run reuses a
stage whose record matches, redoes one whose settings or inputs changed (and says why), and resumes an
interrupted one. What counts as a change is declared in ``stages``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from privtune.atomic import staged_dir
from privtune.errors import UserError
from privtune.fingerprint import file_digest, read_record, tree_digest, write_record
from privtune.launch.config import RunConfig
from privtune.launch.preflight import preflight
from privtune.launch.rundir import create_run_dir
from privtune.launch.stages import (
    data_inputs,
    finished,
    plan_eval,
    plan_run,
    train_wanted,
    wanted,
    write_resolved,
)
from privtune.process import current
from privtune.progress import info


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


def ensure_data(cfg: RunConfig) -> tuple[Path, bool]:
    """The run dir with prepared data; (path, True) if the prepared data was reused.

    Every stage is decided first (``stages.plan_run``): a run dir whose training came from other inputs is refused
    before any work; data whose settings or source changed is prepared again, and says why.
    """
    preflight(cfg)
    plan = plan_run(cfg)["data"]
    if plan.action == "reuse":
        info(f"[bold]data[/]  reused: {cfg.run_dir}/data matches this config and its sources")
        write_resolved(cfg, cfg.run_dir)
        return cfg.run_dir, True
    want = wanted("data", cfg, data_inputs(cfg))

    def populate(data_dir: Path) -> None:
        prepare_data(cfg, data_dir)
        write_record(data_dir, finished(want, output=tree_digest(data_dir)))

    if plan.action == "new":
        info(f"[bold]data[/]  preparing {cfg.data.source} for {cfg.model.name} → {cfg.run_dir}")
        create_run_dir(cfg, lambda tmp: populate(tmp / "data"))
    else:
        info(f"[bold]data[/]  {'; '.join(plan.reasons)}: preparing again")
        with staged_dir(cfg.run_dir / "data") as tmp:
            populate(tmp)
    write_resolved(cfg, cfg.run_dir)
    return cfg.run_dir, False


def run_eval_stage(cfg: RunConfig, run_dir: Path) -> dict:
    """Score on every rank, aggregate and publish ``eval/`` on the main process; reused only while its record
    matches (same eval settings, same data, same trained and base model)."""
    from privtune.eval.stage import evaluate_run, finish

    plan, want = plan_eval(cfg, run_dir)
    if plan.action == "reuse":
        info("[bold]eval[/]  reused: the scores match this model, data and eval settings")
        return json.loads((run_dir / "eval" / "metrics.json").read_text())
    if plan.action == "redo":
        info(f"[bold]eval[/]  {'; '.join(plan.reasons)}: scoring again")
    if not current().is_main:
        evaluate_run(cfg, run_dir, None, inputs=want.inputs)
        return {}
    with staged_dir(run_dir / "eval") as tmp:
        metrics = evaluate_run(cfg, run_dir, tmp, inputs=want.inputs)
        write_record(tmp, finished(want, output=file_digest(tmp / "metrics.json")))
    finish(run_dir)
    write_resolved(cfg, run_dir)
    return metrics


def run_eval_shard(cfg: RunConfig, run_dir: Path, shard: tuple[int, int]) -> None:
    """Score one independent shard of the eval (a Slurm array task); ``privtune eval RUN`` aggregates later."""
    from privtune.eval.stage import evaluate_run

    plan, want = plan_eval(cfg, run_dir)
    if plan.action == "reuse":
        info("[bold]eval[/]  reused: eval/ already matches this model, data and eval settings")
        return
    evaluate_run(cfg, run_dir, None, inputs=want.inputs, shard=shard)


def resource_line(cfg: RunConfig, state) -> str | None:
    """The resource plan's one-line memory summary for this launch (``privtune plan`` prints the whole table); None
    where it cannot plan (e.g. an architecture the planner does not know): training goes ahead all the same."""
    from privtune.trainers.resources import GIB, plan_resources

    world = state.world_size
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes, per_node = (world // per_node, per_node) if per_node and world % per_node == 0 else (1, world)
    cuda = state.device.type == "cuda"
    memory = torch.cuda.get_device_properties(state.device).total_memory / GIB if cuda else 80.0
    try:
        plan = plan_resources(cfg, nodes=nodes, gpus_per_node=per_node, gpu_memory_gib=memory)
    except UserError:
        return None
    where = "" if cuda else f" (a GPU-memory plan for this run's world size {world}; it runs on CPU)"
    return f"[bold]plan[/]  {plan.summary_line()}{where}"


def run_train_stage(cfg: RunConfig, run_dir: Path) -> None:
    """Train and publish ``model/`` (with ``efficiency.json``); resumes from the newest checkpoint of the same
    inputs (``stages.plan_run`` has refused checkpoints or a model of other inputs)."""
    from privtune.trainers.recipe import run_training

    if cfg.train.method == "none":
        return
    plan = plan_run(cfg)["model"]
    if plan.action == "reuse":
        info("[bold]train[/]  reused: model/ was trained with this config and data")
        write_resolved(cfg, run_dir)
        return
    want = train_wanted(cfg, read_record(run_dir / "data"))
    resuming = f" (resuming {plan.reasons[0]})" if plan.action == "resume" else ""
    info(f"[bold]train[/]  {cfg.train.method} on {cfg.model.name}{resuming}")
    state = current()
    if state.is_main and (line := resource_line(cfg, state)):
        info(line)
    if state.is_main:
        with staged_dir(run_dir / "model") as tmp:
            stats = run_training(cfg, run_dir, tmp, train_key=want.key)
            write_record(tmp, finished(want, output=tree_digest(tmp), summary={"steps": stats["steps"]}))
        write_resolved(cfg, run_dir)
    else:  # other ranks train alongside; only the main process publishes the model
        with tempfile.TemporaryDirectory() as tmp:
            run_training(cfg, run_dir, Path(tmp), train_key=want.key)
    state.barrier()


def run_pipeline(cfg: RunConfig) -> dict:
    started = time.perf_counter()
    state = current()
    with state.main_first():  # rank 0 prepares the data, the others then find it
        run_dir, _ = ensure_data(cfg)
    run_train_stage(cfg, run_dir)
    metrics = run_eval_stage(cfg, run_dir)
    if not state.is_main:
        return {"rank": state.rank}
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    return metrics
