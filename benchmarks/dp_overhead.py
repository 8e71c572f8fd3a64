"""DP overhead benchmark (issue 5): time per token and peak memory of privtune's real DP step against the non-DP
step and against Opacus 1.6, in three settings ("cases"), in one run.

    python benchmarks/dp_overhead.py                                   # all cases, smollm2-135m, CPU / CUDA auto
    python benchmarks/dp_overhead.py --cases logical64 --configs full,dp --steps 2
    python benchmarks/dp_overhead.py --model tiny-llama --seq 16 --micro-batch 2 --micro-batches 2 \\
        --steps 1 --warmup 1 --out /tmp/bench_smoke.md                 # smoke test (seconds; JSON next to --out)
    python benchmarks/dp_overhead.py --render benchmarks/dp_overhead.json   # re-render RESULTS.md only

Cases (``--cases``, default all three):

- ``micro8x128``: one micro-batch of ``--micro-batch`` x ``--seq`` (8 x 128) random tokens; logical step = it.
- ``logical64``: a logical batch of ``--micro-batches`` (8) such micro-batches (64 rows); Opacus accumulates as
  its BatchMemoryManager does (``signal_skip_step``), privtune runs ``DPStep.run`` over the 8 micro-batches.
- ``recipe``: ``FineTuneRecipe``'s own ``_dp_step`` / ``_plain_step`` on configs/quickstart.yaml's data (Poisson
  batches, ragged lengths), its run dir in a temporary folder (never the repo's runs/).

Configurations (``--configs`` keeps a subset; every case runs those it has): ``full`` / ``lora`` (``PlainStep``),
``dp`` / ``dp-lora`` (``DPStep``, flat clipping, secret-key noise), ``opacus-hooks`` / ``opacus-hooks-lora``
(``make_private(grad_sample_mode="hooks")``), ``opacus-ghost`` (refuses the tied embedding / LM head: recorded as
a failure), ``opacus-ghost-untied`` / ``dp-untied`` (LM head untied, +28M parameters, so ghost clipping runs),
``opacus-ghost-lora`` (on request). LoRA: peft r=8, alpha=16, all-linear (privtune's defaults).

How it measures (benchmarks/dp_bench/measure.py): every configuration runs in its own worker process, so one's
peak memory does not pollute another's. Per configuration: ``--warmup`` untimed steps, ``--steps`` timed steps
(default: logical64 1, recipe 3, micro8x128 2; median step time, time per token = total time / tokens), then one step
under ``torch.profiler`` whose ``record_function`` labels (those of the real code, plus the benchmark's own
``optimizer`` and ``opacus.*`` around its own calls) give the phase split. ``--mode sequential`` runs each
configuration alone; ``--mode interleaved`` runs the compared configurations of a case as a group that takes its
steps in turns (ABC, CBA, ...), for a shared machine; ``--mode auto`` (default) waits up to ``--max-wait`` s for
the load average to drop below ``--max-load`` and picks sequential if it did. On this 2-core CPU the default run
takes about 35 minutes on 2 CPU cores (logical64 dominates); ``--cases`` / ``--configs`` trim or extend it.

Output: tables on stdout (rich; ``--json``: the raw JSON instead), the section between ``<!-- dp_overhead:start -->``
and ``<!-- dp_overhead:end -->`` of ``--out`` (default benchmarks/RESULTS.md; other sections untouched; the
hand-written analysis of benchmarks/dp_overhead_notes.md appended), and the raw numbers in ``--json-out``
(default: dp_overhead.json next to ``--out``). Opacus is used here only, never in privtune.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # dp_bench lives next to this script (also when imported by path, as tests do)
    sys.path.insert(0, str(HERE))

from dp_bench import (  # noqa: E402
    CASE_CONFIGS,
    CASES,
    CONFIGS,
    DEFAULT_STEPS,
    FORMAT,
    INTERLEAVED_GROUPS,
    RECIPE_CONFIGS,
    render,  # noqa: E402
)
from dp_bench.measure import PROTOCOL, Options, load_average, machine_info, worker_spec  # noqa: E402

NOTES_FILE = HERE / "dp_overhead_notes.md"  # hand-written analysis appended to the section, when present


# ----------------------------------------------------------------------------------------------------------------
# Workers: one process per configuration, driven over stdin / stdout (protocol in dp_bench.measure.serve)


class Worker:
    def __init__(self, case: str, name: str, args, opts: Options):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve",
               worker_spec(case, name, warmup=args.warmup, opts=opts)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        if args.omp_wait_policy not in ("default", "auto"):
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        self.failure: str | None = None
        hello = self._read()
        if hello is not None and not hello.get("ready"):
            self.failure = hello.get("error") or "setup failed"

    def _read(self) -> dict | None:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        code = self.proc.wait()
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if code in (-9, 137):
            why += " (likely out of memory)"
        self.stderr.seek(0)
        tail = re.sub(r"\s+", " ", self.stderr.read()[-400:])
        self.failure = f"worker {why}: {tail}"
        return None

    def command(self, what: str) -> bool:
        """Send "step" or "profile"; False (and ``failure`` set) if the worker failed."""
        if self.failure is not None:
            return False
        if self.proc.poll() is not None:
            self._read()
            return False
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if reply is None or not reply.get("ok"):
            if reply is not None:
                self.failure = reply.get("error")
            return False
        return True

    def finish(self) -> dict:
        reply = None
        if self.proc.poll() is None:
            self.proc.stdin.write("finish\n")
            self.proc.stdin.flush()
            reply = self._read()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()
        self.stderr.close()
        if reply is not None and "result" in reply:
            return reply["result"]
        return {"name": self.name, "status": "error", "error": self.failure or "worker ended without a result"}


def run_group(case: str, names: list[str], args, opts: Options, steps: int, log) -> dict:
    """Start one worker per configuration (one after another), let them step in turns (ABC, CBA, ...), then
    each takes its profiled step and reports."""
    load_start, t0 = load_average(), time.time()
    workers = []
    for name in names:
        w = Worker(case, name, args, opts)
        if w.failure:
            log(f"  {name}: FAILED during setup: {w.failure}")
        workers.append(w)
    total = args.warmup + steps
    for k in range(total):
        for w in (workers if k % 2 == 0 else workers[::-1]):
            if w.failure is None and not w.command("step"):
                log(f"  {w.name}: FAILED at step {k}: {w.failure}")
        live = [w.name for w in workers if w.failure is None]
        if live:
            log(f"  step {k + 1}/{total} of {', '.join(live)} (load {load_average():.2f})")
    for w in workers:
        if case == "logical64" and CONFIGS[w.name][1].startswith("opacus"):
            # Opacus's phases are coarse anyway (its step is one label), and its per-sample gradients of 8
            # micro-batches under the profiler ran out of the 24 GiB of the CPU machine: timed steps only.
            log(f"  {w.name}: not profiled (logical64: Opacus is timed only)")
            continue
        if w.failure is None and not w.command("profile"):
            log(f"  {w.name}: FAILED in the profiled step: {w.failure}")
    results = {w.name: w.finish() for w in workers}
    return {"configs": names, "results": results, "load_start": load_start, "load_end": load_average(),
            "wall_s": time.time() - t0}


def wait_for_quiet(max_load: float, max_wait: float, log) -> tuple[float, float]:
    """Wait (up to max_wait s) until the 1-minute load average is below max_load; returns (load, waited)."""
    t0 = time.time()
    load = load_average()
    while load >= max_load and time.time() - t0 < max_wait:
        log(f"load average {load:.2f} >= {max_load}: waiting ({time.time() - t0:.0f}/{max_wait:.0f} s)")
        time.sleep(min(30.0, max(1.0, max_wait - (time.time() - t0))))
        load = load_average()
    return load, time.time() - t0


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _names(text: str | None, allowed, what: str) -> list[str] | None:
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return names


def case_groups(case: str, mode: str, keep: list[str] | None) -> list[list[str]]:
    """The groups of configurations a case runs: each alone (sequential) or the compared ones together."""
    if keep is None:
        names = list(CASE_CONFIGS[case])
    else:  # an asked-for configuration runs in every case that can run it
        names = [n for n in keep if case != "recipe" or n in RECIPE_CONFIGS]
    if mode != "interleaved":
        return [[n] for n in names]
    groups, placed = [], set()
    for part in INTERLEAVED_GROUPS[case].split(";"):
        g = [n for n in part.split(",") if n in names]
        if len(g) == 1 and g[0] in placed:
            continue  # what is left of a group is a configuration that already runs elsewhere
        if g:
            groups.append(g)
            placed.update(g)
    return groups + [[n] for n in names if n not in placed]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    ap.add_argument("--configs", help="keep only these configurations (comma-separated), in every case that has them")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default: logical64 1, recipe 3, micro8x128 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (AdamW state allocation, page-ins)")
    ap.add_argument("--model", default="smollm2-135m", help="registry name (tiny-llama for smoke tests)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row (micro8x128, logical64)")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch (micro8x128, logical64)")
    ap.add_argument("--micro-batches", type=int, default=8, help="micro-batches per logical step (logical64)")
    ap.add_argument("--recipe-config", default="configs/quickstart.yaml", help="the recipe case's config")
    ap.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the recipe case's config (repeatable)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (as performance.precision=bf16)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--mode", default="auto", choices=["auto", "sequential", "interleaved"],
                    help="sequential: each configuration alone, one after the other (a quiet machine);\n"
                         "interleaved: compared configurations take their steps in turns (a busy machine);\n"
                         "auto (default): sequential if the load average dropped below --max-load, else interleaved")
    ap.add_argument("--omp-wait-policy", default="auto", choices=["auto", "PASSIVE", "ACTIVE", "default"],
                    help="OMP_WAIT_POLICY of the workers. On a busy machine spinning OpenMP threads wait for\n"
                         "descheduled peers and a 2-thread step gets many times slower (tiny-llama: 100x), which\n"
                         "PASSIVE avoids; on a quiet one PASSIVE costs ~10 %%. auto (default): PASSIVE when\n"
                         "interleaved or when the load average at the start is >= 1, else the environment's")
    ap.add_argument("--max-load", type=float, default=2.5, help="wait for the 1-min load average to drop below this")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine (then run anyway)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file whose dp_overhead section is rewritten")
    ap.add_argument("--json-out", help="raw JSON file (default: dp_overhead.json next to --out)")
    ap.add_argument("--no-write", action="store_true", help="write neither --out nor --json-out")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON on stdout instead of tables")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the section of --out from a saved raw JSON file\n"
                    "(e.g. after editing benchmarks/dp_overhead_notes.md)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _notes() -> str:
    return NOTES_FILE.read_text() if NOTES_FILE.exists() else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:  # worker process: one configuration
        from dp_bench.measure import serve

        return serve(args.serve)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        render.check_format(raw)
        render.write_section(Path(args.out), render.markdown(raw, _notes()), measured=raw["meta"]["date"])
        return 0

    def log(msg):
        print(f"[dp_overhead] {msg}", file=sys.stderr, flush=True)

    import torch

    cases = _names(args.cases, CASES, "case(s)") or list(CASES)
    keep = _names(args.configs, CONFIGS, "configuration(s)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    load, waited = wait_for_quiet(args.max_load, args.max_wait, log)
    mode = args.mode if args.mode != "auto" else ("sequential" if load < args.max_load else "interleaved")
    if args.omp_wait_policy == "auto":  # spinning OpenMP threads wait for peers that other jobs descheduled
        args.omp_wait_policy = "PASSIVE" if mode == "interleaved" or load >= 1.0 else "default"
    log(f"mode: {mode}, OMP_WAIT_POLICY={args.omp_wait_policy} (load {load:.2f}), device {device}")
    t0 = time.time()
    raw_cases = {}
    for case in cases:
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[case]
        opts = Options(model=args.model, seq=args.seq, micro_batch=args.micro_batch, micro_batches=args.micro_batches,
                       device=device, bf16=args.bf16, threads=args.threads, clip_norm=args.clip_norm,
                       sigma=args.sigma, lr=args.lr, recipe_config=args.recipe_config,
                       recipe_overrides=list(args.recipe_set), recipe_steps=args.warmup + steps + 1)
        rows, count = opts.geometry(case)
        geometry = ({"rows": rows * count, "micro_batch": rows, "micro_batches": count, "seq": args.seq}
                    if case != "recipe" else {})
        groups = []
        spec = case_groups(case, mode, keep)
        for i, names in enumerate(spec, 1):
            log(f"{case}: group {i}/{len(spec)}: {', '.join(names)} (load {load_average():.2f})")
            g = run_group(case, names, args, opts, steps, log)
            for name, r in g["results"].items():
                if r.get("status") == "ok":
                    log(f"  {name}: {r['step_s']:.3f} s/step, {r['time_per_token_s'] * 1e3:.3f} ms/token, "
                        f"peak {r['peak_mem_bytes'] / 2**20:,.0f} MiB")
                else:
                    log(f"  {name}: FAILED {r.get('error')}")
                r.pop("traceback", None)
            groups.append(g)
        raw_cases[case] = {"geometry": geometry, "steps": steps, "warmup": args.warmup, "groups": groups}
    given = sys.argv[1:] if argv is None else list(argv)
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=" ".join(["python benchmarks/dp_overhead.py", *given]), wall_min=(time.time() - t0) / 60,
                machine=machine_info(device), threads=args.threads, load_before=load, load_after=load_average(),
                waited_s=waited, omp_wait_policy=args.omp_wait_policy, mode=mode, max_load=args.max_load,
                model=args.model, seq=args.seq, micro_batch=args.micro_batch, micro_batches=args.micro_batches,
                bf16=args.bf16, clip_norm=args.clip_norm, sigma=args.sigma, lr=args.lr, warmup=args.warmup)
    raw = {"format": FORMAT, "meta": meta, "cases": raw_cases}
    raw["targets"] = render.targets(raw)  # derived (render recomputes them); kept for readers of the JSON
    if args.json:
        print(json.dumps(raw, indent=2))
    else:
        render.print_tables(raw)
    if not args.no_write:
        out = Path(args.out)
        json_out = Path(args.json_out) if args.json_out else out.parent / "dp_overhead.json"
        render.write_section(out, render.markdown(raw, _notes()), measured=meta["date"])
        json_out.write_text(json.dumps(raw, indent=1) + "\n")
        log(f"wrote the dp_overhead section of {out} and {json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
