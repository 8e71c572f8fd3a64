"""``privtune submit``, ``privtune sweep --slurm`` and ``privtune eval --slurm``: runs turned into Slurm jobs.

Owns: merging the config's ``cluster:`` section with the command's flags into one checked ``SlurmRequest``; what
is prepared before a job is queued (the run's data stage, so a run dir exists and bad input fails now, not hours
later in the queue); the files a job reads and leaves (``RUN_DIR/slurm/``: ``config.yaml`` the job runs, the
rendered scripts, ``jobs.jsonl`` one line per submission); and refusing a second job on a run that already has
one pending or running (two jobs training one run dir would corrupt it).

Scripts come from ``cluster/render.py``; Slurm's commands from ``cluster/slurm.py``. A sweep's files (its array
and report scripts, ``runs.json``, the array tasks' logs, the report) live in ``OUTPUT_DIR/.sweeps/NAME/``, out of
the way of ``runs/*`` globs.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from privtune.atomic import atomic_write_text
from privtune.cluster import slurm
from privtune.cluster.config import check_mem, check_name, check_time
from privtune.cluster.render import JobBody, NodeLaunch, SbatchOptions, render_script
from privtune.errors import UserError
from privtune.launch.config import RunConfig, dump_config
from privtune.progress import info

ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD", "RESIZING")
JOBS, SLURM_DIR = "jobs.jsonl", "slurm"


@dataclass(frozen=True)
class SlurmRequest:
    """Where and how long a job runs: the command's flags over the config's ``cluster:`` section, checked."""

    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    constraint: str | None = None
    exclusive: bool = False
    requeue: bool = False
    warning_seconds: int = 120
    gpu_memory_gib: float = 80.0
    extra: tuple[str, ...] = ()


def slurm_request(cfg: RunConfig, flags: dict) -> SlurmRequest:
    """``flags``: the command's values (None = not given). Every bad value is one UserError naming the flag."""
    c = cfg.cluster

    def pick(name, default=None):
        value = flags.get(name)
        return value if value is not None else getattr(c, name, None) if getattr(c, name, None) is not None \
            else default

    nodes, gpus = pick("nodes", 1), pick("gpus_per_node", 0)
    procs = flags.get("procs_per_node")
    procs = procs if procs is not None else (gpus if gpus else 1)
    warning = flags.get("warning_seconds")
    warning = warning if warning is not None else 120
    checks = [("--nodes", nodes, 1), ("--gpus-per-node", gpus, 0), ("--procs-per-node", procs, 1),
              ("--warning-seconds", warning, 1)]
    for flag, value, low in checks:
        if not isinstance(value, int) or value < low:
            raise UserError(f"{flag} {value} is not an integer >= {low}", f"pass e.g. {flag} {max(low, 2)}")
    if gpus and procs != gpus:
        raise UserError(f"--procs-per-node {procs} differs from --gpus-per-node {gpus}",
                        "privtune runs one process per GPU: drop --procs-per-node")
    if flags.get("cpus_per_task") is not None and flags["cpus_per_task"] < 1:
        raise UserError(f"--cpus-per-task {flags['cpus_per_task']} is not a positive integer", "pass e.g. 16")
    values = {name: pick(name) for name in ("partition", "account", "qos", "constraint", "time", "mem")}
    try:
        for name in ("partition", "account", "qos", "constraint"):
            if values[name] is not None:
                check_name(values[name], name)
        if values["time"] is not None:
            check_time(values["time"])
        if values["mem"] is not None:
            check_mem(values["mem"])
    except ValueError as err:
        raise UserError(str(err)) from None
    if (memory := flags.get("gpu_memory")) is not None and memory <= 0:
        raise UserError(f"--gpu-memory {memory} is not a positive number of GiB", "pass e.g. --gpu-memory 80")
    return SlurmRequest(nodes=nodes, gpus_per_node=gpus, procs_per_node=procs,
                        cpus_per_task=pick("cpus_per_task"), exclusive=bool(flags.get("exclusive") or c.exclusive),
                        requeue=bool(flags.get("requeue")), warning_seconds=warning,
                        gpu_memory_gib=memory or 80.0, extra=tuple(c.sbatch), **values)


# ----------------------------------------------------------------------------------------------------------------


def _options(req: SlurmRequest, *, job_name: str, output: str, comment: str, **more) -> SbatchOptions:
    return SbatchOptions(job_name=job_name, nodes=more.pop("nodes", req.nodes), output=output,
                         chdir=str(Path.cwd()), comment=comment, gpus_per_node=more.pop("gpus", req.gpus_per_node),
                         cpus_per_task=req.cpus_per_task, partition=req.partition, account=req.account,
                         qos=req.qos, time=req.time, mem=req.mem, constraint=req.constraint,
                         exclusive=req.exclusive, requeue=more.pop("requeue", req.requeue),
                         warning_seconds=req.warning_seconds if req.requeue else None, extra=req.extra, **more)


def _python(cfg: RunConfig) -> str:
    return cfg.cluster.python or sys.executable


def _header(command: str, what: str) -> list[str]:
    from privtune import __version__

    return [f"privtune {__version__}: {what}", f"rendered by: {command}",
            "re-render it (add --dry-run) rather than edit it: every #SBATCH value is checked when rendering"]


def _job_config(cfg: RunConfig) -> RunConfig:
    """The config the job runs: the same run, its output_dir absolute (the job may start in another folder)."""
    return cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir).resolve())})


def _check_no_active_job(run_dir: Path) -> None:
    records = read_jobs(run_dir)
    if not records or slurm.available() is not None:
        return
    for record in records[-5:]:
        state = slurm.job_state(record["job_id"])
        if state in ACTIVE:
            raise UserError(f"run {run_dir} already has Slurm job {record['job_id']} {state}",
                            f"wait for it (privtune status {run_dir}) or cancel it (scancel {record['job_id']})")


def read_jobs(run_dir: Path) -> list[dict]:
    path = run_dir / SLURM_DIR / JOBS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record_job(run_dir: Path, record: dict) -> None:
    path = run_dir / SLURM_DIR / JOBS
    with open(path, "a") as f:  # one line per submission, appended: the history of the run's jobs
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _check_plan(cfg: RunConfig, req: SlurmRequest) -> None:
    """GPU jobs: the memory plan for this many nodes and GPUs, printed; refused before queueing if it cannot fit."""
    if not req.gpus_per_node:
        return
    from privtune.trainers.resources import GIB, USABLE, plan_resources, smallest_fix

    where = dict(nodes=req.nodes, gpus_per_node=req.gpus_per_node, gpu_memory_gib=req.gpu_memory_gib)
    try:
        plan = plan_resources(cfg, num_units=None, **where)
    except UserError:  # an architecture the planner does not know: Slurm will tell
        return
    info(f"[bold]plan[/]  {plan.summary_line()}")
    if not plan.fits:
        fix = smallest_fix(cfg, **where)
        raise UserError(f"{plan.total / GIB:.1f} GiB per GPU does not fit in {USABLE:.0%} of "
                        f"{req.gpu_memory_gib:g} GiB", f"try {fix}" if fix else "use GPUs with more memory")


def _check_world(cfg: RunConfig, req: SlurmRequest) -> None:
    world = req.nodes * req.procs_per_node
    if cfg.performance.parallel == "single" and world > 1:
        raise UserError(f"performance.parallel=single cannot run on {world} processes",
                        "set performance.parallel=ddp, fsdp2 or a zero preset, or submit with --nodes 1")


def _run_launch(cfg: RunConfig, req: SlurmRequest, args: tuple[str, ...]) -> NodeLaunch:
    return NodeLaunch(python=_python(cfg), args=args, procs_per_node=req.procs_per_node)


# ----------------------------------------------------------------------------------------------------------------
# privtune submit


def submit_run(cfg: RunConfig, req: SlurmRequest, *, command: str, dry_run: bool) -> dict:
    """Render (and unless ``dry_run`` submit) the job of one run. Returns what the command prints."""
    from privtune.launch.pipeline import ensure_data
    from privtune.launch.preflight import preflight
    from privtune.launch.stages import plan_run

    cfg = _job_config(cfg)
    preflight(cfg)
    _check_world(cfg, req)
    _check_plan(cfg, req)
    run_dir = cfg.run_dir
    plans = plan_run(cfg)  # refuses a run dir holding another experiment, before anything is written
    options = _options(req, job_name=cfg.name, output=str(run_dir / SLURM_DIR / "%j.out"),
                       comment=f"privtune:{run_dir}")
    config_path = run_dir / SLURM_DIR / "config.yaml"
    script = render_script(header=_header(command, f"Slurm job of run {cfg.name}"), options=options,
                           body=JobBody(run_dir=shlex.quote(str(run_dir)), setup=cfg.cluster.setup,
                                        env=cfg.cluster.env),
                           launch=_run_launch(cfg, req, ("run", shlex.quote(str(config_path)))))
    result = {"run_dir": str(run_dir), "script": str(run_dir / SLURM_DIR / "train.sbatch"), "job_id": None,
              "nodes": req.nodes, "procs_per_node": req.procs_per_node}
    if dry_run:
        return {**result, "dry_run": True, "rendered": script}
    if all(p.action == "reuse" for p in plans.values()):
        return {**result, "finished": True}
    _check_no_active_job(run_dir)
    ensure_data(cfg)  # the run dir exists before the job does; bad data is refused now, not in the queue
    (run_dir / SLURM_DIR).mkdir(exist_ok=True)
    atomic_write_text(config_path, dump_config(cfg))
    atomic_write_text(Path(result["script"]), script)
    job_id = slurm.submit(Path(result["script"]))
    log = str(run_dir / SLURM_DIR / f"{job_id}.out")
    _record_job(run_dir, {"job_id": job_id, "kind": "train", "submitted": time.time(), "script": result["script"],
                          "nodes": req.nodes, "procs_per_node": req.procs_per_node, "array_task": None, "log": log})
    return {**result, "job_id": job_id, "log": log}


# ----------------------------------------------------------------------------------------------------------------
# privtune sweep --slurm


def sweep_dir(output_dir: str, name: str) -> Path:
    return Path(output_dir).resolve() / ".sweeps" / name


def submit_sweep(name: str, runs: list[RunConfig], req: SlurmRequest, *, throttle: int | None, command: str,
                 dry_run: bool) -> dict:
    """One array task per unfinished run (``%throttle`` at a time), then a report job once they all ended."""
    from privtune.launch.pipeline import ensure_data
    from privtune.launch.preflight import preflight
    from privtune.launch.stages import plan_run

    if throttle is not None and throttle < 1:
        raise UserError(f"--throttle {throttle} is not a positive integer", "pass e.g. --throttle 4")
    runs = [_job_config(cfg) for cfg in runs]
    todo, done = [], []
    for cfg in runs:  # every run checked before anything is queued
        preflight(cfg)
        _check_world(cfg, req)
        plans = plan_run(cfg)
        (done if all(p.action == "reuse" for p in plans.values()) else todo).append(cfg)
    home = sweep_dir(runs[0].output_dir, name)
    base = runs[0]
    result = {"sweep": name, "sweep_dir": str(home), "runs": [c.name for c in runs],
              "skipped_finished": [c.name for c in done], "array_job_id": None, "report_job_id": None}
    array = f"0-{len(todo) - 1}" + (f"%{throttle}" if throttle else "") if todo else None
    configs = [str(c.run_dir / SLURM_DIR / "config.yaml") for c in todo]
    array_script = render_script(
        header=_header(command, f"Slurm array of sweep {name}: one task per run not finished yet"),
        options=_options(req, job_name=f"{name}-sweep", output=str(home / "logs" / "%A_%a.out"),
                         comment=f"privtune-sweep:{home}", array=array),
        body=JobBody(run_dir='"${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"',
                     arrays={"CONFIGS": configs, "RUN_DIRS": [str(c.run_dir) for c in todo]},
                     variables={"CONFIG": '"${CONFIGS[$SLURM_ARRAY_TASK_ID]}"'},
                     setup=base.cluster.setup, env=base.cluster.env),
        launch=_run_launch(base, req, ("run", '"$CONFIG"'))) if todo else None
    report_out = home / "report"
    all_dirs = [str(c.run_dir) for c in runs]

    def report_script(dependency: str | None) -> str:
        return render_script(
            header=_header(command, f"report of sweep {name}, once every array task has ended"),
            options=_options(req, job_name=f"{name}-report", output=str(home / "logs" / "report-%j.out"),
                             comment=f"privtune-sweep:{home}", nodes=1, gpus=0, requeue=False,
                             dependency=dependency),
            body=JobBody(run_dir=shlex.quote(str(home)), setup=base.cluster.setup, env=base.cluster.env),
            launch=NodeLaunch(python=_python(base), procs_per_node=1,
                              args=("report", *map(shlex.quote, all_dirs), "--out", shlex.quote(str(report_out)),
                                    "--skip-unfinished")))

    if dry_run:
        return {**result, "dry_run": True, "rendered": array_script or "",
                "rendered_report": report_script("afterany:ARRAY_JOB_ID" if todo else None)}
    if not todo:
        return {**result, "finished": True}
    for cfg in todo:
        _check_no_active_job(cfg.run_dir)
    for i, cfg in enumerate(todo, 1):
        info(f"[bold]sweep[/]  preparing data of run {i}/{len(todo)}: {cfg.name}")
        ensure_data(cfg)
        (cfg.run_dir / SLURM_DIR).mkdir(exist_ok=True)
        atomic_write_text(cfg.run_dir / SLURM_DIR / "config.yaml", dump_config(cfg))
    (home / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(home / "runs.json", json.dumps(
        [{"task": i, "name": c.name, "run_dir": str(c.run_dir)} for i, c in enumerate(todo)], indent=2) + "\n")
    atomic_write_text(home / "array.sbatch", array_script)
    array_id = slurm.submit(home / "array.sbatch")
    for i, cfg in enumerate(todo):
        _record_job(cfg.run_dir, {"job_id": f"{array_id}_{i}", "kind": "sweep-task", "submitted": time.time(),
                                  "script": str(home / "array.sbatch"), "nodes": req.nodes,
                                  "procs_per_node": req.procs_per_node, "array_task": i,
                                  "log": str(home / "logs" / f"{array_id}_{i}.out")})
    rendered = report_script(f"afterany:{array_id}")
    atomic_write_text(home / "report.sbatch", rendered)
    report_id = slurm.submit(home / "report.sbatch")
    atomic_write_text(home / "jobs.json", json.dumps({"array": array_id, "report": report_id,
                                                      "submitted": time.time()}, indent=2) + "\n")
    return {**result, "array_job_id": array_id, "report_job_id": report_id, "report": str(report_out)}


# ----------------------------------------------------------------------------------------------------------------
# privtune eval RUN --slurm --shards K


def submit_eval(cfg: RunConfig, run_dir: Path, req: SlurmRequest, *, shards: int, command: str,
                dry_run: bool) -> dict:
    """K array tasks each score one shard of the examples (``privtune eval RUN --shard i/K``); a dependent job
    then runs ``privtune eval RUN``, which finds every example scored (scoring any a failed shard left) and
    aggregates."""
    from privtune.eval.stage import prepare_shards

    if shards < 1:
        raise UserError(f"--shards {shards} is not a positive integer", "pass e.g. --shards 8")
    run_dir = run_dir.resolve()
    one = replace(req, nodes=1, procs_per_node=1, gpus_per_node=min(req.gpus_per_node, 1), requeue=False)
    common = dict(setup=cfg.cluster.setup, env=cfg.cluster.env)
    shard_script = render_script(
        header=_header(command, f"Slurm array scoring run {cfg.name}'s eval in {shards} shards"),
        options=_options(one, job_name=f"{cfg.name}-eval", output=str(run_dir / SLURM_DIR / "%A_%a.out"),
                         comment=f"privtune:{run_dir}", array=f"0-{shards - 1}", nodes=1, gpus=one.gpus_per_node),
        body=JobBody(run_dir=shlex.quote(str(run_dir)), **common),
        launch=_run_launch(cfg, one, ("eval", shlex.quote(str(run_dir)), "--shard",
                                      f'"$SLURM_ARRAY_TASK_ID/{shards}"')))

    def merge_script(dependency: str) -> str:
        return render_script(
            header=_header(command, f"merge of run {cfg.name}'s eval shards"),
            options=_options(one, job_name=f"{cfg.name}-eval-merge", output=str(run_dir / SLURM_DIR / "%j.out"),
                             comment=f"privtune:{run_dir}", nodes=1, gpus=one.gpus_per_node,
                             dependency=dependency),
            body=JobBody(run_dir=shlex.quote(str(run_dir)), **common),
            launch=_run_launch(cfg, one, ("eval", shlex.quote(str(run_dir)))))

    result = {"run_dir": str(run_dir), "shards": shards, "shard_job_id": None, "merge_job_id": None}
    if dry_run:
        return {**result, "dry_run": True, "rendered": shard_script, "rendered_merge": merge_script("afterany:ID")}
    _check_no_active_job(run_dir)
    prepare_shards(cfg, run_dir)  # stale part files dropped once, here, before shards write concurrently
    (run_dir / SLURM_DIR).mkdir(exist_ok=True)
    atomic_write_text(run_dir / SLURM_DIR / "eval-shards.sbatch", shard_script)
    shard_id = slurm.submit(run_dir / SLURM_DIR / "eval-shards.sbatch")
    atomic_write_text(run_dir / SLURM_DIR / "eval-merge.sbatch", merge_script(f"afterany:{shard_id}"))
    merge_id = slurm.submit(run_dir / SLURM_DIR / "eval-merge.sbatch")
    now = time.time()
    for kind, job_id, log in (("eval-shards", shard_id, str(run_dir / SLURM_DIR / f"{shard_id}_%a.out")),
                              ("eval-merge", merge_id, str(run_dir / SLURM_DIR / f"{merge_id}.out"))):
        _record_job(run_dir, {"job_id": job_id, "kind": kind, "submitted": now, "nodes": 1, "procs_per_node": 1,
                              "array_task": None, "log": log,
                              "script": str(run_dir / SLURM_DIR / f"{kind}.sbatch")})
    return {**result, "shard_job_id": shard_id, "merge_job_id": merge_id}


__all__ = ["SlurmRequest", "read_jobs", "slurm_request", "submit_eval", "submit_run", "submit_sweep",
           "sweep_dir"]
