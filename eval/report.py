"""Reports: join finished runs into one table (markdown, JSON, CSV) and a few plots.

    privtune report runs/paper-a-cpu-* --out docs/results/paper_a_cpu

Owns: reading each run's ``config.resolved.yaml``, ``eval/metrics.json`` and (when there) ``logs/train.jsonl``;
the comparison rows and their order; ``report.md``, ``rows.json`` and ``rows.csv``. The PNG plots are drawn by
``eval.plots``.

Rows: per (model, dataset) group the base model first (``method: "base"``, from the first run of the group that
scored it; a run with ``train.method: none`` takes its place), then the runs by method (full, lora, dp, dp-lora),
LoRA rank (ascending), ε (descending: ∞ = no formal guarantee first, then the weakest guarantee) and run name.

ε notation: ``epsilon`` is ``null`` in rows.json (empty in rows.csv) and "∞" in tables when a run has no formal
guarantee (a non-DP method or a non-private debug run of a DP method); ``guarantee`` says ``"none"`` or ``"dp"``.
The base model was not trained on the data, so it is (0, 0)-DP with respect to it: ε = 0, ``guarantee: "dp"``.
"—" in a table means a value that was not measured.

Sensitive: nothing new; reports hold aggregates only. The training curves are statistics of the private training
batches (not differentially private); the plot says so.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from privtune.errors import UserError
from privtune.fingerprint import stale_reasons

METHOD_COLORS = {"none": "#777777", "base": "#000000", "full": "#d62728", "lora": "#1f77b4", "dp": "#2ca02c",
                 "dp-lora": "#9467bd"}
METHOD_ORDER = ("none", "base", "full", "lora", "dp", "dp-lora")
DP_METHODS = ("dp", "dp-lora")
TRAIN_LOG = Path("logs") / "train.jsonl"
DPI = 120

EPSILON_NOTE = "ε = ∞: no formal privacy guarantee (non-DP method or non-private debug run)"


# ---------------------------------------------------------------------------------------------------------------
# Reading runs


def load_run(run_dir: Path) -> dict:
    metrics_path = run_dir / "eval" / "metrics.json"
    if not metrics_path.exists():
        raise UserError(f"{run_dir} has no eval/metrics.json", "run `privtune run` (or `privtune eval`) on it first")
    stale = stale_reasons(run_dir, "eval")  # a row must be of the model and data the run dir holds now
    if stale:
        raise UserError(f"{run_dir}: its scores are out of date ({'; '.join(stale)})",
                        f"run `privtune eval {run_dir}` to score it again")
    cfg = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    metrics = json.loads(metrics_path.read_text())
    if cfg["train"]["method"] != "none" and "trained" not in metrics:
        raise UserError(f"{run_dir}: eval/metrics.json has no scores of its trained model",
                        f"run `privtune eval {run_dir}` to score it")
    return {"dir": run_dir, "config": cfg, "metrics": metrics}


def read_train_log(run_dir: Path) -> list[dict]:
    """The per-step records of ``RUN/logs/train.jsonl``, sorted by step ([] when the run has none).

    A torn last line (a run killed mid-write) is dropped; a step logged twice keeps its later record. A broken line
    anywhere else means the file was damaged otherwise and is refused.
    """
    path = Path(run_dir) / TRAIN_LOG
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    by_step: dict[int, dict] = {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line
            raise UserError(f"{path}: line {i + 1} is not JSON", "delete the damaged line or the file") from None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _exposure_fields(entries: list[dict], cfg: dict) -> tuple[float | None, float | None]:
    """(largest exposure over the canaries, the largest possible exposure of that canary = log2 |candidates|)."""
    if not entries:
        return None, None
    top = max(entries, key=lambda e: e["exposure"])
    candidates = top.get("candidates")
    if not candidates:
        digits = top.get("secret_digits") or (((cfg.get("data") or {}).get("canaries")) or {}).get("secret_digits")
        candidates = 10 ** int(digits) if digits else None
    return top["exposure"], (math.log2(candidates) if candidates else None)


def _row(run: dict, label: str) -> dict:
    cfg, m = run["config"], run["metrics"]
    model = m[label]
    grid, r = model["grid"], model["readings"]
    method = cfg["train"]["method"]
    untrained = label == "base" or method == "none"
    guarantee, cost = (m.get("guarantee") or {}), (m.get("cost") or {})
    mia = (m.get("mia") or {}).get(label, {})
    sens_loss = (mia.get("sensitive") or {}).get("loss") or {}
    auc_ci = sens_loss.get("auc_ci") or [None, None]
    exposure, exposure_limit = _exposure_fields((m.get("exposure") or {}).get(label, []), cfg)
    extraction = ((m.get("extraction") or {}).get(label) or {}).get("summary", {})
    if untrained:  # independent of the data: (0, 0)-DP with respect to it
        epsilon, delta, kind = 0.0, 0.0, "dp"
    elif "guarantee" in m:
        epsilon, delta = guarantee.get("epsilon"), guarantee.get("delta")
        kind = "dp" if epsilon is not None else "none"
    else:  # a trained model whose guarantee was not recorded: unknown, not "none"
        epsilon, delta, kind = None, None, None
    trained_cost = not untrained
    return {
        "run": run["dir"].name if label == "trained" or method == "none" else None,
        "base_from": run["dir"].name if label == "base" and method != "none" else None,
        "model": cfg["model"]["name"],
        "dataset": str(cfg["data"]["source"]),
        "method": "base" if label == "base" and method != "none" else method,
        "lora_r": cfg["train"]["lora"]["r"] if "lora" in method and label == "trained" else None,
        "train_sensitive_nll": grid["train_sensitive"]["nll_mean"],
        "train_nonsensitive_nll": grid["train_nonsensitive"]["nll_mean"],
        "test_sensitive_nll": grid["test_sensitive"]["nll_mean"],
        "test_nonsensitive_nll": grid["test_nonsensitive"]["nll_mean"],
        "memorized": ((0.0 if grid["train_sensitive"]["nll_mean"] is not None else None) if untrained
                      else r.get("privacy_gain_over_base")),
        "train_test_gap": r["privacy_train_test_gap"],
        "test_ppl": r["utility_test_nonsensitive_ppl"],
        "mia_auc_sensitive": sens_loss.get("auc"),
        "mia_auc_sensitive_low": auc_ci[0],
        "mia_auc_sensitive_high": auc_ci[1],
        "mia_auc_example": ((mia.get("example") or {}).get("loss") or {}).get("auc"),
        "exposure": exposure,
        "exposure_limit": exposure_limit,
        "extraction_exact": extraction.get("exact"),
        "epsilon": epsilon,
        "delta": delta,
        "guarantee": kind,
        "train_seconds": cost.get("wall_seconds") if trained_cost else None,
        "tokens_per_second": cost.get("tokens_per_second") if trained_cost else None,
        "peak_memory_mb": (round(cost["peak_memory_bytes"] / 2**20)
                           if trained_cost and cost.get("peak_memory_bytes") else None),
        "trainable_parameters": cost.get("trainable_parameters") if trained_cost else None,
    }


def row_of(run: dict) -> dict:
    """The run's row: its trained model (the base model for a ``train.method: none`` run)."""
    return _row(run, "trained" if "trained" in run["metrics"] else "base")


def base_row_of(run: dict) -> dict | None:
    """The base model's row as scored in ``run`` (``None`` when the run did not score it)."""
    return _row(run, "base") if "base" in run["metrics"] else None


# ---------------------------------------------------------------------------------------------------------------
# Order and notation


def method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def group_key(row: dict) -> tuple[str, str]:
    """Groups are (model, dataset); they are listed by dataset, then model."""
    return (row["model"], row["dataset"])


def sort_key(row: dict) -> tuple:
    """Dataset, model, method (none/base, full, lora, dp, dp-lora), LoRA rank, ε descending (∞ first), run."""
    eps = row.get("epsilon")
    if eps is None and row.get("method") not in ("base", "none"):
        eps = math.inf
    return (row["dataset"], row["model"], method_rank(row["method"]), row.get("lora_r") or 0,
            -(eps if eps is not None else 0.0), row.get("run") or "")


def report_rows(runs: list[dict]) -> list[dict]:
    """Every run's row in the stable order, each (model, dataset) group led by one base-model row."""
    rows = sorted((row_of(run) for run in runs), key=sort_key)
    bases: dict[tuple[str, str], dict] = {}
    for run in sorted(runs, key=lambda run: sort_key(row_of(run))):
        base = base_row_of(run)
        if base is not None:
            bases.setdefault(group_key(base), base)
    has_none = {group_key(r) for r in rows if r["method"] == "none"}  # such a run is the group's base row
    out: list[dict] = []
    for key in sorted({group_key(r) for r in rows}, key=lambda k: (k[1], k[0])):
        if key in bases and key not in has_none:
            out.append(bases[key])
        out.extend(r for r in rows if group_key(r) == key)
    return out


def epsilon_cell(row: dict) -> str:
    """The ε of a row as tables show it: "0" (base model), "8.00", "∞" (no formal guarantee), "—" (not recorded)."""
    if row.get("method") in ("base", "none"):
        return "0"
    eps = row.get("epsilon")
    if eps is not None:
        return f"{eps:.2f}"
    if row.get("guarantee", "none") is None:
        return "—"
    return "∞"


def method_label(row: dict, *, epsilon: bool = True) -> str:
    """"lora r=16", "dp-lora r=16 ε=8", "dp ε=∞" (a non-private debug run), "base"."""
    label = row["method"] + (f" r={row['lora_r']}" if row.get("lora_r") else "")
    if epsilon and row["method"] in DP_METHODS:
        eps = row.get("epsilon")
        label += " ε=" + (f"{eps:.3g}" if eps is not None else "∞")
    return label


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _auc_cell(row: dict) -> str:
    auc = row.get("mia_auc_sensitive")
    if auc is None:
        return "—"
    lo, hi = row.get("mia_auc_sensitive_low"), row.get("mia_auc_sensitive_high")
    return f"{auc:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


COLUMNS = [
    ("run", "run", "{}"), ("model", "model", "{}"), ("dataset", "dataset", "{}"), ("method", "method", "{}"),
    ("lora_r", "r", "{}"),
    ("train_sensitive_nll", "train sens NLL", "{:.3f}"), ("memorized", "memorized ↓", "{:+.3f}"),
    ("train_test_gap", "test−train sens", "{:+.3f}"), ("test_nonsensitive_nll", "test non-sens NLL", "{:.3f}"),
    ("mia_auc_sensitive", "MIA AUC sens [95% CI]", _auc_cell), ("exposure", "exposure (bits)", "{:.1f}"),
    ("extraction_exact", "extracted", "{:.1%}"),
    ("epsilon", "ε", epsilon_cell), ("train_seconds", "train s", "{:.0f}"), ("peak_memory_mb", "peak MB", "{:,}"),
    ("trainable_parameters", "trainable", "{:,}"),
]


def _cell(row: dict, key: str, fmt) -> str:
    if callable(fmt):
        return fmt(row)
    if key == "run" and row.get("method") == "base":
        return "base model"
    value = row.get(key)
    return "—" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _fields(rows: list[dict]) -> list[str]:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    return fields


def write_rows_csv(rows: list[dict], path: Path) -> None:
    """The rows as CSV with a header line; ``None`` is an empty cell, floats keep every digit (``repr``)."""
    fields = _fields(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else repr(row[k]) if isinstance(row[k], float) else row[k]
                             for k in fields])


# ---------------------------------------------------------------------------------------------------------------
# The report


def _notes(rows: list[dict]) -> list[str]:
    deltas = sorted({r["delta"] for r in rows if r.get("guarantee") == "dp" and r["method"] not in ("base", "none")
                     and r.get("delta") is not None})
    notes = [
        f"- {EPSILON_NOTE}; ε = 0 for the base model, which was not trained on the data; "
        "— : not measured (or not applicable).",
    ]
    if deltas:
        notes.append(f"- DP rows hold at δ = {', '.join(f'{d:g}' for d in deltas)}.")
    notes.append("- Rows: per (model, dataset) the base model first, then full, LoRA, DP, DP-LoRA; within a method "
                 "by LoRA rank (ascending), then by ε from largest (∞ first: weakest guarantee) to smallest.")
    notes.append("- MIA AUC: loss attack restricted to sensitive tokens, with its bootstrap interval. "
                 "Exposure: the largest over the run's canaries, at most log2 of its number of candidates.")
    return notes


def write_report(run_dirs: list[Path], out: Path, *, command: str) -> dict:
    from privtune.eval.plots import plot_exposure, plot_privacy_utility, plot_roc, plot_training_curves

    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise UserError("privtune report needs at least one run dir", "pass run directories, e.g. runs/quickstart-*")
    for run in runs:
        run["train_log"] = read_train_log(run["dir"])
    rows = report_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    plot_privacy_utility(rows, out / "privacy_utility.png")
    plots = ["privacy_utility.png"]
    if plot_roc(runs, out / "roc.png"):
        plots.append("roc.png")
    if plot_exposure(rows, out / "exposure.png"):
        plots.append("exposure.png")
    if plot_training_curves(runs, out / "training_curves.png"):
        plots.append("training_curves.png")
    lines = [
        "# privtune report", "",
        f"Made with `{command}`.", "",
        "Per-token NLL of each model on sensitive (s) and non-sensitive tokens of train and test data. "
        "*memorized* = base-model train-sensitive NLL minus fine-tuned (higher = more memorized); "
        "*test−train sens* = what was learned about the training people beyond the format.", "",
        markdown_table(rows), "",
        *_notes(rows), "",
        *[f"![{p}]({p})" for p in plots], "",
    ]
    if "training_curves.png" in plots:
        lines += ["The training curves are computed from the private training batches and are not differentially "
                  "private: keep them with the run, not with a released model.", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "rows.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    write_rows_csv(rows, out / "rows.csv")
    return {"out": str(out), "rows": rows, "plots": plots}
