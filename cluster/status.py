"""``privtune status RUN_DIR|SWEEP_DIR|JOB_ID [--json]``: where a run (or a sweep) stands, from its files and Slurm.

Owns: finding the run behind a target, and reading, never inventing, what it reports. A field that cannot be known
is None (rendered "—"), with a note saying why where that helps. ``gather`` reads, ``render`` formats,
``status_command`` is the CLI's body.

A job id leads to its run through Slurm's ``Comment=privtune:RUN_DIR`` (``privtune-sweep:SWEEP_DIR`` for a sweep's
array and report jobs; ``ARRAYID_TASK`` is that task's run); a job Slurm forgot is looked for in the run dirs and
sweeps under ``./runs`` (the default output_dir).

Sources (the run dir layout of launch/rundir.py, the Slurm records of launch/submit.py and cluster/render.py):

- stages: ``data/``, ``model/``, ``eval/`` exist only once the stage finished (staged folders); a model is
  "started" while its hidden staging folder, ``logs/train.jsonl`` or a checkpoint exists;
- step: the last line of ``logs/train.jsonl``, or ``model/privtune.json``'s ``steps`` once the model is out;
- total: ``model/privtune.json`` once finished; before, ``trainers.plan.training_steps`` on the ``train:`` section
  of ``config.resolved.yaml`` and the number of privacy units the trainer counted (``ledger.json``'s header, written
  before the first step; ``data/meta.json``'s training examples for unit=example before that): the planned total is
  not written anywhere until training ends;
- ε, δ: the last train log line while training; for a released model, ``compose_ledgers`` on ``ledger.json`` at the
  model card's δ and accountant (what ``privtune budget`` prints);
- last checkpoint: ``trainers.checkpoint.latest_checkpoint`` (``step-N/`` with its ``COMPLETED`` marker);
- the job: the newest line of ``slurm/jobs.jsonl`` (or the one the job id names); its state from
  ``scontrol show job`` (``cluster.slurm``), or, once Slurm forgot it, its last line in ``slurm/exits.jsonl``;
- its batch log (Slurm's ``StdOut``, else the recorded ``log``) and the rank logs of its newest torchrun launch
  per node (``slurm/ranks/<job>/node<N>/<launch>/attempt_<k>/<local_rank>/stderr.log``): a traceback or a
  ``privtune: error:`` line; global rank, host and exit code from the torchrun agent's failure summary in
  ``slurm/<job>.node<N>.out`` (c10d hands out ranks, so nothing else names a rank's global number). Only summaries
  stamped after that launch started count, so a requeued job does not show its previous run's failures.

JSON (``--json``), a run::

    kind "run", run_dir, stages {data, model, eval: "done" | "started" | null}, eval_metrics (path | null),
    slurm_unreachable (why Slurm could not be asked | null),
    train {step, total, total_from, epsilon, delta, epsilon_from ("train log" | "ledger.json" | null),
           privacy_note, last_checkpoint (path | null), last_checkpoint_step},
    job null | {job_id, kind, array_task, submitted, source ("slurm" | "exit record" | null), state, reason,
                restarts, nodes, run_time, exit_code (Slurm's "code:signal", or the exit record's integer), ended
                (unix time, exit record), requeued, tasks ({state: count} for an array job | null), note,
                log, last_log_line, ranks [{rank, local_rank, node (SLURM_NODEID), host, exit_code, error, job_id}]}

a sweep (an array job of ``privtune sweep --slurm``, or its ``.sweeps/NAME`` dir)::

    kind "sweep", sweep_dir, array_job_id, slurm_unreachable, tasks {state: count}, runs [{task, name, status}]

where ``status`` is a run's dict as above (null when the task's run dir is gone).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from privtune.errors import UserError

RESOLVED = "config.resolved.yaml"  # what every run dir holds (launch/rundir.py); launch itself is off limits here
SLURM = "slurm"
RUNS, SWEEP_JOBS = "runs.json", "jobs.json"  # a sweep dir's tasks and its latest array job (launch/submit.py)
DEFAULT_OUTPUT = Path("runs")  # RunConfig.output_dir's default: where a forgotten job's run is looked for
JOB_ID = re.compile(r"^\d+(_\d+)?$")
TRACEBACK = "Traceback (most recent call last):"
PRIVTUNE_ERROR = "privtune: error:"
# One failure of torchrun's ChildFailedError summary (torch.distributed.elastic.multiprocessing.errors).
AGENT_FAILURE = re.compile(
    r"\btime\s*:\s*(?P<time>\S+)\s+host\s*:\s*(?P<host>\S+)\s+rank\s*:\s*(?P<rank>\d+)\s*\(local_rank:\s*"
    r"(?P<local_rank>\d+)\)\s+exitcode\s*:\s*(?P<exit_code>-?\d+)\s*\(pid:\s*\d+\)[ \t]*(?:\((?P<signal>SIG\w+)\))?")
ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING")
NONE = "—"
TAIL_BYTES = 65536  # enough for the last line of a log that may be gigabytes long


def status_command(target: str, *, as_json: bool, print_json: Callable[[object], None]) -> int:
    """The body of ``privtune status``: print the target's status (text, or JSON through ``print_json``)."""
    status = gather(target)
    if as_json:
        print_json(status)
    else:
        print(render(status))
    return 0


def gather(target: str) -> dict:
    """The status of a run dir, a sweep dir or a Slurm job id (see the module docstring for the keys)."""
    slurm = _Slurm()
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / RESOLVED).is_file():
            return _run_status(path.resolve(), slurm)
        if (path / RUNS).is_file():
            return _sweep_status(path.resolve(), slurm)
        raise UserError(f"{target} is neither a run dir (no {RESOLVED}) nor a sweep dir (no {RUNS})",
                        "pass a run dir such as runs/NAME, or a Slurm job id")
    if JOB_ID.match(target):
        return _job_target(target, slurm)
    raise UserError(f"{target} is not a directory or a Slurm job id",
                    "pass a run dir such as runs/NAME, or a job id such as 4312")


class _Slurm:
    """Slurm as this command sees it: asked only when a job is, each job once; ``unreachable`` says why not."""

    def __init__(self):
        self.unreachable: str | None = None
        self._checked = False
        self._records: dict[str, list[dict[str, str]]] = {}

    def records(self, job_id: str) -> list[dict[str, str]]:
        from privtune.cluster import slurm

        if not self._checked:
            self._checked = True
            self.unreachable = slurm.available()
        if self.unreachable is not None:
            return []
        if job_id not in self._records:
            try:
                self._records[job_id] = slurm.job_records(job_id)
            except UserError as err:  # the controller stopped answering: report from the files
                self.unreachable = str(err)
                return []
        return self._records[job_id]

    def hostnames(self, nodelist: str) -> list[str]:
        from privtune.cluster import slurm

        try:
            return slurm.hostnames(nodelist)
        except UserError:
            return []


# ----------------------------------------------------------------------------------------------------------------
# A job id: the run (or sweep) it belongs to


def _job_target(job_id: str, slurm: _Slurm) -> dict:
    records = slurm.records(job_id)
    if records:
        comment = records[0].get("Comment", "")
        kind, _, where = comment.partition(":")
        if kind == "privtune" and where:
            return _run_status(_existing(Path(where), RESOLVED, job_id), slurm, job=job_id)
        if kind == "privtune-sweep" and where:
            return _sweep_or_task(_existing(Path(where), RUNS, job_id), slurm, job_id)
        raise UserError(f"Slurm job {job_id} was not submitted by privtune (its comment is {comment!r})",
                        "pass the run dir instead")
    for sweep in sorted(DEFAULT_OUTPUT.glob(f".sweeps/*/{SWEEP_JOBS}")):
        jobs = _read_json(sweep, {})
        if job_id.split("_")[0] in (str(jobs.get("array")), str(jobs.get("report"))):
            return _sweep_or_task(sweep.parent.resolve(), slurm, job_id)
    for jobs in sorted(DEFAULT_OUTPUT.glob(f"*/{SLURM}/jobs.jsonl")):
        if _find_entry(_read_jsonl(jobs), job_id) is not None:
            return _run_status(jobs.parent.parent.resolve(), slurm, job=job_id)
    why = (f"Slurm is not reachable here ({slurm.unreachable})" if slurm.unreachable
           else f"Slurm does not know job {job_id}")
    raise UserError(f"{why} and no run under {DEFAULT_OUTPUT}/ records it",
                    "pass the run dir instead (privtune status runs/NAME)")


def _existing(path: Path, marker: str, job_id: str) -> Path:
    if not (path / marker).is_file():
        raise UserError(f"Slurm job {job_id} names {path}, which holds no {marker}",
                        "it was moved or deleted; pass the run dir where it is now")
    return path


def _sweep_or_task(home: Path, slurm: _Slurm, job_id: str) -> dict:
    """An array task's id ("123_4") is that task's run; the array's (or the report job's) id is the sweep."""
    if "_" in job_id:
        task = int(job_id.split("_")[1])
        for run in _read_json(home / RUNS, []):
            if run["task"] == task:
                return _run_status(Path(run["run_dir"]), slurm, job=job_id)
        raise UserError(f"sweep {home} has no task {task}", f"see its tasks in {home / RUNS}")
    return _sweep_status(home, slurm)


# ----------------------------------------------------------------------------------------------------------------
# A sweep


def _sweep_status(home: Path, slurm: _Slurm) -> dict:
    """One row per task of the sweep's latest array job (``runs.json``), each with its run's status."""
    array = _read_json(home / SWEEP_JOBS, {}).get("array")
    array_id = str(array) if array is not None else None
    runs = []
    for run in _read_json(home / RUNS, []):
        job = f"{array_id}_{run['task']}" if array_id else None
        run_dir = Path(run["run_dir"])
        status = _run_status(run_dir, slurm, job=job) if (run_dir / RESOLVED).is_file() else None
        runs.append({"task": run["task"], "name": run["name"], "status": status})
    tasks = Counter(_task_label(r["status"]["job"] if r["status"] else None) for r in runs)
    return {"kind": "sweep", "sweep_dir": str(home), "array_job_id": array_id,
            "slurm_unreachable": slurm.unreachable, "tasks": dict(tasks), "runs": runs}


def _task_label(job: dict | None) -> str:
    if job is None:
        return "unknown"
    if job["state"]:
        return job["state"]
    if job["source"] == "exit record":
        return f"ended (exit {job['exit_code']})"
    return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# A run


def _run_status(run_dir: Path, slurm: _Slurm, *, job: str | None = None) -> dict:
    """The run's stages, training progress and (newest, or ``job``'s) Slurm job."""
    if not (run_dir / RESOLVED).is_file():
        raise UserError(f"{run_dir} is not a privtune run dir (no {RESOLVED})", "pass a run dir such as runs/NAME")
    entries = _read_jsonl(run_dir / SLURM / "jobs.jsonl")
    entry = _find_entry(entries, job) if job else (max(entries, key=lambda e: e.get("submitted", 0))
                                                   if entries else None)
    if job and entry is None:  # Slurm names this run for the job, but the run dir never recorded it
        entry = {"job_id": job, "kind": None, "array_task": None}
    metrics = run_dir / "eval" / "metrics.json"
    return {"kind": "run", "run_dir": str(run_dir), "stages": _stages(run_dir),
            "eval_metrics": str(metrics) if metrics.is_file() else None,
            "train": _training(run_dir),
            "job": _job_status(run_dir, entry, slurm) if entry else None,
            "slurm_unreachable": slurm.unreachable}


def _stages(run_dir: Path) -> dict[str, str | None]:
    def state(stage: str, *signs: Path) -> str | None:
        if (run_dir / stage).is_dir():
            return "done"
        staging = any(run_dir.glob(f".{stage}.tmp-*"))  # atomic.staged_dir's folder, while the stage runs
        return "started" if staging or any(p.exists() for p in signs) else None

    return {"data": state("data"),
            "model": state("model", run_dir / "logs" / "train.jsonl", run_dir / "checkpoints"),
            "eval": state("eval")}


def _training(run_dir: Path) -> dict:
    from privtune.trainers.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    out = {"last_checkpoint": str(checkpoint) if checkpoint else None,
           "last_checkpoint_step": int(checkpoint.name[len("step-"):]) if checkpoint else None}
    card = run_dir / "model" / "privtune.json"
    if card.is_file():
        released = _read_json(card, {})
        return {**out, "step": released.get("steps"), "total": released.get("steps"),
                "total_from": "model/privtune.json", **_released_privacy(run_dir, released)}
    last = _last_row(run_dir / "logs" / "train.jsonl")
    total, total_from = _planned_steps(run_dir)
    return {**out, "step": last.get("step") if last is not None else None, "total": total, "total_from": total_from,
            **_logged_privacy(last)}


def _planned_steps(run_dir: Path) -> tuple[int | None, str]:
    """The trainer's own count (``trainers.plan.training_steps``) from the resolved config and its number of units."""
    import yaml
    from pydantic import ValidationError

    from privtune.trainers.config import TrainConfig
    from privtune.trainers.plan import training_steps

    tree = yaml.safe_load((run_dir / RESOLVED).read_text()) or {}
    try:
        train = TrainConfig.model_validate(tree.get("train") or {})
    except ValidationError:
        return None, f"{RESOLVED}'s train section does not validate with this privtune"
    if train.method == "none":
        return None, "train.method=none: nothing to train"
    units, where = _num_units(run_dir, (tree.get("privacy") or {}).get("unit", "example"))
    if units is None and train.max_steps is None:
        return None, where
    # training_steps reads only the run config's train section, and N only when train.max_steps is unset
    steps = training_steps(SimpleNamespace(train=train), units)
    return steps, f"{RESOLVED}" + (" (train.max_steps)" if train.max_steps else f" and N={units} from {where}")


def _num_units(run_dir: Path, unit: str) -> tuple[int | None, str]:
    """N as the trainer counted it: the ledger header it writes before the first step; for unit=example before
    that, the prepared data's training examples."""
    from privtune.accounting.ledger import Ledger

    if (run_dir / "ledger.json").exists():
        try:
            return Ledger.load(run_dir).dataset_size, "ledger.json"
        except UserError as err:
            return None, f"ledger.json is unreadable ({err})"
    meta = run_dir / "data" / "meta.json"
    if unit == "example" and meta.is_file():
        return _read_json(meta, {}).get("splits", {}).get("train", {}).get("examples"), "data/meta.json"
    return None, "unknown until training starts (the number of users is counted then)"


def _logged_privacy(last: dict | None) -> dict:
    if last is None:
        return {"epsilon": None, "delta": None, "epsilon_from": None, "privacy_note": "no training step logged yet"}
    if "epsilon" not in last:
        return {"epsilon": None, "delta": None, "epsilon_from": None,
                "privacy_note": "a non-DP method: no formal guarantee"}
    note = None if last["epsilon"] is not None else "non-private debug run: no formal guarantee"
    return {"epsilon": last["epsilon"], "delta": last.get("delta"), "epsilon_from": "train log", "privacy_note": note}


def _released_privacy(run_dir: Path, card: dict) -> dict:
    """ε of the released run as ``privtune budget`` states it: its ledger composed at the card's δ and accountant."""
    from privtune.accounting.budget import compose_ledgers

    guarantee = card.get("guarantee") or {}
    delta = guarantee.get("delta")
    if guarantee.get("epsilon") is None:
        return {"epsilon": None, "delta": delta, "epsilon_from": None, "privacy_note": guarantee.get("note")}
    try:
        # allow_reproducible: status shows the number; the warning below says it is not a guarantee
        result = compose_ledgers([run_dir], delta=delta, accountants=(guarantee["accountant"],),
                                 allow_reproducible=True)
    except UserError as err:
        return {"epsilon": None, "delta": delta, "epsilon_from": None, "privacy_note": str(err)}
    return {"epsilon": result["epsilon"], "delta": delta, "epsilon_from": "ledger.json",
            "privacy_note": "; ".join(result["warnings"]) or None}


# ----------------------------------------------------------------------------------------------------------------
# The run's Slurm job


def _job_key(entry: dict) -> str:
    """The job's name as its batch script writes it into the run dir: ARRAYID_TASK for one task of an array."""
    job_id, task = str(entry["job_id"]), entry.get("array_task")
    return f"{job_id}_{task}" if task is not None and "_" not in job_id else job_id


def _find_entry(entries: list[dict], job: str) -> dict | None:
    """The submission ``job`` names: the job itself, or the array job of which it is a task."""
    matches = [e for e in entries if job in (_job_key(e), str(e["job_id"]))]
    matches = matches or [e for e in entries if str(e["job_id"]) == job.split("_")[0]]
    return matches[-1] if matches else None


def _job_status(run_dir: Path, entry: dict, slurm: _Slurm) -> dict:
    key = _job_key(entry)
    array_id, _, task_text = key.partition("_")
    task = int(task_text) if task_text else None
    records = slurm.records(array_id)  # an array's tasks are all asked at once, pending ranges included
    job = {"job_id": key, "kind": entry.get("kind"), "array_task": task, "submitted": entry.get("submitted"),
           "source": None, "state": None, "reason": None, "restarts": None, "nodes": None, "run_time": None,
           "exit_code": None, "ended": None, "requeued": None, "tasks": None, "note": None}
    tasks = _task_keys(run_dir, array_id, records) if task is None else []
    if tasks:  # an array job of this run (eval shards): its tasks counted by state
        job.update(_array_state(run_dir, records, tasks, slurm))
        keys, logged = tasks, records
    else:
        record = _task_record(records, task)
        job.update(_slurm_state(record) if record else _from_exit_records(run_dir, key, slurm))
        keys, logged = [key], [record] if record else []
    job["log"] = _batch_log(entry, logged, keys)
    job["last_log_line"] = _last_line(Path(job["log"])) if job["log"] else None
    job["ranks"] = [failure for k in keys for failure in _rank_failures(run_dir, k)]
    if job["nodes"] and any(f["host"] is None for f in job["ranks"]):
        hosts = slurm.hostnames(job["nodes"])  # SLURM_NODEID N is the N-th host of the job's node list
        for failure in job["ranks"]:
            if failure["host"] is None and failure["node"] < len(hosts):
                failure["host"] = hosts[failure["node"]]
    return job


def _slurm_state(record: dict[str, str]) -> dict:
    return {"source": "slurm", "state": record.get("JobState"), "reason": _value(record, "Reason"),
            "restarts": _int(record.get("Restarts")), "nodes": _value(record, "NodeList"),
            "run_time": record.get("RunTime"), "exit_code": record.get("ExitCode")}


def _from_exit_records(run_dir: Path, key: str, slurm: _Slurm) -> dict:
    exits = [e for e in _read_jsonl(run_dir / SLURM / "exits.jsonl") if str(e.get("job_id")) == key]
    if not exits:
        return {"note": f"{_unknown_why(slurm)}, and the job left no exit record (not started yet, or killed)"}
    last = exits[-1]  # a requeued job ends once per run: its latest end
    return {"source": "exit record", "exit_code": last.get("exit_code"), "restarts": last.get("restart"),
            "ended": last.get("ended"), "requeued": last.get("requeued"),
            "note": f"from the job's exit record; {_unknown_why(slurm)}"}


def _array_state(run_dir: Path, records: list[dict[str, str]], tasks: list[str], slurm: _Slurm) -> dict:
    if records:
        return {"source": "slurm", "tasks": _array_counts(records)}
    exits = {str(e.get("job_id")): e for e in _read_jsonl(run_dir / SLURM / "exits.jsonl")}  # the last per task
    counts = Counter(f"ended (exit {exits[k].get('exit_code')})" if k in exits else "unknown" for k in tasks)
    return {"source": "exit record", "tasks": dict(counts),
            "note": f"from the tasks' exit records; {_unknown_why(slurm)}"}


def _unknown_why(slurm: _Slurm) -> str:
    # the reason Slurm could not be asked is the status's own line (slurm_unreachable), not repeated per job
    return "Slurm not reachable here" if slurm.unreachable else "Slurm no longer knows the job"


def _task_ids(spec: str) -> list[int]:
    """Slurm's ArrayTaskId: "4", or a pending range such as "3-9:2%4" or "1,5-6"."""
    ids: list[int] = []
    for part in spec.split("%")[0].split(","):
        bounds, _, step = part.partition(":")
        low, _, high = bounds.partition("-")
        if low.isdigit():
            ids += range(int(low), int(high or low) + 1, int(step or 1))
    return ids


def _task_record(records: list[dict[str, str]], task: int | None) -> dict[str, str] | None:
    if task is None:
        return records[0] if len(records) == 1 else None
    return next((r for r in records if task in _task_ids(r.get("ArrayTaskId", ""))), None)


def _array_counts(records: list[dict[str, str]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for record in records:
        counts[record.get("JobState", "UNKNOWN")] += len(_task_ids(record.get("ArrayTaskId", ""))) or 1
    return dict(counts)


def _task_keys(run_dir: Path, array_id: str, records: list[dict[str, str]]) -> list[str]:
    """The tasks of an array job that left records: Slurm's, exit records, rank log folders."""
    found = {f"{array_id}_{r['ArrayTaskId']}" for r in records if r.get("ArrayTaskId", "").isdigit()}
    found |= {str(e.get("job_id")) for e in _read_jsonl(run_dir / SLURM / "exits.jsonl")}
    found |= {p.name for p in (run_dir / SLURM / "ranks").glob(f"{array_id}_*")}
    return sorted((k for k in found if re.fullmatch(rf"{array_id}_\d+", k)), key=lambda k: int(k.split("_")[1]))


def _value(record: dict[str, str], key: str) -> str | None:
    value = record.get(key)
    return None if value in (None, "", "None", "(null)") else value


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


# ----------------------------------------------------------------------------------------------------------------
# Logs


def _batch_log(entry: dict, records: list[dict[str, str]], keys: list[str]) -> str | None:
    """The newest existing batch log: Slurm's StdOut (patterns filled in), else the one submit recorded (with the
    task filled into an array's %a)."""
    log = entry.get("log")
    candidates = [Path(r["StdOut"]) for r in records if r.get("StdOut") and "%" not in r["StdOut"]]
    if log:
        candidates += [Path(log.replace("%a", k.split("_")[1])) for k in keys if "_" in k] + [Path(log)]
    existing = [p for p in candidates if "%" not in str(p) and p.is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - TAIL_BYTES))
        return handle.read().decode("utf-8", errors="replace")


def _last_line(path: Path) -> str | None:
    # progress bars redraw with \r: what a terminal would show last is the text after the last \r
    lines = [line.split("\r")[-1].strip() for line in _tail(path).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else None


def _error_line(text: str) -> str | None:
    """The last failure a rank printed: a ``privtune: error:`` line, or the exception line that ends a traceback."""
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith(PRIVTUNE_ERROR) or line.strip() == TRACEBACK]
    if not marks:
        return None
    last = marks[-1]
    if lines[last].startswith(PRIVTUNE_ERROR):
        return lines[last].strip()
    # A traceback's frames are indented; the first line back at the margin is the exception and its message.
    return next((line.strip() for line in lines[last + 1:] if line.strip() and not line[0].isspace()),
                "a traceback cut short (the process died while printing it)")


def _rank_failures(run_dir: Path, key: str) -> list[dict]:
    """Failed ranks of job ``key``'s newest torchrun launch on each node: error line, global rank, host, exit."""
    slurm_dir = run_dir / SLURM
    names = [p.name for p in (slurm_dir / "ranks" / key).glob("node*")] + [p.name for p in slurm_dir.glob("*.out")]
    nodes = {int(m[1]) for name in names if (m := re.fullmatch(rf"(?:{re.escape(key)}\.)?node(\d+)(?:\.out)?", name))}
    rows = []
    for node in sorted(nodes):
        launch = _newest_launch(slurm_dir / "ranks" / key / f"node{node}")
        failures = {int(d.name): {"error": error} for d in _rank_dirs(launch) if (error := _rank_error(d))}
        out = slurm_dir / f"{key}.node{node}.out"
        summary = _tail(out) if out.is_file() else ""
        for found in _agent_failures(summary, started=launch.stat().st_mtime if launch else None):
            row = failures.setdefault(found.pop("local_rank"), {})
            row["error"] = row.get("error") or found.pop("exit")
            row.update((k, found[k]) for k in ("rank", "host", "exit_code"))
        rows += [{"job_id": key, "rank": found.get("rank"), "local_rank": local_rank, "node": node,
                  "host": found.get("host"), "exit_code": found.get("exit_code"), "error": found["error"]}
                 for local_rank, found in failures.items()]
    return sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["node"], r["local_rank"]))


def _rank_error(rank_dir: Path) -> str | None:
    stderr = rank_dir / "stderr.log"
    return _error_line(_tail(stderr)) if stderr.is_file() else None


def _newest_launch(node_dir: Path) -> Path | None:
    """torchrun makes one folder per launch under --log-dir (a requeued job launches again): the newest."""
    launches = [p for p in node_dir.iterdir() if p.is_dir()] if node_dir.is_dir() else []
    return max(launches, key=lambda p: p.stat().st_mtime, default=None)


def _rank_dirs(launch: Path | None) -> list[Path]:
    if launch is None:
        return []
    attempts = sorted(launch.glob("attempt_*"), key=lambda p: int(p.name[len("attempt_"):]))
    return [p for p in attempts[-1].iterdir() if p.name.isdigit()] if attempts else []


def _agent_failures(text: str, started: float | None) -> list[dict]:
    """Failures in torchrun's summary, those stamped no earlier than ``started`` (its time is the node's local
    time, second resolution)."""
    found = []
    for match in AGENT_FAILURE.finditer(text):
        try:
            when = datetime.fromisoformat(match["time"].replace("_", "T")).timestamp()
        except ValueError:
            when = None
        if started is not None and when is not None and when + 1 < started:
            continue  # an earlier launch of this job (before a requeue)
        signal = f" ({match['signal']})" if match["signal"] else ""
        found.append({"rank": int(match["rank"]), "local_rank": int(match["local_rank"]), "host": match["host"],
                      "exit_code": int(match["exit_code"]), "exit": f"exit code {match['exit_code']}{signal}"})
    return found


# ----------------------------------------------------------------------------------------------------------------
# Files


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return default


def _read_jsonl(path: Path) -> list[dict]:
    """Every whole JSON object line; a torn last line (a writer killed mid-line) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _last_row(path: Path) -> dict | None:
    rows = _read_jsonl(path)
    return rows[-1] if rows else None


# ----------------------------------------------------------------------------------------------------------------
# Text


def render(status: dict) -> str:
    """The human block for a run or a sweep."""
    if status["kind"] == "sweep":
        return _render_sweep(status)
    return "\n".join(_run_lines(status))


def _run_lines(status: dict) -> list[str]:
    marks = {"done": "✓", "started": "…", None: NONE}
    stages = "  ".join(f"{stage} {marks[state]}" for stage, state in status["stages"].items())
    lines = [f"run     {status['run_dir']}   ({stages})"]
    if status["slurm_unreachable"]:
        lines.append(f"slurm   not reachable here ({status['slurm_unreachable']})")
    job = status["job"]
    lines.append(f"job     {_job_text(job)}" if job else f"job     {NONE} (no Slurm job recorded in slurm/jobs.jsonl)")
    lines.append(f"train   {_train_text(status['train'])}")
    if job:
        lines.append(f"log     {job['last_log_line'] or NONE}" + ("" if job["log"] else "  (no batch log found)"))
        for failure in job["ranks"]:
            lines.append(f"ranks   {_failure_text(failure)}")
    if status["eval_metrics"]:
        lines.append(f"eval    {status['eval_metrics']}")
    return lines


def _job_text(job: dict) -> str:
    head = f"{job['job_id']}" + (f" ({job['kind']})" if job["kind"] else "")
    if job["tasks"] is not None:
        return f"{head} array: {_counts_text(job['tasks'])}"
    if job["source"] == "exit record":
        ended = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["ended"])) if job["ended"] else NONE
        requeued = ", then requeued" if job["requeued"] else ""
        return (f"{head} ended with exit code {job['exit_code']} at {ended}{requeued}, restarts {job['restarts']}"
                f"  ({job['note']})")
    if job["state"] is None:
        return f"{head} state {NONE}  ({job['note']})"
    state = job["state"]
    if state == "PENDING":
        return f"{head} PENDING" + (f" ({job['reason']})" if job["reason"] else "")
    where = f" on {job['nodes']}" if job["nodes"] else ""
    restarts = f", restarts {job['restarts']}" if job["restarts"] is not None else ""
    if state in ACTIVE:
        return f"{head} {state}{where} for {job['run_time']}{restarts}"
    return f"{head} {state}{where} after {job['run_time']}, exit code {job['exit_code']}{restarts}"


def _counts_text(counts: dict[str, int]) -> str:
    parts = [f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"{', '.join(parts)} of {sum(counts.values())}"


def _epsilon_text(train: dict) -> str:
    if train["epsilon"] is None:
        return f"ε {NONE}" + (f" ({train['privacy_note']})" if train["privacy_note"] else "")
    epsilon = math.ceil(train["epsilon"] * 100) / 100  # rounded up: a printed ε is never below the real one
    return f"ε {epsilon:.2f} at δ {train['delta']:.3g}"


def _train_text(train: dict) -> str:
    step = NONE if train["step"] is None else str(train["step"])
    total = NONE if train["total"] is None else str(train["total"])
    checkpoint = f"step-{train['last_checkpoint_step']}" if train["last_checkpoint"] else NONE
    return f"step {step} / {total}   {_epsilon_text(train)}   last checkpoint {checkpoint}"


def _failure_text(failure: dict) -> str:
    node = failure["host"] or f"node{failure['node']}"
    who = f"rank {failure['rank']}" if failure["rank"] is not None else f"local rank {failure['local_rank']}"
    return f"{who} (node {node}): {failure['error']}"


def _render_sweep(status: dict) -> str:
    job = f"array job {status['array_job_id']}" if status["array_job_id"] else f"array job {NONE}"
    lines = [f"sweep   {status['sweep_dir']}   {job}: {_counts_text(status['tasks'])}"]
    if status["slurm_unreachable"]:
        lines.append(f"slurm   not reachable here ({status['slurm_unreachable']})")
    for run in status["runs"]:
        run_status = run["status"]
        if run_status is None:
            lines.append(f"  {run['task']:>3}  {run['name']}  {NONE} (no run dir)")
            continue
        state = _task_label(run_status["job"])
        lines.append(f"  {run['task']:>3}  {run['name']}  {state}  {_train_text(run_status['train'])}")
    return "\n".join(lines)


__all__ = ["gather", "render", "status_command"]
