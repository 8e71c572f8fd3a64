"""The report's plots: privacy vs utility, ROC small multiples, canary exposure, training curves.

Owns: drawing, from the rows and runs that ``eval.report`` assembled — privacy vs utility with training time as
marker area (one panel per dataset, the base model as a black star, ε on DP points, labels placed so they do not
overlap), the sensitive-token loss attack's ROC (one panel per run, bootstrap intervals at the stored FPRs, the
base model in grey), canary exposure per run against its maximum and the base model's, and the training curves
(loss, ε spent, clipped fraction: non-private diagnostics, as the plot says).

Sensitive: nothing new; aggregates only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from privtune.eval.report import (
    DPI,
    METHOD_COLORS,
    group_key,
    method_label,
    method_rank,
    read_train_log,
    row_of,
    sort_key,
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_names(names: list[str]) -> tuple[list[str], str]:
    """Names without the prefix they all share (cut at a '-' or '_'), and that prefix."""
    if len(names) < 2:
        return list(names), ""
    common = names[0]
    for name in names[1:]:
        while not name.startswith(common):
            common = common[:-1]
    cut = max(common.rfind("-"), common.rfind("_")) + 1
    prefix = common[:cut]
    if not prefix or any(len(n) <= len(prefix) for n in names):
        return list(names), ""
    return [n[len(prefix):] for n in names], prefix


def _overlap(a: tuple, b: tuple) -> float:
    """Overlap area of two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], radii_pt: list[float], *,
                 fontsize: float = 8.0) -> list:
    """Label each point so that no label overlaps another label, a point's marker or the axes' edge, when possible.

    Deterministic greedy placement in display space: for each label in turn, candidate boxes on rings of growing
    distance around its point (16 directions, upper right first) are scored by overlap with the labels placed so
    far, with every marker and with the outside of the axes, plus their distance; the cheapest wins. A label that
    had to move away from its point gets a thin leader line. Call it after the axes' limits and the figure's layout
    are final (tight_layout), since it works in pixels.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    centers = ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2))
    radii = [r * px_per_pt for r in radii_pt]
    frame = ax.get_window_extent(renderer)
    pad = 2.0 * px_per_pt
    markers = [(cx - r, cy - r, cx + r, cy + r) for (cx, cy), r in zip(centers, radii, strict=True)]
    placed: list[tuple] = []
    artists = []
    angles = [math.radians(a) for a in (45, 0, 90, 315, 135, 270, 180, 225, 22.5, 67.5, 337.5, 292.5, 112.5,
                                        157.5, 202.5, 247.5)]
    for i, label in enumerate(labels):
        probe = ax.text(0, 0, label, fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width + 2 * pad, ext.height + 2 * pad
        cx, cy = centers[i]
        best = None
        for ring, extra in enumerate((2, 8, 16, 28, 44, 64, 90, 120)):
            d = radii[i] + extra * px_per_pt
            for k, a in enumerate(angles):
                bx = cx + math.cos(a) * (d + w / 2)
                by = cy + math.sin(a) * (d + h / 2)
                box = (bx - w / 2, by - h / 2, bx + w / 2, by + h / 2)
                cost = 10.0 * sum(_overlap(box, p) for p in placed)
                cost += 10.0 * sum(_overlap(box, m) for m in markers)
                inside = _overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
                cost += 30.0 * (w * h - inside)
                cost += extra * px_per_pt + 0.5 * k
                if best is None or cost < best[0]:
                    best = (cost, box, ring)
        _, box, ring = best
        placed.append(box)
        tx, ty = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        offset = ((tx - cx) / px_per_pt, (ty - cy) / px_per_pt)
        arrow = None
        if ring >= 1:  # moved away from its point: say which point it names
            arrow = dict(arrowstyle="-", color="0.45", linewidth=0.6, shrinkA=0, shrinkB=radii_pt[i])
        artists.append(ax.annotate(label, points[i], xytext=offset, textcoords="offset points", ha="center",
                                   va="center", fontsize=fontsize, arrowprops=arrow, zorder=6))
    return artists


def _padded(lo: float, hi: float, frac: float, min_span: float) -> tuple[float, float]:
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    return mid - span / 2 - frac * span, mid + span / 2 + frac * span


def _nice(value: float) -> float:
    if value <= 0:
        return value
    p = 10 ** math.floor(math.log10(value))
    return round(value / p, 1) * p if value / p < 2 else round(value / p) * p


def plot_privacy_utility(rows: list[dict], path: Path) -> None:
    """One panel per dataset: x = test non-sensitive NLL, y = memorized; colour = method, area = training time."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    datasets = sorted({r["dataset"] for r in rows})
    multi_model = len({r["model"] for r in rows}) > 1
    ncols = min(len(datasets), 3)
    nrows = math.ceil(len(datasets) / ncols)
    legend_in = 2.3
    width = 5.0 * ncols + legend_in
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 4.4 * nrows + 0.5), squeeze=False, dpi=DPI)
    times = [r["train_seconds"] for r in rows if r.get("train_seconds") and r["memorized"] is not None
             and r["test_nonsensitive_nll"] is not None]  # of the points drawn
    slowest = max(times, default=0.0) or 1.0

    def area(seconds):
        return 30.0 + 370.0 * (seconds or 0.0) / slowest

    star = 260.0
    methods_seen: list[str] = []
    for ax, dataset in zip(axes.flat, datasets, strict=False):
        points, labels, radii, missing = [], [], [], []
        for r in rows:
            if r["dataset"] != dataset or r["test_nonsensitive_nll"] is None:
                continue
            x = r["test_nonsensitive_nll"]
            if r["method"] in ("base", "none"):
                ax.scatter(x, 0.0, marker="*", s=star, color="black", edgecolor="white", linewidth=0.6, zorder=3)
                points.append((x, 0.0))
                labels.append("base" + (f" {r['model']}" if multi_model else ""))
                radii.append(math.sqrt(star) / 2)
                continue
            if r["memorized"] is None:
                missing.append(r.get("run") or r["method"])
                continue
            s = area(r.get("train_seconds"))
            ax.scatter(x, r["memorized"], s=s, alpha=0.8, color=METHOD_COLORS.get(r["method"], "black"),
                       edgecolor="black", linewidth=0.5, zorder=4)
            if r["method"] not in methods_seen:
                methods_seen.append(r["method"])
            points.append((x, r["memorized"]))
            labels.append((f"{r['model']}: " if multi_model else "") + method_label(r))
            radii.append(math.sqrt(s) / 2)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":", zorder=1)
        if missing:
            ax.text(0.01, 0.01, "not drawn (no sensitive training tokens scored): " + ", ".join(missing),
                    transform=ax.transAxes, fontsize=7, color="0.35", ha="left", va="bottom", wrap=True)
        if points:
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.set_xlim(*_padded(min(xs), max(xs), 0.18, 0.4))
            ax.set_ylim(*_padded(min(min(ys), 0.0), max(max(ys), 0.0), 0.18, 0.2))
        ax._privtune_labels = (points, labels, radii)  # placed once the layout is final
        ax.set_title(dataset, fontsize=10)
        ax.set_xlabel("utility: test non-sensitive NLL (lower is better)", fontsize=9)
        ax.set_ylabel("memorized (nats): base − fine-tuned\ntrain-sensitive NLL (lower is better)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, linewidth=0.3, alpha=0.5)
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)

    handles = [Line2D([], [], linestyle="", marker="*", markersize=13, color="black", label="base model (not fine-tuned)")]
    handles += [Line2D([], [], linestyle="", marker="o", markersize=8, color=METHOD_COLORS.get(m, "black"),
                       markeredgecolor="black", markeredgewidth=0.5, label=m)
                for m in sorted(methods_seen, key=method_rank)]
    if times:
        sizes = sorted({_nice(t) for t in np.linspace(min(times), max(times), 3)})
        handles.append(Line2D([], [], linestyle="", label=" "))
        handles += [Line2D([], [], linestyle="", marker="o", markersize=math.sqrt(area(t)), color="0.75",
                           markeredgecolor="black", markeredgewidth=0.5, label=f"{t:g} s training")
                    for t in sizes]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0 - legend_in / width, 0.5), fontsize=8,
               title="colour = method\narea = training time", title_fontsize=8, frameon=False, labelspacing=1.1)
    fig.suptitle("Privacy vs utility — best is lower left; DP points labelled with their ε", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1.0 - legend_in / width, 1))
    for ax in axes.flat:
        if getattr(ax, "_privtune_labels", None) and ax._privtune_labels[0]:
            place_labels(ax, *ax._privtune_labels)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _fpr_points(metrics: dict) -> list[tuple[float, float, list | None]]:
    """(fpr, tpr, [lo, hi] or None) of every ``tpr@<f>`` reading in a roc_metrics dict."""
    out = []
    for key, value in metrics.items():
        if key.startswith("tpr@") and not key.endswith("_ci") and value is not None:
            out.append((float(key[4:]), float(value), metrics.get(f"{key}_ci")))
    return sorted(out)


def _roc_of(run: dict, label: str) -> tuple[dict, dict] | None:
    mia = (run["metrics"].get("mia") or {}).get(label) or {}
    curve, metrics = (mia.get("roc") or {}).get("sensitive/loss"), (mia.get("sensitive") or {}).get("loss")
    return (curve, metrics) if curve and metrics else None


def plot_roc(runs: list[dict], path: Path) -> bool:
    """Small multiples: each run's sensitive-token loss attack ROC (log-log), with its base model's in grey."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _pyplot()
    runs = sorted(runs, key=lambda run: sort_key(row_of(run)))
    panels = [(run, roc, _roc_of(run, "base")) for run in runs if (roc := _roc_of(run, "trained"))]
    if not panels:
        return False
    names, prefix = short_names([run["dir"].name for run, _, _ in panels])
    fprs = [f for _, (_, m), _ in panels for f, _, _ in _fpr_points(m)]
    resolutions = [m.get("fpr_resolution") or 1.0 / max(m.get("nonmembers") or 1, 1) for _, (_, m), _ in panels]
    floor = min([*fprs, *resolutions, 0.01]) / 2
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols + 0.3, 2.7 * nrows + 1.1), squeeze=False,
                             sharex=True, sharey=True, dpi=DPI)
    for ax, (run, (curve, m), base), name in zip(axes.flat, panels, names, strict=False):
        method = run["config"]["train"]["method"]
        color = METHOD_COLORS.get(method, "C0")
        resolution = m.get("fpr_resolution") or 1.0 / max(m.get("nonmembers") or 1, 1)
        ax.axvspan(floor, resolution, color="0.92", zorder=0, linewidth=0)
        ax.plot([floor, 1], [floor, 1], color="0.5", linestyle=":", linewidth=0.8)
        if base is not None:
            ax.plot(np.maximum(base[0]["fpr"], floor), np.maximum(base[0]["tpr"], floor), color="0.6",
                    linewidth=1.0, drawstyle="default")
        ax.plot(np.maximum(curve["fpr"], floor), np.maximum(curve["tpr"], floor), color=color, linewidth=1.4)
        for f, tpr, ci in _fpr_points(m):
            lo, hi = (ci if ci else (tpr, tpr))
            y = max(tpr, floor)
            ax.errorbar([f], [y], yerr=[[y - max(lo, floor)], [max(hi, floor) - y]], fmt="o", markersize=3.5,
                        color=color, ecolor="black", elinewidth=0.9, capsize=2.5, zorder=5)
        text = f"AUC {m['auc']:.2f}"
        if m.get("auc_ci"):
            text += f" [{m['auc_ci'][0]:.2f}, {m['auc_ci'][1]:.2f}]"
        if base is not None:
            text += f"\nbase {base[1]['auc']:.2f}"
        ax.text(0.97, 0.04, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7.5,
                bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="0.8", linewidth=0.5))
        ax.set_title(name, fontsize=8.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(floor, 1.05)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for col in range(ncols):  # the lowest panel of each column carries the x axis
        rest = len(panels) % ncols
        ax = axes[-2, col] if rest and col >= rest else axes[-1, col]
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate", fontsize=8)
    ci = panels[0][1][1].get("ci") or 0.95
    handles = [Line2D([], [], color="black", linewidth=1.4, label="fine-tuned model (colour = method)"),
               Line2D([], [], color="0.6", linewidth=1.0, label="its base model"),
               Line2D([], [], color="0.5", linestyle=":", linewidth=0.8, label="chance"),
               Line2D([], [], color="black", marker="o", markersize=3.5, linestyle="",
                      label=f"TPR at FPR {', '.join(f'{f:g}' for f in sorted(set(fprs)))}, {ci:.0%} bootstrap CI"),
               Patch(color="0.92", label="below the FPR resolution (1 / non-members): reads FPR 0")]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0 - 0.45 / fig.get_figheight()),
               ncol=3 if ncols >= 3 else 1, fontsize=7.5, frameon=False)
    title = "Loss attack on sensitive tokens: ROC per run" + (f" (runs {prefix}*)" if prefix else "")
    fig.suptitle(title, fontsize=10)
    legend_rows = 2 if ncols >= 3 else 5
    fig.tight_layout(rect=(0, 0, 1, 1.0 - (0.45 + 0.17 * legend_rows) / fig.get_figheight()))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_exposure(rows: list[dict], path: Path) -> bool:
    """Bars per run (grouped by model and dataset), with each group's maximum and base-model exposure as lines."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _pyplot()
    runs = [r for r in rows if r.get("exposure") is not None and r["method"] != "base"]
    if not runs:
        return False
    bases = {group_key(r): r for r in rows if r["method"] == "base" and r.get("exposure") is not None}
    groups: list[tuple[str, str]] = []
    for r in runs:
        if group_key(r) not in groups:
            groups.append(group_key(r))
    names, prefix = short_names([r["run"] for r in runs])
    x, xs, spans = 0.0, [], {}
    for key in groups:
        start = x
        for r in runs:
            if group_key(r) == key:
                xs.append(x)
                x += 1.0
        spans[key] = (start - 0.45, x - 0.55)
        x += 0.8  # gap between groups
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(runs) + 1.6 * len(groups) + 2.5), 4.6), dpi=DPI)
    ax.bar(xs, [r["exposure"] for r in runs], width=0.8,
           color=[METHOD_COLORS.get(r["method"], "black") for r in runs], edgecolor="black", linewidth=0.4)
    limits = set()
    top = max(r["exposure"] for r in runs)
    for key in groups:
        lo, hi = spans[key]
        limit = next((r["exposure_limit"] for r in runs if group_key(r) == key and r.get("exposure_limit")), None)
        if limit is not None:
            limits.add(round(limit, 1))
            ax.hlines(limit, lo, hi, colors="black", linestyles="--", linewidth=1.1, zorder=3)
            top = max(top, limit)
        if key in bases:
            ax.hlines(bases[key]["exposure"], lo, hi, colors="0.35", linestyles=":", linewidth=1.6, zorder=3)
        label = key[1] if len({g[0] for g in groups}) == 1 else f"{key[0]} / {key[1]}"
        ax.text((lo + hi) / 2, 1.0, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.12 + 0.1)
    ax.set_xticks(xs, names, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_xlim(-0.8, xs[-1] + 0.8)
    ax.set_ylabel("canary exposure (bits)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="y", linewidth=0.3, alpha=0.5)
    limit_label = ("max possible = log2 |candidates|"
                   + (f" ({next(iter(limits)):.1f} bits)" if len(limits) == 1 else " (per group)"))
    handles = [Line2D([], [], color="black", linestyle="--", linewidth=1.1, label=limit_label)]
    if bases:
        handles.append(Line2D([], [], color="0.35", linestyle=":", linewidth=1.6, label="base model (not fine-tuned)"))
    handles += [Patch(facecolor=METHOD_COLORS.get(m, "black"), edgecolor="black", linewidth=0.4, label=m)
                for m in sorted({r["method"] for r in runs}, key=method_rank)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("Canary exposure per run (largest over the canaries)" + (f" — runs {prefix}*" if prefix else ""),
                 fontsize=10, pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_training_curves(runs: list[dict], path: Path) -> bool:
    """Loss, ε spent and clipped fraction per optimizer step, from each run's ``logs/train.jsonl``."""
    plt = _pyplot()
    runs = sorted(runs, key=lambda run: sort_key(row_of(run)))
    logs = [(run, log) for run in runs if (log := run.get("train_log", None) or read_train_log(run["dir"]))]
    if not logs:
        return False
    names, prefix = short_names([run["dir"].name for run, _ in logs])
    styles: dict[str, tuple] = {}  # colour = method, as in the other plots; line style and marker tell its runs apart
    for run, _ in logs:
        method = run["config"]["train"]["method"]
        j = sum(1 for st in styles.values() if st[3] == method)
        styles[run["dir"].name] = (METHOD_COLORS.get(method, "black"), ("-", "--", ":", "-.")[j % 4],
                                   "osD^v"[(j // 4) % 5], method)

    def series(log, key):
        pts = [(e["step"], e[key]) for e in log if isinstance(e.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [("loss", "training loss (batch mean)")]
    if any(series(log, "epsilon")[0] for _, log in logs):
        panels.append(("epsilon", "ε spent"))
    if any(series(log, "clipped_fraction")[0] for _, log in logs):
        panels.append(("clipped_fraction", "clipped fraction of units"))
    legend_in = 2.6
    width = 4.3 * len(panels) + legend_in
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.9), squeeze=False, dpi=DPI)
    handles = {}
    for ax, (key, ylabel) in zip(axes[0], panels, strict=True):
        for (run, log), name in zip(logs, names, strict=True):
            steps, values = series(log, key)
            if not steps:
                continue
            color, linestyle, marker, _ = styles[run["dir"].name]
            (line,) = ax.plot(steps, values, color=color, linestyle=linestyle, linewidth=1.3,
                              marker=marker if len(steps) <= 30 else None, markersize=3, label=name)
            handles.setdefault(name, line)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(ylabel + (" (DP runs)" if key != "loss" else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if key == "clipped_fraction":
            ax.set_ylim(-0.03, 1.03)
    fig.legend(handles=list(handles.values()), labels=list(handles), loc="center left", fontsize=8, frameon=False,
               bbox_to_anchor=(1.0 - legend_in / width, 0.5), title=f"run{f' ({prefix}*)' if prefix else ''}",
               title_fontsize=8)
    fig.suptitle("Training curves — non-private diagnostics" + (": " if len(panels) > 1 else "\n")
                 + "statistics of the private training batches, not covered by any run's ε", fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1.0 - legend_in / width, 1))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return True
