"""The raw JSON of a run -> the markdown section of benchmarks/RESULTS.md and the rich tables on stdout.

Everything derived (ratios, target checks, "Opacus's faster mode", the phase split) is computed here from the raw
numbers, so ``--render`` of a saved JSON gives the same section as the run that wrote it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from . import (
    CASES,
    FORMAT,
    LABEL_TREE,
    OPACUS_COUNTERPARTS,
    RATIOS,
    SECTION_KEY,
    SECTION_NAME,
    TARGETS,
    TOP_LEVEL,
)

# Phase-table columns: (heading, labels that fill it: privtune's, the non-DP step's, the benchmark's own Opacus
# ones). A "↳" column is a part of the column before it (labels nest); "other" = the step minus the top-level labels.
PHASE_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("forward", ("dp.forward", "full.forward", "opacus.forward")),
    ("backward", ("dp.backward", "full.backward", "opacus.backward")),
    ("↳ autograd", ("dp.autograd",)),
    ("↳ clip", ("dp.clip",)),
    ("↳↳ norms", ("dp.clip.norms",)),
    ("↳↳ clipped sum", ("dp.clip.sum",)),
    ("noise", ("dp.noise", "full.reduce")),
    ("set grads", ("dp.set_grads",)),
    ("optimizer", ("optimizer", "opacus.step")),
)
assert {label for _, labels in PHASE_COLUMNS for label in labels} == {label for label, _ in LABEL_TREE}


def _f(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _mb(n) -> str:
    return f"{n / 2**20:,.0f}" if isinstance(n, (int, float)) else "—"


def _ms(seconds) -> str:
    return _f(seconds * 1e3 if isinstance(seconds, (int, float)) else seconds, "{:.3f}")


def _s(seconds) -> str:
    """Seconds: two decimals from 1 s, else three (tiny smoke-test models); "<0.001" for less."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "—"
    if abs(seconds) >= 1:
        return f"{seconds:.2f}"
    return f"{seconds:.3f}" if abs(seconds) >= 0.0005 or seconds == 0 else "<0.001"


def _tokens(values: list[int]) -> str:
    return f"{values[0]}" if len(set(values)) == 1 else f"{min(values)}–{max(values)}"


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


# ----------------------------------------------------------------------------------------------------------------
# Ratios and targets


def _pair(case: dict, num: str, den: str) -> tuple[dict, dict, str] | None:
    """Results of ``num`` and ``den`` in one case: from a group that ran both (interleaved), else from the first
    group each ran in (sequential); with where they came from ("2", or "1/2")."""
    groups = case["groups"]
    for i, g in enumerate(groups, 1):
        if num in g["results"] and den in g["results"]:
            return g["results"][num], g["results"][den], str(i)
    ia = next((i for i, g in enumerate(groups, 1) if num in g["results"]), None)
    ib = next((i for i, g in enumerate(groups, 1) if den in g["results"]), None)
    if ia is None or ib is None:
        return None
    return groups[ia - 1]["results"][num], groups[ib - 1]["results"][den], f"{ia}/{ib}"


def _cpu_total(r: dict) -> float:
    return r.get("cpu_s_total", r["cpu_s"] * len(r["tokens_per_step"]))


def ratio(case: dict, num: str, den: str) -> dict | None:
    """num / den of time per token, CPU time per token and peak memory; None when either was not run."""
    found = _pair(case, num, den)
    if found is None:
        return None
    a, b, where = found
    row = {"num": num, "den": den, "group": where}
    if _ok(a) and _ok(b):
        row["time"] = a["time_per_token_s"] / b["time_per_token_s"]
        cpu_a = _cpu_total(a) / max(sum(a["tokens_per_step"]), 1)
        cpu_b = _cpu_total(b) / max(sum(b["tokens_per_step"]), 1)
        row["cpu"] = cpu_a / cpu_b if cpu_b else float("nan")
        row["memory"] = a["peak_mem_bytes"] / max(b["peak_mem_bytes"], 1)
    else:
        row["note"] = ", ".join(f"{x['name']} failed" for x in (a, b) if not _ok(x))
    return row


def opacus_faster(case: dict) -> dict | None:
    """The faster Opacus mode on the full model measured in this case, against privtune on the same model:
    {"mode", "counterpart", "opacus_tpt", "privtune_tpt", "speedup" (= Opacus time per token / privtune's)}."""
    best = None
    for mode, ours in OPACUS_COUNTERPARTS:
        found = _pair(case, mode, ours)
        if found is None or not (_ok(found[0]) and _ok(found[1])):
            continue
        theirs, mine, where = found
        row = {"mode": mode, "counterpart": ours, "group": where, "opacus_tpt": theirs["time_per_token_s"],
               "privtune_tpt": mine["time_per_token_s"]}
        row["speedup"] = row["opacus_tpt"] / row["privtune_tpt"]
        if best is None or row["opacus_tpt"] < best["opacus_tpt"]:
            best = row
    return best


def case_ratios(case: dict) -> list[dict]:
    return [r for r in (ratio(case, num, den) for num, den in RATIOS) if r is not None]


def targets(raw: dict) -> list[dict]:
    """One row per target whose case ran: {"case", "label", "value", "bound", "sense", "met" | "note"}."""
    rows = []
    for case_name, kind, num, den, bound, sense, label in TARGETS:
        case = raw["cases"].get(case_name)
        if case is None:
            continue
        row = {"case": case_name, "label": label, "bound": bound, "sense": sense, "kind": kind}
        if kind == "opacus":
            best = opacus_faster(case)
            if best is None:
                row["note"] = "no Opacus mode and its privtune counterpart both ran"
            else:
                row["value"] = best["speedup"]
                row["label"] = f"Opacus's faster mode (`{best['mode']}`) / privtune `{best['counterpart']}`, " \
                               "time per token"
        else:
            r = ratio(case, num, den)
            if r is None:
                row["note"] = f"{num} or {den} not run"
            elif "note" in r:
                row["note"] = r["note"]
            else:
                row["value"] = r["time"] if kind == "time" else r["memory"]
        if "value" in row:
            row["met"] = row["value"] <= bound if sense == "<=" else row["value"] >= bound
        rows.append(row)
    return rows


def headline(raw: dict) -> str | None:
    """The logical-batch case's dp / full time per token, on a line of its own."""
    case = raw["cases"].get("logical64")
    if case is None:
        return None
    r = ratio(case, "dp", "full")
    if r is None or "time" not in r:
        return None
    return f"**dp / full (logical batch {case['geometry']['rows']}): {r['time']:.2f}× time per token**"


# ----------------------------------------------------------------------------------------------------------------
# Phases


def phase_split(r: dict) -> dict | None:
    """{column: (seconds, share)} of the profiled step: share = the label's CPU total / the profiled step's wall
    time; seconds = share x the median unprofiled step time. Plus "other" and the profiler's overhead."""
    prof = r.get("profile")
    if not prof or not prof.get("step_s"):
        return None
    wall, phases = prof["step_s"], prof.get("phases", {})
    out: dict[str, tuple[float, float] | float] = {}
    for heading, labels in PHASE_COLUMNS:
        present = [phases[label]["cpu_s"] for label in labels if label in phases]
        if present:
            share = sum(present) / wall
            out[heading] = (share * r["step_s"], share)
    top = sum(phases[label]["cpu_s"] for label in TOP_LEVEL if label in phases)
    share = max(0.0, (wall - top) / wall)
    out["other"] = (share * r["step_s"], share)
    out["profiled_step_s"] = wall
    out["overhead"] = wall / r["step_s"] if r["step_s"] else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _case_title(name: str, case: dict) -> str:
    g = case["geometry"]
    if name == "micro8x128":
        return f"one micro-batch of {g['rows']} × {g['seq']} tokens, logical step = that micro-batch"
    if name == "logical64":
        return (f"a logical batch of {g['rows']} = {g['micro_batches']} micro-batches of {g['micro_batch']} × "
                f"{g['seq']} tokens")
    return "FineTuneRecipe's own step on the quickstart data (Poisson / shuffled batches, ragged lengths)"


def _case_notes(name: str, case: dict) -> list[str]:
    g = case["geometry"]
    if name == "micro8x128":
        return [f"Random token ids, fixed length, every position carries loss. privtune: `DPStep.run` over one "
                f"`MicroBatchInputs` (unit ids 0..{g['rows'] - 1}, expected batch size {g['rows']}) / "
                f"`PlainStep(batch_size={g['rows']})`; Opacus: one forward, backward, `DPOptimizer.step()`."]
    if name == "logical64":
        return [f"Random token ids, fixed length, every position carries loss. privtune: `DPStep.run` over "
                f"{g['micro_batches']} `MicroBatchInputs` (unit ids 0..{g['rows'] - 1}, {g['micro_batch']} per "
                f"micro-batch, expected batch size {g['rows']}) / `PlainStep(batch_size={g['rows']})` over the "
                f"{g['micro_batches']} micro-batches; Opacus: gradient accumulation as its `BatchMemoryManager` "
                "does it (each micro-batch: forward, backward, then `signal_skip_step(do_skip=True); step()` for "
                "all but the last, whose `step()` adds the noise and steps AdamW), in hooks and ghost mode alike."]
    recipe = next((r["recipe"] for g_ in case["groups"] for r in g_["results"].values() if "recipe" in r), None)
    lines = ["`FineTuneRecipe(cfg, run_dir).setup()` on a run dir prepared in a temporary folder as `privtune data` "
             "does (`ensure_data`), then each step as `FineTuneRecipe.train` runs one: `_dp_step()` / "
             "`_plain_step()`, the every-parameter-has-a-gradient guardrail, `optimizer.step()`, "
             "`scheduler.step()`, `zero_grad`, `step += 1` (no training log, ledger or checkpoint writes). "
             "Tokens = the real tokens of each step (`StepStats.tokens`); batch sizes differ per step, so compare "
             "time per token."]
    if recipe:
        lines.append(f"Config: `{recipe['config']}` with `grid=null`, `train.method=<configuration>`, "
                     + ", ".join(f"`{o}`" for o in recipe["overrides"])
                     + f"; {recipe['train_examples']} training examples, batch size "
                     f"{recipe['batch_size']} (DP: the expected size of a Poisson batch), micro-batch "
                     f"{recipe['micro_batch_size']}, max length {recipe['max_length']}. `train.self_check_every=null` "
                     "(the DP self-check off, so no step pays for it); `train.max_steps` only makes the plan cover "
                     "the measured steps (it changes σ, not the work).")
    return lines


def _results_table(case: dict) -> list[str]:
    lines = ["| group | configuration | trainable params | step time (s) | rows / step | tokens / step | "
             "time per token (ms) | tokens/s | CPU time (s) | peak memory (MiB) | load before → after | status |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for i, g in enumerate(case["groups"], 1):
        load = f"{g['load_start']:.1f} → {g['load_end']:.1f}"
        for name, r in g["results"].items():
            if _ok(r):
                lines.append(f"| {i} | `{name}` | {r['trainable_params'] / 1e6:.2f}M | {_s(r['step_s'])} | "
                             f"{_tokens(r['units_per_step'])} | {_tokens(r['tokens_per_step'])} | "
                             f"{_ms(r['time_per_token_s'])} | {_f(r['tokens_per_s'], '{:.0f}')} | {_s(r['cpu_s'])} | "
                             f"{_mb(r['peak_mem_bytes'])} | {load} | ok |")
            else:
                lines.append(f"| {i} | `{name}` | | | | | | | | | {load} | **failed** (below) |")
    return lines


def _ratio_table(rows: list[dict]) -> list[str]:
    lines = ["| ratio | group | time per token | CPU time per token | peak memory |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        label = f"`{r['num']}` / `{r['den']}`"
        if "time" in r:
            lines.append(f"| {label} | {r['group']} | {r['time']:.3f}× | {r['cpu']:.3f}× | {r['memory']:.2f}× |")
        else:
            lines.append(f"| {label} | {r['group']} | — | — | — ({r['note']}) |")
    return lines


def _phase_table(case: dict) -> list[str]:
    firsts: dict[str, dict] = {}
    for g in case["groups"]:
        for name, r in g["results"].items():
            if _ok(r):
                firsts.setdefault(name, r)
    if not firsts:
        return []
    heads = [h for h, _ in PHASE_COLUMNS] + ["other"]
    lines = ["| configuration | " + " | ".join(heads) + " | step (s) | profiled step (s) |",
             "|---|" + "---:|" * (len(heads) + 2)]
    for name, r in firsts.items():
        split = phase_split(r)
        if split is None:
            continue
        cells = []
        for h in heads:
            cell = split.get(h)
            cells.append("" if cell is None else f"{_s(cell[0])} ({cell[1]:.0%})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_s(r['step_s'])} | {_s(split['profiled_step_s'])} |")
    return lines


def markdown(raw: dict, notes: str = "") -> str:
    """The section body (without its title, which ``replace_section`` adds)."""
    meta, m = raw["meta"], raw["meta"]["machine"]
    lines = [
        f"Command: `{meta['command']}` ({meta['wall_min']:.1f} min, finished {meta['date']})  ",
        f"Machine: {m['cpu']}, {m['cores']} cores visible, {m.get('ram_gib', '?')} GiB RAM; device `{m['device']}`"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; {meta['threads']} torch threads per worker, OMP_WAIT_POLICY={meta['omp_wait_policy']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, opacus {m['opacus']}, "
        f"Python {m['python']}  ",
        f"Load average (1 min): {meta['load_before']:.2f} at the start (after waiting {meta['waited_s']:.0f} s for "
        f"< {meta['max_load']}), {meta['load_after']:.2f} at the end; per group (before → after) in the tables "
        f"below. Mode: **{meta['mode']}** — "
        + ("the configurations of a group take their steps in turns (ABC, CBA, ...) so that they see the same "
           "load, and ratios are taken inside a group (the machine was shared)."
           if meta["mode"] == "interleaved" else
           "each configuration alone in its own worker process, one after the other."),
        "",
    ]
    per_case_steps = ", ".join(f"{c}: {case['steps']}" for c, case in raw["cases"].items())
    head = headline(raw)
    if head:
        lines += [head, ""]
    rows = targets(raw)
    if rows:
        lines += ["Targets:", "", "| case | measured | value | target | met? |", "|---|---|---:|---:|---|"]
        for t in rows:
            if "value" in t:
                lines.append(f"| `{t['case']}` | {t['label']} | {t['value']:.3f}× | {t['sense']} {t['bound']:.2f}× "
                             f"| {'yes' if t['met'] else '**no**'} |")
            else:
                lines.append(f"| `{t['case']}` | {t['label']} | — | {t['sense']} {t['bound']:.2f}× | n/a "
                             f"({t['note']}) |")
        lines.append("")
    lines += [
        f"Setting: model `{meta['model']}`, {'bf16 autocast' if meta['bf16'] else 'fp32'}, AdamW (lr "
        f"{meta['lr']:g}), flat clipping C={meta['clip_norm']:g}, σ={meta['sigma']:g} (recipe: its own plan), the "
        "loss of every method = the mean over the batch of each example's mean token loss. Noise: privtune's "
        "default, keyed by a secret 128-bit key (`randomness_key=secret_seed()`, `secure_rng=False`); Opacus's "
        "default generator. Every configuration runs in its own worker process; the steps are the real ones "
        "(`DPStep.run` / `PlainStep.run` / the recipe's), nothing copied or patched.",
        "",
        f"Step time: median of the timed steps ({per_case_steps})"
        f" after {meta['warmup']} warm-up step(s), unprofiled (`perf_counter`"
        + (", CUDA synchronised" if m["device"].startswith("cuda") else "")
        + "). Time per token = total time of the timed steps / their tokens (ratios use it). CPU time: process CPU "
        "seconds per step (all threads). Peak memory: above the level once model, optimizer and DP wrapper are "
        "built, over the warm-up and timed steps (so it includes the AdamW state allocated in the first step); "
        + ("`max_memory_allocated`." if m["device"].startswith("cuda") else
           "resident set size sampled every 5 ms."),
        "",
        "Phases: one more step after the timed ones, under `torch.profiler` (CPU"
        + (" + CUDA" if m["device"].startswith("cuda") else "")
        + " activities), reading the `record_function` labels of the real code (`dp.forward`, `dp.backward` ⊃ "
        "`dp.autograd` + `dp.clip` ⊃ `dp.clip.norms` + `dp.clip.sum`, `dp.noise`, `dp.set_grads`; `full.forward`, "
        "`full.backward`) and the benchmark's own (`optimizer` around `optimizer.step()` + `zero_grad`; "
        "`opacus.forward` / `opacus.backward` / `opacus.step` around its calls into Opacus, where `opacus.step` = "
        "`DPOptimizer.step()`: clip and accumulate, noise, scale, AdamW). Each label's CPU total "
        "(`cpu_time_total`, summed over the step's micro-batches) as a share of the profiled step's wall time; "
        "the seconds shown are that share × the median *unprofiled* step time. ↳ columns are parts of the column "
        "before (labels nest); *other* = the step outside the top-level labels (the recipe's batch sampling and "
        "collation, the loss bookkeeping). *profiled step* shows the profiler's own overhead."
        + (" On CUDA these are host-side ranges (see the notes below)." if m["device"].startswith("cuda") else ""),
    ]
    for name in CASES:
        case = raw["cases"].get(name)
        if case is None:
            continue
        lines += ["", f"### `{name}`: {_case_title(name, case)}", ""]
        lines += _case_notes(name, case)
        lines += [""] + _results_table(case)
        ratios = case_ratios(case)
        if ratios:
            lines += ["", "Ratios (group: where the two numbers come from):", ""] + _ratio_table(ratios)
        best = opacus_faster(case)
        if best is not None:
            lines += ["", f"Opacus's faster mode here: `{best['mode']}` ({_ms(best['opacus_tpt'])} ms/token), against "
                      f"privtune `{best['counterpart']}` on the same model ({_ms(best['privtune_tpt'])} ms/token): "
                      f"Opacus / privtune time per token = **{best['speedup']:.2f}×** (above 1: privtune is faster)."]
        phases = _phase_table(case)
        if phases:
            lines += ["", "Phases (profiled step; s (share of the step)):", ""] + phases
    errors = [(c, n, r) for c, case in raw["cases"].items() for g in case["groups"]
              for n, r in g["results"].items() if not _ok(r)]
    if errors:
        lines += ["", "Failures (exact errors):", ""]
        seen = set()
        for c, n, r in errors:
            if (c, n) not in seen:
                seen.add((c, n))
                lines.append(f"- `{c}` / `{n}`: `{r.get('error', '?')}`")
    if notes.strip():
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str, *, measured: str | None = None) -> None:
    """Replace this benchmark's section of ``path`` (between its markers), keeping every other section."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_privtune_bench_results",
                                                  Path(__file__).resolve().parents[1] / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.replace_section(path, SECTION_KEY, SECTION_NAME, body, measured=measured)


def check_format(raw: dict) -> None:
    if raw.get("format") != FORMAT:
        raise SystemExit("this JSON was written by an older dp_overhead.py (one case, monkeypatched phases); "
                         "run the benchmark again to get one --render can read")


# ----------------------------------------------------------------------------------------------------------------
# Rich tables (stdout)


def print_tables(raw: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    for name in CASES:
        case = raw["cases"].get(name)
        if case is None:
            continue
        t = Table(title=f"{name}: {_case_title(name, case)}")
        for col in ("group", "configuration", "params", "step s", "tok/step", "ms/token", "tok/s", "cpu s",
                    "peak MiB", "load", "status"):
            t.add_column(col, justify="left" if col in ("configuration", "status", "load") else "right")
        for i, g in enumerate(case["groups"], 1):
            load = f"{g['load_start']:.1f}→{g['load_end']:.1f}"
            for cname, r in g["results"].items():
                if _ok(r):
                    t.add_row(str(i), cname, f"{r['trainable_params'] / 1e6:.2f}M", _s(r["step_s"]),
                              _tokens(r["tokens_per_step"]), _ms(r["time_per_token_s"]),
                              _f(r["tokens_per_s"], "{:.0f}"), _s(r["cpu_s"]),
                              _mb(r["peak_mem_bytes"]), load, "ok")
                else:
                    t.add_row(str(i), cname, "", "", "", "", "", "", "", load,
                              f"failed: {r.get('error', '?')[:90]}")
        console.print(t)
        pt = Table(title=f"{name}: phases (s, share of the profiled step)")
        heads = [h for h, _ in PHASE_COLUMNS] + ["other"]
        pt.add_column("configuration")
        for h in heads:
            pt.add_column(h, justify="right")
        seen = set()
        for g in case["groups"]:
            for cname, r in g["results"].items():
                split = phase_split(r) if _ok(r) and cname not in seen else None
                if split is None:
                    continue
                seen.add(cname)
                pt.add_row(cname, *("" if split.get(h) is None else f"{_s(split[h][0])} ({split[h][1]:.0%})"
                                    for h in heads))
        console.print(pt)
    head = headline(raw)
    if head:
        console.print(head.replace("**", ""))
    tt = Table(title="targets")
    for col in ("case", "measured", "value", "target", "met?"):
        tt.add_column(col)
    for row in targets(raw):
        if "value" in row:
            tt.add_row(row["case"], row["label"].replace("`", ""), f"{row['value']:.3f}x",
                       f"{row['sense']} {row['bound']:.2f}x", "yes" if row["met"] else "NO")
        else:
            tt.add_row(row["case"], row["label"].replace("`", ""), "—", f"{row['sense']} {row['bound']:.2f}x",
                       f"n/a ({row['note']})")
    console.print(tt)
