"""Sweeps: one YAML = a run config plus a ``grid``; every combination is one run.

    privtune sweep configs/paper_a/cpu.yaml

``grid`` maps dotted keys to lists (their product), and may hold ``variants``: a list of named override sets
crossed with that product, for settings that only make sense together::

    grid:
      data.source: [customersim, synbio]
      variants:
        - {name: lora-r4, train.method: lora, train.lora.r: 4}
        - {name: dp, train.method: dp}

Owns: expanding the grid into validated run configs (named ``<name>-<value>-...``), running them in sequence
(finished runs are skipped by the stage runner), and the comparison table printed at the end.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from privtune.errors import UserError
from privtune.launch.config import RunConfig, apply_overrides, config_from_dict, load_config


def _slug(value) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def has_grid(path: str | Path) -> bool:
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config reports the problem
    return isinstance(tree, dict) and "grid" in tree


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[str, list[RunConfig]]:
    """(sweep name, one RunConfig per grid combination). A file without ``grid`` is a sweep of one run."""
    path = Path(path)
    if not has_grid(path):
        return (cfg := load_config(path, overrides)).name, [cfg]
    tree = yaml.safe_load(path.read_text())
    grid_overrides = [o for o in overrides or [] if o.split("=", 1)[0].split(".")[0] == "grid"]
    overrides = [o for o in overrides or [] if o not in grid_overrides]
    tree = apply_overrides(tree, grid_overrides)  # e.g. grid=null: run the base config alone
    grid = dict(tree.pop("grid") or {})
    variants = grid.pop("variants", None) or [{}]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{path}: grid must map dotted keys to non-empty lists", "e.g. grid: {train.method: [full, lora]}")
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise UserError(f"{path}: grid.variants must be a list of mappings", "e.g. - {name: dp, train.method: dp}")
    tree = apply_overrides(tree, overrides)
    base = config_from_dict(tree, origin=str(path))
    runs = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        for variant in variants:
            variant = dict(variant)
            label = variant.pop("name", None)
            combo = {**dict(zip(keys, values, strict=True)), **variant}
            run_tree = apply_overrides(base.model_dump(mode="json"),
                                       [f"{k}={yaml.safe_dump(v).strip()}" for k, v in combo.items()])
            parts = [_slug(v) for v in values] + ([label] if label else [_slug(v) for v in variant.values()])
            run_tree["name"] = "-".join([base.name, *parts]) if parts else base.name
            runs.append(config_from_dict(run_tree, origin=f"{path} (grid {combo})"))
    names = [cfg.name for cfg in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: two grid combinations get the same run name", "give each variant a distinct name")
    return base.name, runs


def comparison_rows(results: list[tuple[RunConfig, dict]]) -> list[dict]:
    """One row per run, the same rows ``privtune report`` tabulates."""
    from privtune.eval.report import row_of

    return [row_of({"dir": cfg.run_dir, "config": cfg.model_dump(mode="json"), "metrics": metrics})
            for cfg, metrics in results]


def base_grids(results: list[tuple[RunConfig, dict]]) -> dict[tuple[str, str], dict]:
    """The base model's 2×2 grid per (model, dataset) of a sweep: the no-fine-tuning reference of each group."""
    grids: dict[tuple[str, str], dict] = {}
    for cfg, metrics in results:
        if metrics.get("base"):
            grids.setdefault((cfg.model.name, str(cfg.data.source)), metrics["base"]["grid"])
    return grids


def render_comparison(title: str, rows: list[dict], base: dict[tuple[str, str], dict]):
    """Rows grouped by (model, dataset), each group led by its base model; the group is named when there are several.

    Order and ε notation are the report's (``privtune.eval.report``): groups by dataset, then model; in a group
    full, lora, dp, dp-lora, then LoRA rank, then ε descending; ε "∞" = no formal guarantee, "0" = the base model.
    """
    from rich.table import Table

    from privtune.eval.report import EPSILON_NOTE, epsilon_cell, sort_key

    def f(x, fmt="{:.3f}"):
        return "—" if x is None else fmt.format(x)

    groups: dict[tuple[str, str], list[dict]] = {}
    for row in sorted(rows, key=sort_key):
        groups.setdefault((row["model"], row["dataset"]), []).append(row)
    groups = dict(sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])))
    named = len(groups) > 1
    table = Table(title=title, caption=EPSILON_NOTE)
    for col, justify in [*([("model / data", "left")] if named else []), ("method", "left"), ("train sens", "right"),
                         ("train non-s", "right"), ("test sens", "right"), ("test non-s", "right"),
                         ("memorized (base−train sens)", "right"), ("ε", "right"), ("train s", "right"),
                         ("tok/s", "right"), ("peak MB", "right"), ("trainable", "right")]:
        table.add_column(col, justify=justify)
    for key, members in groups.items():
        lead = [f"{key[0]} / {key[1]}"] if named else []
        if key in base:
            table.add_row(*lead, "base model", *(f(base[key][c]["nll_mean"]) for c in
                          ("train_sensitive", "train_nonsensitive", "test_sensitive", "test_nonsensitive")),
                          "0.000", "0", "—", "—", "—", "—")
            lead = [""] if named else []
        for row in members:
            label = row["method"] + (f" r={row['lora_r']}" if row["lora_r"] else "")
            table.add_row(*lead, label, f(row["train_sensitive_nll"]), f(row["train_nonsensitive_nll"]),
                          f(row["test_sensitive_nll"]), f(row["test_nonsensitive_nll"]),
                          f(row["memorized"], "{:+.3f}"),
                          epsilon_cell(row),
                          f(row["train_seconds"], "{:.0f}"), f(row["tokens_per_second"], "{:.0f}"),
                          f(row["peak_memory_mb"], "{:,}"), f(row["trainable_parameters"], "{:,}"))
            lead = [""] if named else []
        if named:
            table.add_section()
    return table
