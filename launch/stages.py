"""Which stages of a run are still valid, decided before any work from the stage records.

Owns: what each stage's result depends on, and the decision per stage — ``new``, ``reuse``, ``redo`` (with the
reasons, printed), ``resume`` (training from a checkpoint of the same inputs) — or a refusal.

Each stage declares the config keys its result depends on (``KEYED``: a change makes it stale) and the ones it
records but that change only speed (``FREE``: micro-batch size, threads, eval batch sizes). Its inputs are the
digests of the files it reads and the ``output`` digests of the stages before it, so a stage is redone exactly
when something it read changed, and everything downstream follows.

Sensitive: a trained model is a release recorded in the run's privacy ledger. Redoing training in place would
either drop that release from the budget or count two models under one name, so a run dir whose model,
checkpoints or ledger came from other inputs is refused (name the run anew) instead of retrained.
``config.resolved.yaml`` is written from the records, so it always says what produced the results beside it.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import privtune
from privtune.atomic import atomic_write_text
from privtune.errors import UserError
from privtune.fingerprint import StageRecord, digest, file_digest, read_record, stamp, tree_digest
from privtune.launch.config import RunConfig
from privtune.launch.rundir import RESOLVED

GENERATED = ("customersim", "synbio")

# stage -> (keyed prefixes, free keys). A prefix ending in "." covers a whole section.
KEYED = {
    "data": ("data.", "model.name"),
    "model": ("model.", "train.", "privacy.", "seed", "performance.precision"),
    "eval": ("eval.", "seed", "data.max_length", "model.", "train.method"),
}
FREE = {
    "data": (),
    "model": ("train.checkpoint_every", "train.self_check_every", "performance.micro_batch_size",
              "performance.num_threads", "performance.parallel"),
    "eval": ("eval.batch_size", "eval.exposure_batch_size", "performance.num_threads"),
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def stage_config(stage: str, cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keyed, free) config values of ``stage``, as dotted keys."""
    flat = flatten(cfg.model_dump(mode="json"))
    free = {k: v for k, v in flat.items() if k in FREE[stage]}
    keyed = {k: v for k, v in flat.items() if _matches(k, KEYED[stage]) and k not in free}
    return keyed, free


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def data_inputs(cfg: RunConfig) -> dict[str, str | None]:
    from privtune.trainers.model_ids import tokenizer_digest

    inputs: dict[str, str | None] = {"tokenizer": tokenizer_digest(cfg.model.name)}
    if cfg.data.source in GENERATED:  # the corpus is a function of the generator code and Faker's data
        inputs["generator"] = digest({"privtune": privtune.__version__, "faker": _version("faker")})
    else:
        source = Path(cfg.data.source).expanduser()
        inputs["source"] = tree_digest(source) if source.is_dir() else file_digest(source)
    return inputs


def wanted(stage: str, cfg: RunConfig, inputs: dict[str, str | None]) -> StageRecord:
    keyed, free = stage_config(stage, cfg)
    return StageRecord(stage=stage, config=keyed, inputs=inputs, free=free)


def finished(want: StageRecord, *, output: str | None, summary: dict | None = None) -> StageRecord:
    return StageRecord(stage=want.stage, config=want.config, inputs=want.inputs, free=want.free, output=output,
                       summary=summary or {}, finished_at=stamp())


@dataclass
class StagePlan:
    action: str  # new | reuse | redo | resume
    reasons: list[str] = field(default_factory=list)
    record: StageRecord | None = None  # the existing record, when there is one


def training_artifacts(run_dir: Path) -> list[str]:
    """What a training run leaves that a redo would lose or contradict: the model, checkpoints, ledger entries."""
    found = []
    if (run_dir / "model").is_dir():
        found.append("model/")
    if any((run_dir / "checkpoints").glob("step-*")):
        found.append("checkpoints/")
    ledger = run_dir / "ledger.json"
    if ledger.exists():
        try:
            if json.loads(ledger.read_text()).get("entries"):
                found.append("ledger.json")
        except (OSError, json.JSONDecodeError):
            found.append("ledger.json")
    return found


def _refuse(run_dir: Path, what: str, reasons: list[str]):
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    raise UserError(f"run dir {run_dir} holds {what} made with other inputs ({shown})",
                    "give this run another name (name=...) or delete the old run dir")


def _checkpoint_key(run_dir: Path) -> tuple[str | None, str | None]:
    from privtune.trainers.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None, None
    extra = json.loads((ckpt / "extra.json").read_text())
    return ckpt.name, extra.get("train_key")


def plan_run(cfg: RunConfig) -> dict[str, StagePlan]:
    """The decision for the data and train stages (eval is decided once training is done). Refuses conflicts."""
    run_dir = cfg.run_dir
    plans: dict[str, StagePlan] = {}
    if not run_dir.exists():
        return {"data": StagePlan("new"), "model": StagePlan("new")}
    if not (run_dir / RESOLVED).exists():
        raise UserError(f"{run_dir} exists but is not a privtune run dir", "choose another name or output_dir")
    trained = training_artifacts(run_dir)
    data = read_record(run_dir / "data")
    want = wanted("data", cfg, data_inputs(cfg))
    if data is not None and data.key == want.key:
        plans["data"] = StagePlan("reuse", record=data)
    else:
        reasons = data.differences(want) if data is not None else ["no prepared data"]
        if trained:
            _refuse(run_dir, f"a training run ({', '.join(trained)}) on data", reasons)
        plans["data"] = StagePlan("redo", reasons, data)
    if cfg.train.method == "none":
        return plans
    if plans["data"].action != "reuse":
        plans["model"] = StagePlan("new")
        return plans
    model = read_record(run_dir / "model")
    want = train_wanted(cfg, data)
    if model is not None:
        if model.key != want.key:
            _refuse(run_dir, "a trained model", model.differences(want))
        plans["model"] = StagePlan("reuse", record=model)
        return plans
    name, key = _checkpoint_key(run_dir)
    if name is not None:
        if key != want.key:
            _refuse(run_dir, f"checkpoints ({name})", ["they were written by a training with other settings or data"])
        plans["model"] = StagePlan("resume", [f"from {name}"])
    elif "ledger.json" in trained:
        _refuse(run_dir, "a privacy ledger of an earlier training", ["that training stopped before its first checkpoint"])
    else:
        plans["model"] = StagePlan("new")
    return plans


def train_wanted(cfg: RunConfig, data: StageRecord) -> StageRecord:
    from privtune.trainers.model_ids import model_digest

    return wanted("model", cfg, {"data": data.output, "base_model": model_digest(cfg.model.name)})


def eval_wanted(cfg: RunConfig, run_dir: Path) -> StageRecord:
    from privtune.trainers.model_ids import model_digest

    data = read_record(run_dir / "data")
    model = read_record(run_dir / "model") if cfg.train.method != "none" else None
    return wanted("eval", cfg, {"data": data.output if data else None, "model": model.output if model else None,
                                "base_model": model_digest(cfg.model.name)})


def plan_eval(cfg: RunConfig, run_dir: Path) -> tuple[StagePlan, StageRecord]:
    want = eval_wanted(cfg, run_dir)
    have = read_record(run_dir / "eval")
    if have is None:
        return StagePlan("new"), want
    if have.key == want.key:
        return StagePlan("reuse", record=have), want
    return StagePlan("redo", have.differences(want), have), want


def write_resolved(cfg: RunConfig, run_dir: Path) -> None:
    """config.resolved.yaml = the command's config, with every stage's recorded settings laid over it, so it never
    disagrees with the results beside it (a reused model keeps the micro-batch size it was trained with)."""
    tree = cfg.model_dump(mode="json")
    for stage in ("data", "model", "eval"):
        record = read_record(run_dir / stage)
        if record is None:
            continue
        for key, value in {**record.config, **record.free}.items():
            node = tree
            *parents, last = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[last] = value
    atomic_write_text(run_dir / RESOLVED, yaml.safe_dump(tree, sort_keys=False))
