"""The evaluation stage: score a run's models on its prepared data, sharded across processes, resumable.

    privtune eval runs/quickstart-dp                          # one process
    torchrun --nproc_per_node 2 -m privtune eval RUN_DIR      # examples sharded over 2 processes
    privtune eval RUN_DIR --shard 3/8                         # one of 8 independent shards (a Slurm array task)

Owns: which models are scored (the base model and the run's trained model), splitting the examples across ranks,
writing per-example scores as they are computed (``eval/shards.py``), and aggregating them on rank 0 into
``eval/metrics.json`` plus merged ``eval/scores.<model>.<split>.jsonl``. An interrupted eval resumes from the
examples already written, with any number of processes.

Independent shards (``shard=(i, K)``, no process group: Slurm array tasks running at the same time) score the
examples ``i::K`` of the whole set, not of what is still pending — each task sees the others' parts appear while
it runs, so a split of the pending ones would overlap. They never drop part files (``prepare_shards`` did that
once, before they started) and do not aggregate: a later plain ``privtune eval RUN`` finds every example scored
(scoring any that a failed shard left) and aggregates.

Sensitive: scores of private training text; the metrics are aggregates, the per-example files stay private.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from privtune.atomic import staged_dir
from privtune.errors import UserError
from privtune.eval.config import EvalRun
from privtune.eval.grid import grid, readings
from privtune.eval.measures import run_measures
from privtune.eval.scoring import iter_scored
from privtune.eval.shards import PARTS, PartWriter, merge, part_path, read_done, read_rows, write_rows
from privtune.fingerprint import RECORD, digest, read_record
from privtune.process import ProcessState, current
from privtune.progress import info, progress


def stage_inputs(cfg: EvalRun, run_dir: Path) -> dict[str, str | None]:
    """Digests of what this eval reads: the prepared data, the trained model (if any) and the base model's files."""
    from privtune.trainers.model_ids import model_digest

    data, model = read_record(run_dir / "data"), read_record(run_dir / "model")
    return {"data": data.output if data else None,
            "model": model.output if model and cfg.train.method != "none" else None,
            "base_model": model_digest(cfg.model.name)}


def _scores_key(cfg: EvalRun, inputs: dict, label: str) -> str:
    """Per-token scores depend only on the model's files, the prepared data, the dtype and which examples."""
    model = inputs["base_model"] if label == "base" else inputs["model"]
    return digest({"model": model, "data": inputs["data"], "dtype": cfg.model.dtype,
                   "max_examples": cfg.eval.max_examples})


def _base_cache_path(cfg: EvalRun, inputs: dict) -> Path:
    return Path(cfg.output_dir) / ".cache" / f"base-{_scores_key(cfg, inputs, 'base')[:20]}"


def _base_measures_path(cfg: EvalRun, inputs: dict) -> Path:
    """The base model's exposure and extraction: the scores' key plus every setting the two measures read."""
    e = cfg.eval
    settings = dict(exposure=e.exposure, method=e.exposure_method, sample=e.exposure_sample_size, seed=cfg.seed,
                    spans=e.extraction_max_spans, batch=e.batch_size, max_length=cfg.data.max_length,
                    canaries=cfg.data.canaries.model_dump() if cfg.data.canaries else None)
    scores = _base_cache_path(cfg, inputs)
    return scores.with_name(f"{scores.name}.measures-{digest(settings)[:12]}.json")


def _drop_stale_parts(run_dir: Path, label: str, key: str) -> None:
    """Part files of an interrupted eval are resumed only for the same model, data and examples."""
    marker = run_dir / PARTS / f"{label}.key"
    if marker.exists() and marker.read_text().strip() == key:
        return
    for stale in (run_dir / PARTS).glob(f"{label}.*.rank*.jsonl"):
        stale.unlink()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")


def _model_loaders(cfg: EvalRun, run_dir: Path) -> list[tuple[str, object]]:
    from privtune.trainers.models import load_model, load_trained

    loaders = []
    if cfg.eval.base_model or cfg.train.method == "none":
        loaders.append(("base", lambda: load_model(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.seed)))
    if (run_dir / "model" / RECORD).exists():
        loaders.append(("trained", lambda: load_trained(run_dir / "model", dtype=cfg.model.dtype, seed=cfg.seed)))
    return loaders


def prepare_shards(cfg: EvalRun, run_dir: Path) -> None:
    """Before independent shards start: drop part files of other models or data, once (they would race)."""
    inputs = stage_inputs(cfg, run_dir)
    for label, _ in _model_loaders(cfg, run_dir):
        _drop_stale_parts(run_dir, label, _scores_key(cfg, inputs, label))


def score_shards(cfg: EvalRun, run_dir: Path, splits: dict, proc: ProcessState, inputs: dict,
                 shard: tuple[int, int] | None = None) -> float:
    """Score this rank's (or this independent shard's) share of every (model, split) not yet scored; returns
    seconds spent scoring."""
    seconds = 0.0
    for label, load in _model_loaders(cfg, run_dir):
        if label == "base" and _base_cache_path(cfg, inputs).exists():  # scored by an earlier run
            continue
        key = _scores_key(cfg, inputs, label)
        if shard is not None:
            marker = run_dir / PARTS / f"{label}.key"
            if not marker.exists() or marker.read_text().strip() != key:
                raise UserError(f"{run_dir}: the eval's part files were not prepared for these models and data",
                                "submit the shards with `privtune eval RUN --slurm --shards K`, which prepares them")
        elif proc.rank == 0:
            _drop_stale_parts(run_dir, label, key)
        proc.barrier()
        if shard is None:
            pending = {split: [i for i in range(len(ids)) if i not in read_done(run_dir, label, split)]
                       for split, (ids, _) in splits.items()}
            mine = {split: idx[proc.rank :: proc.world_size] for split, idx in pending.items()}
            writer_rank = proc.rank
        else:
            index, count = shard
            mine = {split: [i for i in range(index, len(ids), count) if i not in read_done(run_dir, label, split)]
                    for split, (ids, _) in splits.items()}
            writer_rank = index
        proc.barrier()  # every rank has read what is done before any rank writes more (else the splits differ)
        if not any(mine.values()):
            continue
        model, tokenizer = load()
        model.to(proc.device)
        started = time.perf_counter()
        for split, indices in mine.items():
            writer = PartWriter(part_path(run_dir, label, split, writer_rank))
            with progress(total=len(indices), desc=f"eval {label} model, {split}", unit="ex") as bar:
                for rows in iter_scored(model, splits[split][0], indices, batch_size=cfg.eval.batch_size,
                                        pad_id=tokenizer.pad_token_id):
                    writer.write(rows)
                    bar.update(len(rows))
            writer.close()
        seconds += time.perf_counter() - started
        del model
    return seconds


def aggregate(cfg: EvalRun, run_dir: Path, splits: dict, out_dir: Path, data, limit, inputs: dict) -> dict:
    """Rank 0: merge the part files into per-model grids, readings and metrics.json."""
    metrics: dict = {
        "model": cfg.model.name,
        "method": cfg.train.method,
        "examples": {name: len(ids) for name, (ids, _) in splits.items()},
    }
    all_scores = {}
    for label, _ in _model_loaders(cfg, run_dir):
        cache = _base_cache_path(cfg, inputs) if label == "base" else None
        if cache is not None and cache.exists():
            scores = {split: merge(read_rows([cache / f"{split}.jsonl"]), sens) for split, (_, sens) in splits.items()}
        else:
            scores = {split: merge(read_done(run_dir, label, split), sens) for split, (_, sens) in splits.items()}
        all_scores[label] = scores
        metrics[label] = {"grid": grid(scores)}
        for split, token_scores in scores.items():
            with open(out_dir / f"scores.{label}.{split}.jsonl", "w") as f:
                for i, (nll, hit) in enumerate(zip(token_scores.nll, token_scores.hit, strict=True)):
                    f.write(json.dumps({"i": i, "nll_mean": float(nll.mean()) if nll.size else None,
                                        "tokens": int(nll.size), "hits": int(hit.sum())}) + "\n")
        if cache is not None and not cache.exists():
            with staged_dir(cache) as tmp:
                for split, token_scores in scores.items():
                    write_rows(tmp / f"{split}.jsonl", token_scores)
    base_grid = metrics.get("base", {}).get("grid")
    for label in ("base", "trained"):
        if label in metrics:
            metrics[label]["readings"] = readings(metrics[label]["grid"], base_grid if label == "trained" else None)
    metrics.update(run_measures(cfg, run_dir, _model_loaders(cfg, run_dir), all_scores, data, limit,
                                base_cache=_base_measures_path(cfg, inputs)))
    efficiency = run_dir / "model" / "efficiency.json"
    if efficiency.exists():
        metrics["cost"] = json.loads(efficiency.read_text())
        metrics["guarantee"] = json.loads((run_dir / "model" / "privtune.json").read_text())["guarantee"]
    return metrics


def evaluate_run(cfg: EvalRun, run_dir: Path, out_dir: Path | None, *, inputs: dict | None = None,
                 shard: tuple[int, int] | None = None) -> dict:
    """Score (all ranks) and aggregate (rank 0, into ``out_dir``). Returns metrics on rank 0, {} elsewhere.
    ``shard``: score that independent shard only, aggregate nothing, return {}."""
    from privtune.corpora import load_prepared

    proc = current()
    data = load_prepared(run_dir / "data")
    if cfg.performance.num_threads:
        torch.set_num_threads(cfg.performance.num_threads)
    limit = cfg.eval.max_examples
    splits = {name: (split.input_ids[:limit], split.sensitive[:limit])
              for name, split in (("train", data.train), ("test", data.test))}
    inputs = inputs if inputs is not None else stage_inputs(cfg, run_dir)
    if shard is not None:
        if proc.world_size > 1:
            raise UserError("--shard runs as one process", "start it without torchrun (one shard per Slurm task)")
        seconds = score_shards(cfg, run_dir, splits, proc, inputs, shard=shard)
        info(f"[bold]eval[/]  shard {shard[0]}/{shard[1]} scored in {seconds:.1f} s; `privtune eval {run_dir}` "
             "aggregates once every shard is done")
        return {}
    seconds = score_shards(cfg, run_dir, splits, proc, inputs)
    proc.barrier()
    if proc.rank != 0:
        return {}
    metrics = aggregate(cfg, run_dir, splits, out_dir, data, limit, inputs)
    metrics["scoring"] = {"seconds_rank0": round(seconds, 2), "world_size": proc.world_size}
    # What these numbers are of: the eval settings and the digests of the data and models scored.
    metrics["provenance"] = {"eval": cfg.eval.model_dump(mode="json"), "inputs": inputs}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if seconds:
        n = proc.world_size
        info(f"[bold]eval[/]  scored in {seconds:.1f} s ({n} process{'es' if n > 1 else ''})")
    return metrics


def finish(run_dir: Path) -> None:
    """Drop the part files once eval/ is published."""
    shutil.rmtree(run_dir / PARTS, ignore_errors=True)
