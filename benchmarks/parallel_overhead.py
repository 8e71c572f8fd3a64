"""DP / non-DP step time under each parallel preset, 2 processes (torchrun, gloo), on the recipe's own step.

    python benchmarks/parallel_overhead.py                       # ddp fsdp2 zero1 zero2 zero3, ~15 min on 2 cores
    python benchmarks/parallel_overhead.py --presets fsdp2 --steps 3 --out /tmp/r.md   # a quick look

For each preset one ``torchrun --nproc_per_node 2`` launch runs this file's worker, which builds
``FineTuneRecipe`` for full, dp, lora and dp-lora in turn (the quickstart data, the embedded model unless
``--model``) and times its real step: ``_plain_step`` / ``_dp_step`` then ``parallel.step()``, exactly as
``FineTuneRecipe.train`` runs them, with a barrier before and after each step so the time is the slowest rank's.
The first ``--warmup`` steps are not timed. Reported: median seconds per step, tokens per second (both ranks),
and the ratios dp/full and dp-lora/lora of **time per token** (DP batches are Poisson: their size varies), all
measured in the same launch. The DP rows use the default secret-key noise.

Writes the ``parallel_overhead`` section of ``--out`` (default benchmarks/RESULTS.md) and the raw JSON beside it.
Run it alone: on a shared 2-core machine another job changes the ratios (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
PRESETS = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
METHODS = ("full", "dp", "lora", "dp-lora")
PROTOCOL = "@@parallel_overhead@@ "


# ----------------------------------------------------------------------------------------------------------------
# Worker (one per preset, under torchrun)


def worker(args) -> None:

    from privtune.launch.pipeline import ensure_data
    from privtune.launch.sweep import load_sweep
    from privtune.process import current
    from privtune.trainers.recipe import FineTuneRecipe

    state = current()
    out = {}
    for method in args.methods.split(","):
        overrides = ["grid=null", f"name=bench-{method}", f"output_dir={args.tmp}/runs", f"train.method={method}",
                     f"model.name={args.model}", "train.self_check_every=null", f"train.max_steps={args.steps + 9}",
                     f"performance.parallel={args.preset}", "performance.num_threads=1",
                     f"performance.micro_batch_size={args.micro_batch}", f"train.batch_size={args.batch}",
                     f"data.max_length={args.max_length}"]
        _, (cfg,) = load_sweep(REPO / "configs" / "quickstart.yaml", overrides)
        with state.main_first():
            run_dir, _ = ensure_data(cfg)
        recipe = FineTuneRecipe(cfg, run_dir)
        recipe.setup()
        recipe.first_step = recipe.step
        try:
            out[method] = _time_steps(recipe, args)
        except Exception as err:  # noqa: BLE001 - a refusal (e.g. ZeRO's update check) is a result to report
            out[method] = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
        recipe.cleanup()
        del recipe
    if state.rank == 0:
        print(PROTOCOL + json.dumps({"preset": args.preset, "methods": out}), flush=True)


def _time_steps(recipe, args) -> dict:
    import torch
    import torch.distributed as dist

    seconds, tokens = [], []
    for k in range(args.warmup + args.steps):
        dist.barrier()
        started = time.perf_counter()
        stats = recipe._dp_step() if recipe.is_dp else recipe._plain_step()
        recipe._check_every_parameter_has_a_gradient()
        recipe.parallel.step()
        recipe.step += 1
        dist.barrier()
        elapsed = time.perf_counter() - started
        total = torch.tensor([stats.tokens], dtype=torch.float64)
        dist.all_reduce(total)
        if k >= args.warmup:
            seconds.append(elapsed)
            tokens.append(float(total))
    return {"seconds": seconds, "tokens": tokens, "seconds_per_step": statistics.median(seconds),
            "seconds_per_token": statistics.median(s / t for s, t in zip(seconds, tokens, strict=True))}


# ----------------------------------------------------------------------------------------------------------------
# Driver


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(args) -> dict:
    from dp_bench.measure import machine_info

    results = {"command": "python benchmarks/parallel_overhead.py " + " ".join(sys.argv[1:]),
               "machine": machine_info("cpu"), "load_start": _load(), "settings": {
                   "model": args.model, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch,
                   "micro_batch_size": args.micro_batch, "max_length": args.max_length, "processes": 2,
                   "threads_per_process": 1}, "presets": {}}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="parallel_overhead_") as tmp:
        for preset in args.presets.split(","):
            before = _load()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(_port()), str(Path(__file__).resolve()), "--worker", "--preset", preset, "--tmp", tmp,
                   "--methods", args.methods, "--model", args.model, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
                   "--max-length", str(args.max_length)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            print(f"[parallel_overhead] {preset}: {' '.join(args.methods.split(','))} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith(PROTOCOL)]
            if proc.returncode != 0 or not lines:
                results["presets"][preset] = {"error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
                print(f"[parallel_overhead] {preset} failed: {proc.stderr[-1500:]}", file=sys.stderr)
                continue
            entry = json.loads(lines[-1][len(PROTOCOL):])["methods"]
            entry["load"] = [before, _load()]
            results["presets"][preset] = entry
    results["load_end"] = _load()
    results["minutes"] = round((time.time() - started) / 60, 1)
    return results


def _ok(entry: dict, method: str) -> bool:
    return method in entry and "error" not in entry[method]


def _ratio(entry: dict, a: str, b: str) -> float | None:
    if _ok(entry, a) and _ok(entry, b):
        return entry[a]["seconds_per_token"] / entry[b]["seconds_per_token"]
    return None


def render(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [f"Command: `{results['command'].strip()}` ({results['minutes']} min)  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gib', '?')} GiB RAM; torch {m['torch']}, "
             f"transformers {m['transformers']}, peft {m['peft']}  ",
             f"Setup: 2 processes (torchrun, gloo), 1 thread each; model {s['model']}; quickstart data, sequence "
             f"≤ {s['max_length']}; logical batch {s['batch_size']} (expected batch under DP), micro-batch "
             f"{s['micro_batch_size']}; {s['warmup']} warm-up + {s['steps']} timed steps per method; DP noise from "
             "the default secret key.  ",
             f"Load average (1 min): {results['load_start']:.2f} at the start, {results['load_end']:.2f} at the end.",
             "", "The step timed is the recipe's own (`_plain_step` / `_dp_step` + `parallel.step()`), as "
             "`FineTuneRecipe.train` runs it; ratios are of time per token, measured in one launch per preset.", "",
             "| preset | full s/step | dp s/step | lora s/step | dp-lora s/step | **dp / full** | **dp-lora / lora** | "
             "load before → after |", "|---|---|---|---|---|---|---|---|"]
    for preset, entry in results["presets"].items():
        if "error" in entry:
            lines.append(f"| {preset} | failed: {entry['error'][0][:80]} | | | | | | |")
            continue

        def cell(method, entry=entry):
            if method in entry and "error" in entry[method]:
                return "refused (below)"
            return f"{entry[method]['seconds_per_step']:.2f}" if method in entry else "–"

        ratios = [_ratio(entry, "dp", "full"), _ratio(entry, "dp-lora", "lora")]
        shown = [f"**{r:.2f}×**" if r is not None else "–" for r in ratios]
        if "earlier_run" in entry:
            preset = f"{preset} (earlier run)"
        lines.append(f"| {preset} | {cell('full')} | {cell('dp')} | {cell('lora')} | {cell('dp-lora')} | {shown[0]} | "
                     f"{shown[1]} | {entry['load'][0]:.2f} → {entry['load'][1]:.2f} |")
    earlier = {e["earlier_run"] for e in results["presets"].values() if "earlier_run" in e}
    if earlier:
        lines += ["", "Rows marked *earlier run* come from the same script minutes before, on the same quiet "
                  f"machine: `{'`, `'.join(sorted(earlier))}` (each row's ratios are from one launch)."]
    errors = [(preset, method, e["error"]) for preset, entry in results["presets"].items() if "error" not in entry
              for method, e in entry.items() if isinstance(e, dict) and "error" in e]
    if errors:
        lines += ["", "Refused or failed at run time:"]
        lines += [f"- {preset} {method}: `{text}`" for preset, method, text in errors]
    lines += ["", "Targets (issue 13): dp / full ≤ 1.15×, dp-lora / lora ≤ 1.05× per preset."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--merge", help="an earlier run's JSON: its presets not measured now are shown too, marked")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = run(args)
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        for preset, entry in earlier["presets"].items():
            if preset not in results["presets"] and "error" not in entry:
                results["presets"][preset] = {**entry, "earlier_run": earlier["command"]}
    out = Path(args.out)
    out.with_name("parallel_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    from results import replace_section

    replace_section(out, "parallel_overhead", "Parallel presets: DP / non-DP step time, 2 processes (issue 13)",
                    render(results))
    print(render(results))


if __name__ == "__main__":
    main()
