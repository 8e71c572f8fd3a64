"""The ``privtune`` command line: thin entry points over the typed config and the stage functions.

    privtune run configs/quickstart.yaml [key=value ...] [--json]
    privtune validate CONFIG [key=value ...] [--json]
    privtune data CONFIG [key=value ...] [--json]
    privtune budget RUN_OR_LEDGER ... --delta D [--json]
    privtune budget calibrate --epsilon E --delta D --sample-rate Q --steps T [--json]
    privtune plan CONFIG [key=value ...] [--nodes N] [--gpus-per-node G] [--gpu-memory GIB] [--json]
    privtune submit CONFIG [key=value ...] --nodes N --gpus-per-node G [--partition P --time T ...] [--dry-run]
    privtune sweep GRID.yaml --slurm [--throttle K] [sbatch flags]
    privtune eval RUN_DIR --slurm --shards K [sbatch flags]        (a shard alone: privtune eval RUN --shard i/K)
    privtune status RUN_DIR|JOB_ID [--json]
    privtune winrate --models A B --instructions FILE [--judge SPEC] [--out DIR] [--json]

Every error a user can cause exits with code 2 and one line on stderr naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

from privtune.errors import UserError

PLANNED = {
    "train": "training as a separate stage",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the whole usage block)
        raise UserError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.method=lora data.num_examples=50")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _add_slurm_args(p: argparse.ArgumentParser, *, required_shape: bool = False) -> None:
    """sbatch flags shared by submit, sweep --slurm and eval --slurm (they override the config's cluster:)."""
    g = p.add_argument_group("Slurm (override the config's cluster: section)")
    g.add_argument("--nodes", type=int, help="nodes of each job (one task per node, torchrun on each)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node = processes per node (0: CPU processes)")
    g.add_argument("--procs-per-node", type=int, help="processes per node where there are no GPUs (default 1)")
    for name, what in (("partition", "Slurm partition"), ("account", "account to charge"),
                       ("qos", "quality of service"), ("time", "time limit, e.g. 24:00:00"),
                       ("mem", "memory per node, e.g. 480G"), ("constraint", "node features, e.g. a100")):
        g.add_argument(f"--{name}", help=what)
    g.add_argument("--cpus-per-task", type=int, help="CPUs of each node's task")
    g.add_argument("--exclusive", action="store_true", default=None, help="whole nodes")
    g.add_argument("--requeue", action="store_true", help="on Slurm's warning signal: checkpoint, requeue, resume")
    g.add_argument("--warning-seconds", type=int, help="with --requeue: the warning's lead time (default 120)")
    g.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory of one GPU for the plan (default 80)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit and write nothing")


SLURM_FLAGS = ("nodes", "gpus_per_node", "procs_per_node", "partition", "account", "qos", "time", "mem",
               "constraint", "cpus_per_task", "exclusive", "requeue", "warning_seconds", "gpu_memory")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="privtune", description="Fine-tune LLMs on private data and measure what they memorize.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_config_args(sub.add_parser("run", help="run every stage of a config (data, train, eval)"))
    _add_config_args(sub.add_parser("validate", help="check a config and print what it resolves to"))
    sweep = sub.add_parser("sweep", help="run every combination of a config's grid, then compare them")
    _add_config_args(sweep)
    sweep.add_argument("--slurm", action="store_true", help="submit one Slurm array task per run, then a report job")
    sweep.add_argument("--throttle", type=int, help="with --slurm: at most K array tasks at a time")
    _add_slurm_args(sweep)
    submit = sub.add_parser("submit", help="render a run's sbatch script and submit it to Slurm")
    _add_config_args(submit)
    _add_slurm_args(submit)
    status = sub.add_parser("status", help="a run's (or Slurm job's) state, step, ε, checkpoint and failures")
    status.add_argument("target", help="a run dir, or a Slurm job id")
    status.add_argument("--json", action="store_true")
    _add_config_args(sub.add_parser("data", help="prepare the data of a config (corpus, split, token masks)"))
    ev = sub.add_parser("eval", help="score a run dir's models (resumes; shards under torchrun)")
    ev.add_argument("run_dir", help="a run directory made by privtune run")
    ev.add_argument("overrides", nargs="*", help="eval.* or performance.* overrides, e.g. eval.max_examples=100")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--shard", metavar="I/K", help="score shard I of K only (independent shards, e.g. array tasks)")
    ev.add_argument("--slurm", action="store_true", help="submit the eval to Slurm: --shards array tasks + a merge")
    ev.add_argument("--shards", type=int, default=1, help="with --slurm: number of array tasks (default 1)")
    _add_slurm_args(ev)
    rep = sub.add_parser("report", help="join finished runs into report.md and plots")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", default="report", help="output folder (default: report/)")
    rep.add_argument("--skip-unfinished", action="store_true",
                     help="report the finished runs and list the others (exit 1 if any is missing)")
    rep.add_argument("--json", action="store_true")
    budget = sub.add_parser("budget", help="compose privacy ledgers, or `budget calibrate` a noise multiplier")
    budget.add_argument("paths", nargs="+", help="run dirs or ledger.json files (or the word calibrate)")
    budget.add_argument("--delta", type=float, help="δ of the composed guarantee")
    budget.add_argument("--allow-reproducible", action="store_true",
                        help="also compose runs whose sample and noise a public seed reproduces (privacy.reproducible): "
                             "the number printed is then not a guarantee")
    budget.add_argument("--json", action="store_true")
    plan = sub.add_parser("plan", help="memory per GPU, tokens per step and steps of a config on N nodes x G GPUs")
    _add_config_args(plan)
    plan.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (processes) per node (default 1)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                      help="memory of one GPU in GiB (default 80)")
    _add_winrate_parser(sub)
    for name, what in PLANNED.items():
        p = sub.add_parser(name, help=f"{what} (not implemented yet)")
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_winrate_parser(sub) -> None:
    w = sub.add_parser("winrate", help="pairwise win rate of model A over B, judged in both orders (resumes)")
    w.add_argument("--models", nargs=2, required=True, metavar=("A", "B"),
                   help="two run dirs (their trained model) or model names/paths, e.g. runs/dp3 smollm2-135m")
    w.add_argument("--instructions", required=True, metavar="FILE",
                   help="JSONL: {\"instruction\": ..., \"reference\": optional, \"id\": optional} a line")
    w.add_argument("--judge", help="reference, reference:contains, lm:MODEL or openai:URL[#MODEL] "
                                   "(default lm:smollm2-135m, the embedded model)")
    w.add_argument("--out", default="winrate", help="output folder: winrate.json and resumable parts (default winrate/)")
    w.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    w.add_argument("--batch-size", type=int, default=8, help="answers / LM-judge prompts per batch (default 8)")
    w.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    w.add_argument("--seed", type=int, default=0, help="weights of the tiny test models (default 0)")
    w.add_argument("--tie-margin", type=float, default=0.1,
                   help="lm judge: |log p(1) - log p(2)| below this is a tie (default 0.1)")
    w.add_argument("--judge-timeout", type=float, default=60.0, help="openai judge: seconds per call (default 60)")
    w.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the CI (default 2000)")
    w.add_argument("--json", action="store_true")


def build_calibrate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="privtune budget calibrate", description="Noise multiplier σ for a target (ε, δ).")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", type=int, required=True, help="number of optimizer steps T")
    p.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    p.add_argument("--json", action="store_true")
    return p


_JSON_OUT = None  # the real stdout while a --json command runs with stdout redirected to stderr


def _print_json(obj) -> None:
    (_JSON_OUT or sys.stdout).write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def cmd_validate(args) -> int:
    from privtune.launch.config import dump_config
    from privtune.launch.preflight import preflight
    from privtune.launch.stages import plan_run
    from privtune.launch.sweep import load_sweep

    _, runs = load_sweep(args.config, args.overrides)
    plans = {}
    for cfg in runs:  # refuse exactly what `privtune run` would refuse before its work
        preflight(cfg)
        plans[cfg.name] = {stage: plan.action for stage, plan in plan_run(cfg).items()}  # reads, never writes
    if args.json:
        _print_json({"valid": True, "runs": [cfg.model_dump(mode="json") for cfg in runs], "stages": plans})
    else:
        for cfg in runs:
            stages = ", ".join(f"{stage} {action}" for stage, action in plans[cfg.name].items())
            sys.stdout.write(f"# {args.config}: valid, run {cfg.name} ({stages})\n{dump_config(cfg)}")
    return 0


def _preflight_all(runs) -> None:
    """Every run of a sweep checked before the first one starts: a bad last run must not cost the others' work."""
    from privtune.launch.preflight import preflight
    from privtune.launch.stages import plan_run

    if len(runs) > 1:  # a single run is preflighted by ensure_data
        for cfg in runs:
            preflight(cfg)
            plan_run(cfg)  # a run dir holding another experiment is refused now, not after the runs before it


def cmd_data(args) -> int:
    from privtune.launch.pipeline import ensure_data
    from privtune.launch.sweep import load_sweep

    _, runs = load_sweep(args.config, args.overrides)
    _preflight_all(runs)
    prepared = []
    for cfg in runs:
        run_dir, existed = ensure_data(cfg)
        meta = json.loads((run_dir / "data" / "meta.json").read_text())
        prepared.append({"run_dir": str(run_dir), "reused": existed, **meta})
    if args.json:
        _print_json(prepared[0] if len(prepared) == 1 else {"runs": prepared})
        return 0
    for item in prepared:
        sys.stdout.write(f"data in {item['run_dir']}/data{' (reused)' if item['reused'] else ''}\n")
        sys.stdout.write(json.dumps({k: v for k, v in item.items() if k not in ("run_dir", "reused")},
                                    indent=2, sort_keys=True) + "\n")
    return 0


def cmd_run(args) -> int:
    from privtune.launch.config import load_config
    from privtune.launch.pipeline import run_pipeline
    from privtune.launch.summary import print_run_summary
    from privtune.launch.sweep import has_grid, load_sweep

    if has_grid(args.config):  # a config with a grid is a comparison: run it as a sweep ...
        name, runs = load_sweep(args.config, args.overrides)
        if len(runs) > 1 or runs[0].name != name:
            return cmd_sweep(args)
        cfg = runs[0]  # ... unless `grid=null` left the base config alone: then it is one run
    else:
        cfg = load_config(args.config, args.overrides)
    metrics = run_pipeline(cfg)
    if "rank" in metrics:  # a non-main rank of a distributed run: rank 0 prints the results
        return 0
    if args.json:
        _print_json({"run_dir": str(cfg.run_dir), **metrics})
    else:
        print_run_summary(cfg, metrics)
    return 0


def cmd_sweep(args) -> int:
    from rich.console import Console

    from privtune.launch.pipeline import run_pipeline
    from privtune.launch.sweep import base_grids, comparison_rows, load_sweep, render_comparison
    from privtune.progress import info

    name, runs = load_sweep(args.config, args.overrides)
    if getattr(args, "slurm", False):
        return _submit_sweep(args, name, runs)
    if getattr(args, "throttle", None) is not None or _slurm_flags_given(args):
        raise UserError("Slurm flags given without --slurm", "add --slurm to submit the sweep, or drop the flags")
    _preflight_all(runs)
    results = []
    for i, cfg in enumerate(runs, 1):
        info(f"[bold]sweep[/]  run {i}/{len(runs)}: {cfg.name}")
        results.append((cfg, run_pipeline(cfg)))
    if any("rank" in metrics for _, metrics in results):  # a non-main rank of a distributed sweep: rank 0 reports
        return 0
    rows = comparison_rows(results)
    if args.json:
        _print_json({"sweep": name, "runs": rows})
        return 0
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # logs: no wrapping
    console.print()
    console.print(render_comparison(f"{name}: per-token NLL on the 2×2 grid, privacy and cost per method", rows,
                                    base_grids(results)))
    console.print("Lower train-sensitive NLL = more memorized; 'memorized' is its drop from the base model. "
                  f"Run dirs: {runs[0].output_dir}/{name}-*")
    return 0


def cmd_eval(args) -> int:
    from privtune.fingerprint import RECORD
    from privtune.launch.config import load_config
    from privtune.launch.pipeline import run_eval_stage
    from privtune.launch.rundir import RESOLVED
    from privtune.launch.summary import print_run_summary

    run_dir = Path(args.run_dir)
    if not (run_dir / RESOLVED).exists():
        raise UserError(f"{run_dir} is not a privtune run dir (no {RESOLVED})", "pass a folder made by privtune run")
    bad = [o for o in args.overrides if not o.startswith(("eval.", "performance."))]
    if bad:
        raise UserError(f"privtune eval takes only eval.* and performance.* overrides, got {bad[0]}",
                        "change other settings with privtune run")
    shard = _parse_shard(args.shard) if args.shard else None
    if args.slurm and shard:
        raise UserError("--slurm and --shard do not go together", "--slurm --shards K submits the K shards itself")
    if not args.slurm and (_slurm_flags_given(args) or args.shards != 1):
        raise UserError("Slurm flags given without --slurm", "add --slurm to submit the eval, or drop the flags")
    cfg = load_config(run_dir / RESOLVED, [*args.overrides, f"output_dir={run_dir.parent}"])
    if cfg.train.method != "none" and not (run_dir / "model" / RECORD).exists():
        raise UserError(f"{run_dir} has no trained model yet",
                        "run `privtune run CONFIG` first (or set train.method=none)")
    if args.slurm:
        return _submit_eval(args, cfg, run_dir)
    if shard:
        from privtune.launch.pipeline import run_eval_shard

        run_eval_shard(cfg, run_dir, shard)
        if args.json:
            _print_json({"run_dir": str(run_dir), "shard": args.shard})
        return 0
    metrics = run_eval_stage(cfg, run_dir)
    if not metrics:  # a non-main rank
        return 0
    metrics["wall_seconds"] = 0.0
    if args.json:
        _print_json({"run_dir": str(run_dir), **metrics})
    else:
        print_run_summary(cfg, metrics)
    return 0


def cmd_report(args) -> int:
    from privtune.eval.report import write_report

    command = "privtune report " + " ".join(args.run_dirs) + f" --out {args.out}"
    run_dirs, missing = [Path(d) for d in args.run_dirs], []
    if args.skip_unfinished:
        from privtune.eval.report import load_run

        for run_dir in list(run_dirs):
            try:
                load_run(run_dir)
            except UserError as err:  # unfinished or failed: listed, not reported
                run_dirs.remove(run_dir)
                missing.append({"run_dir": str(run_dir), "why": str(err)})
        if not run_dirs:
            raise UserError(f"none of the {len(missing)} runs has finished ({missing[0]['why']})",
                            "see privtune status RUN_DIR for each")
    result = write_report(run_dirs, Path(args.out), command=command)
    if missing:
        result["missing"] = missing
        with open(Path(result["out"]) / "report.md", "a") as f:
            f.write("\n## Not in this report\n\n" + "".join(f"- `{m['run_dir']}`: {m['why']}\n" for m in missing))
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(Path(result["out"], "report.md").read_text())
        sys.stdout.write(f"\nwritten: {result['out']}/report.md, plots: {', '.join(result['plots'])}\n")
    return 1 if missing else 0


def cmd_plan(args) -> int:
    """Print each run's resource plan; refuse (exit 2, one line) the first that does not fit, naming a change that
    does. Nothing is loaded or downloaded: shapes come from the model's config (trainers/resources.py)."""
    from privtune.launch.preflight import training_units
    from privtune.launch.sweep import load_sweep
    from privtune.trainers.resources import GIB, USABLE, plan_resources, smallest_fix

    _, runs = load_sweep(args.config, args.overrides)
    where = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory)
    results = []
    for cfg in runs:
        try:
            units = training_units(cfg) if cfg.train.max_steps is None else None
        except UserError:  # e.g. a data file that is on the cluster only: the plan then names no step count
            units = None
        plan = plan_resources(cfg, num_units=units, **where)
        fix = None if plan.fits else smallest_fix(cfg, **where)
        results.append((cfg, plan, fix))
    if args.json:
        docs = [{"run": cfg.name, **plan.to_dict(), "fix": fix} for cfg, plan, fix in results]
        _print_json(docs[0] if len(docs) == 1 else {"runs": docs})
    else:
        sys.stdout.write("\n\n".join((f"# run {cfg.name}\n" if len(results) > 1 else "") + plan.describe()
                                      for cfg, plan, _ in results) + "\n")
    for cfg, plan, fix in results:
        if not plan.fits:
            run = f"run {cfg.name}: " if len(results) > 1 else ""
            raise UserError(f"{run}{plan.total / GIB:.1f} GiB per GPU does not fit in {USABLE:.0%} of "
                            f"{args.gpu_memory:g} GiB", f"try {fix}" if fix else
                            "no micro-batch, preset, node count up to 64 or LoRA tried fits: use GPUs with more memory")
    return 0


def _slurm_flags_given(args) -> bool:
    return any(getattr(args, name, None) not in (None, False) for name in (*SLURM_FLAGS, "dry_run"))


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text} is not I/K", "write e.g. --shard 0/4 (shards 0 to K-1)") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text}: the shard must lie in 0..K-1 with K >= 1", "write e.g. --shard 3/4")
    return index, count


def _slurm_flag_values(args) -> dict:
    return {name: getattr(args, name, None) for name in SLURM_FLAGS}


def _show_submission(args, result: dict, lines: list[str]) -> int:
    if args.json:
        _print_json(result)
    elif result.get("dry_run"):
        sys.stdout.write("\n".join(result[k] for k in ("rendered", "rendered_report", "rendered_merge")
                                   if result.get(k)))
    else:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_submit(args) -> int:
    from privtune.launch.submit import slurm_request, submit_run
    from privtune.launch.sweep import load_sweep

    name, runs = load_sweep(args.config, args.overrides)
    if len(runs) > 1 or runs[0].name != name:
        raise UserError(f"{args.config} holds a grid (a sweep)",
                        "submit it with `privtune sweep CONFIG --slurm` (or pass grid=null for its base run)")
    cfg = runs[0]
    result = submit_run(cfg, slurm_request(cfg, _slurm_flag_values(args)), command=args.command_line,
                        dry_run=args.dry_run)
    if result.get("finished"):
        lines = [f"run {result['run_dir']} has finished: nothing to submit (privtune status {result['run_dir']})"]
    elif result.get("dry_run"):
        lines = []
    else:
        lines = [f"submitted job {result['job_id']}: run {result['run_dir']}",
                 f"  log {result['log']}", f"  follow it with: privtune status {result['run_dir']}"]
    return _show_submission(args, result, lines)


def _submit_sweep(args, name, runs) -> int:
    from privtune.launch.submit import slurm_request, submit_sweep

    result = submit_sweep(name, runs, slurm_request(runs[0], _slurm_flag_values(args)), throttle=args.throttle,
                          command=args.command_line, dry_run=args.dry_run)
    skipped = result["skipped_finished"]
    lines = [f"sweep {name}: {len(runs)} runs, {len(skipped)} already finished"
             + (f" ({', '.join(skipped)})" if skipped else "")]
    if result.get("array_job_id"):
        lines += [f"submitted array job {result['array_job_id']} ({len(runs) - len(skipped)} tasks) and report job "
                  f"{result['report_job_id']} (after all of them): {result['report']}/report.md",
                  f"  follow it with: privtune status {result['array_job_id']}"]
    return _show_submission(args, result, lines)


def _submit_eval(args, cfg, run_dir: Path) -> int:
    from privtune.launch.submit import slurm_request, submit_eval

    result = submit_eval(cfg, run_dir, slurm_request(cfg, _slurm_flag_values(args)), shards=args.shards,
                         command=args.command_line, dry_run=args.dry_run)
    lines = [f"submitted eval of {run_dir}: {args.shards} shard task(s) in array job {result['shard_job_id']}, "
             f"merged by job {result['merge_job_id']}", f"  follow it with: privtune status {run_dir}"]
    return _show_submission(args, result, lines)


def cmd_status(args) -> int:
    from privtune.cluster.status import status_command

    return status_command(args.target, as_json=args.json, print_json=_print_json)


def cmd_winrate(args) -> int:
    from privtune.eval.winrate import WinrateSettings, run_winrate
    from privtune.eval.winrate.inputs import load_instructions, resolve_model
    from privtune.eval.winrate.judges import DEFAULT_JUDGE, make_judge
    from privtune.eval.winrate.run import check_judge_inputs, describe

    # Every input checked before the first model loads.
    settings = WinrateSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype,
                               seed=args.seed, resamples=args.resamples)
    if args.tie_margin < 0 or args.judge_timeout <= 0:
        raise UserError("--tie-margin must be >= 0 and --judge-timeout > 0", "pass e.g. --tie-margin 0.1 --judge-timeout 60")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file", "pass a folder for winrate.json and the answers")
    instructions = load_instructions(Path(args.instructions))
    models = tuple(resolve_model(spec) for spec in args.models)
    judge = make_judge(args.judge or DEFAULT_JUDGE, tie_margin=args.tie_margin, batch_size=args.batch_size,
                       timeout=args.judge_timeout, dtype=args.dtype, seed=args.seed)
    check_judge_inputs(judge, instructions, Path(args.instructions))
    result = run_winrate(models, instructions, judge, Path(args.out), settings=settings,
                         instructions_path=Path(args.instructions))
    if not result:  # a non-main rank: rank 0 reports
        return 0
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "per_instruction"})
    else:
        sys.stdout.write(describe(result) + "\n")
    return 0


def cmd_budget(args) -> int:
    if args.delta is None:
        raise UserError("privtune budget needs --delta", "add e.g. --delta 1e-6")
    from privtune.accounting.cli import budget_command

    return budget_command(args.paths, delta=args.delta, as_json=args.json,
                          allow_reproducible=args.allow_reproducible)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # privtune never downloads at run time
    # stderr shows privtune's own progress: no weight-loading bars or advisory warnings from the libraries
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if shutil.which("nvidia-smi") is None:  # else DeepSpeed's import warns on *stdout*, corrupting --json
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    argv = sys.argv[1:] if argv is None else argv
    try:
        # `budget calibrate` takes its own flags: route them before the main parser sees them.
        if len(argv) >= 2 and argv[0] == "budget" and argv[1] == "calibrate":
            cal = build_calibrate_parser().parse_args(argv[2:])
            from privtune.accounting.cli import calibrate_command

            return calibrate_command(epsilon=cal.epsilon, delta=cal.delta, sample_rate=cal.sample_rate,
                                     steps=cal.steps, accountant=cal.accountant, as_json=cal.json)
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # `privtune plan CONFIG --nodes 2 key=value`: overrides may follow the flags
        if extra and args.command in ("plan", "submit", "sweep") and all("=" in x and not x.startswith("-")
                                                                          for x in extra):
            args.overrides, extra = [*args.overrides, *extra], []
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.version:
            from privtune import __version__

            sys.stdout.write(f"privtune {__version__}\n")
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        if args.command in PLANNED:
            raise UserError(f"`privtune {args.command}` ({PLANNED[args.command]}) is not implemented yet",
                            "use `privtune run CONFIG` for now")
        args.command_line = "privtune " + shlex.join(argv)
        handler = {"run": cmd_run, "validate": cmd_validate, "data": cmd_data, "budget": cmd_budget,
                   "sweep": cmd_sweep, "eval": cmd_eval, "report": cmd_report, "plan": cmd_plan,
                   "submit": cmd_submit, "status": cmd_status, "winrate": cmd_winrate}[args.command]
        if not getattr(args, "json", False) or args.command in ("budget", "validate"):
            return handler(args)
        # --json: stdout carries exactly one JSON document; anything a library prints goes to stderr.
        real_stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            global _JSON_OUT
            _JSON_OUT = real_stdout
            try:
                return handler(args)
            finally:
                _JSON_OUT = None
    except UserError as err:
        sys.stderr.write(f"privtune: error: {err}\n")
        return err.exit_code
    except BrokenPipeError:  # `privtune report ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        from privtune.errors import Preempted

        if not isinstance(err, Preempted):
            raise
        name = signal.Signals(err.signum).name
        sys.stderr.write(f"privtune: stopped by {name} ({err.args[0]}); a checkpoint was written: run the same "
                         "command to resume\n")
        return 128 + err.signum
    except KeyboardInterrupt as err:  # outside training (or Ctrl-C twice in it): say what is kept
        what = str(err) or "interrupted; finished stages and the examples already scored are kept, the same command resumes"
        sys.stderr.write(f"privtune: {what}\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
