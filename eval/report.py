"""Reports: join finished runs into one markdown table and a few plots.

    privtune report runs/paper-a-cpu-* --out docs/results/paper_a_cpu

Owns: reading each run's ``config.resolved.yaml`` and ``eval/metrics.json``, the comparison rows, ``report.md``
and the PNG plots — privacy vs utility with training cost as marker size (one panel per dataset), ROC curves of
the membership-inference attacks, and canary exposure per run.

Sensitive: nothing new; reports hold aggregates only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from privtune.launch.errors import UserError

METHOD_COLORS = {"none": "#777777", "full": "#d62728", "lora": "#1f77b4", "dp": "#2ca02c", "dp-lora": "#9467bd"}


def load_run(run_dir: Path) -> dict:
    metrics_path = run_dir / "eval" / "metrics.json"
    if not metrics_path.exists():
        raise UserError(f"{run_dir} has no eval/metrics.json", "run `privtune run` (or `privtune eval`) on it first")
    cfg = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    return {"dir": run_dir, "config": cfg, "metrics": json.loads(metrics_path.read_text())}


def row_of(run: dict) -> dict:
    cfg, m = run["config"], run["metrics"]
    model = m.get("trained") or m["base"]
    grid, r = model["grid"], model["readings"]
    guarantee, cost = m.get("guarantee") or {}, m.get("cost") or {}
    label = "trained" if "trained" in m else "base"
    mia = (m.get("mia") or {}).get(label, {})
    exposure = (m.get("exposure") or {}).get(label, [])
    extraction = ((m.get("extraction") or {}).get(label) or {}).get("summary", {})
    return {
        "run": run["dir"].name,
        "model": cfg["model"]["name"],
        "dataset": cfg["data"]["source"],
        "method": cfg["train"]["method"],
        "lora_r": cfg["train"]["lora"]["r"] if "lora" in cfg["train"]["method"] else None,
        "train_sensitive_nll": grid["train_sensitive"]["nll_mean"],
        "train_nonsensitive_nll": grid["train_nonsensitive"]["nll_mean"],
        "test_sensitive_nll": grid["test_sensitive"]["nll_mean"],
        "test_nonsensitive_nll": grid["test_nonsensitive"]["nll_mean"],
        "memorized": r.get("privacy_gain_over_base"),
        "train_test_gap": r["privacy_train_test_gap"],
        "test_ppl": r["utility_test_nonsensitive_ppl"],
        "mia_auc_sensitive": ((mia.get("sensitive") or {}).get("loss") or {}).get("auc"),
        "mia_auc_example": ((mia.get("example") or {}).get("loss") or {}).get("auc"),
        "exposure": max((e["exposure"] for e in exposure), default=None),
        "extraction_exact": extraction.get("exact"),
        "epsilon": guarantee.get("epsilon"),
        "delta": guarantee.get("delta"),
        "train_seconds": cost.get("wall_seconds"),
        "tokens_per_second": cost.get("tokens_per_second"),
        "peak_memory_mb": round(cost["peak_memory_bytes"] / 2**20) if cost.get("peak_memory_bytes") else None,
        "trainable_parameters": cost.get("trainable_parameters"),
    }


COLUMNS = [
    ("dataset", "dataset", "{}"), ("method", "method", "{}"), ("lora_r", "r", "{}"),
    ("train_sensitive_nll", "train sens NLL", "{:.3f}"), ("memorized", "memorized ↓", "{:+.3f}"),
    ("train_test_gap", "test−train sens", "{:+.3f}"), ("test_nonsensitive_nll", "test non-sens NLL", "{:.3f}"),
    ("mia_auc_sensitive", "MIA AUC (sens)", "{:.3f}"), ("exposure", "exposure", "{:.1f}"),
    ("extraction_exact", "extracted", "{:.1%}"),
    ("epsilon", "ε", "{:.2f}"), ("train_seconds", "train s", "{:.0f}"), ("peak_memory_mb", "peak MB", "{:,}"),
    ("trainable_parameters", "trainable", "{:,}"),
]


def _cell(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row[key], fmt) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def plot_privacy_utility(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.5), squeeze=False)
    slowest = max((r["train_seconds"] or 0) for r in rows) or 1.0
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in (r for r in rows if r["dataset"] == dataset and r["memorized"] is not None):
            size = 60 + 600 * (r["train_seconds"] or 0) / slowest
            label = r["method"] + (f" r={r['lora_r']}" if r["lora_r"] else "")
            ax.scatter(r["test_nonsensitive_nll"], r["memorized"], s=size, alpha=0.75,
                       color=METHOD_COLORS.get(r["method"], "black"), edgecolor="black", linewidth=0.5)
            ax.annotate(label, (r["test_nonsensitive_nll"], r["memorized"]), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(dataset)
        ax.set_xlabel("utility: test non-sensitive NLL (lower is better)")
        ax.set_ylabel("memorized: base − fine-tuned train-sensitive NLL")
    fig.suptitle("Privacy vs utility (marker area ∝ training time)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc(runs: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for run in runs:
        mia = (run["metrics"].get("mia") or {}).get("trained") or {}
        curve, metrics = (mia.get("roc") or {}).get("sensitive/loss"), (mia.get("sensitive") or {}).get("loss")
        if curve and metrics:
            curves.append((run["dir"].name, curve, metrics["auc"]))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, c, auc in curves:
        ax.plot(np.maximum(c["fpr"], 1e-3), np.maximum(c["tpr"], 1e-3), label=f"{name} (AUC {auc:.2f})",
                linewidth=1.2)
    ax.plot([1e-4, 1], [1e-4, 1], color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Loss attack on sensitive tokens")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_exposure(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["exposure"] is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["exposure"] for r in rows],
           color=[METHOD_COLORS.get(r["method"], "black") for r in rows])
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("canary exposure (bits)")
    ax.set_title("Canary exposure per run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(run_dirs: list[Path], out: Path, *, command: str) -> dict:
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise UserError("privtune report needs at least one run dir", "pass run directories, e.g. runs/quickstart-*")
    rows = [row_of(run) for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    plot_privacy_utility(rows, out / "privacy_utility.png")
    plots = ["privacy_utility.png"]
    if plot_roc(runs, out / "roc.png"):
        plots.append("roc.png")
    if plot_exposure(rows, out / "exposure.png"):
        plots.append("exposure.png")
    lines = [
        "# privtune report", "",
        f"Made with `{command}`.", "",
        "Per-token NLL of the fine-tuned model on sensitive (s) and non-sensitive tokens of train and test data. "
        "*memorized* = base-model train-sensitive NLL minus fine-tuned (higher = more memorized); "
        "*test−train sens* = what was learned about the training people beyond the format.", "",
        markdown_table(rows), "",
        *[f"![{p}]({p})" for p in plots], "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "rows.json").write_text(json.dumps(rows, indent=2, sort_keys=True, default=str) + "\n")
    return {"out": str(out), "rows": rows, "plots": plots}
