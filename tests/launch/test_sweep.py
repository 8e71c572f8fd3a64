"""Sweeps: the Paper A CPU grid expands to the runs the report expects; the comparison names each dataset's group."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from privtune.launch.sweep import load_sweep, render_comparison

REPO = Path(__file__).resolve().parents[2]


def test_paper_a_cpu_grid_is_datasets_times_variants_with_their_settings():
    name, runs = load_sweep(REPO / "configs" / "paper_a" / "cpu.yaml")
    assert name == "paper-a-cpu" and len(runs) == 10
    by_name = {cfg.name: cfg for cfg in runs}
    r4, dp = by_name["paper-a-cpu-synbio-lora-r4"], by_name["paper-a-cpu-customersim-dp"]
    assert (r4.data.source, r4.train.method, r4.train.lora.r, r4.train.lora.alpha) == ("synbio", "lora", 4, 8)
    assert (dp.data.source, dp.train.method, dp.privacy.target_epsilon) == ("customersim", "dp", 8.0)


def _row(dataset, method, memorized, lora_r=None):
    return {"model": "m", "dataset": dataset, "method": method, "lora_r": lora_r, "train_sensitive_nll": 1.0,
            "train_nonsensitive_nll": 1.0, "test_sensitive_nll": 1.0, "test_nonsensitive_nll": 1.0,
            "memorized": memorized, "epsilon": None, "train_seconds": 1.0, "tokens_per_second": 1.0,
            "peak_memory_mb": 1, "trainable_parameters": 1}


def _text(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_comparison_leads_each_dataset_with_its_own_base_model():
    grid = {c: {"nll_mean": v} for c, v in
            [("train_sensitive", 3.5), ("train_nonsensitive", 3.0), ("test_sensitive", 3.4), ("test_nonsensitive", 3.2)]}
    other = {c: {"nll_mean": v["nll_mean"] + 2.0} for c, v in grid.items()}
    rows = [_row("customersim", "full", 1.25), _row("synbio", "lora", 0.75, lora_r=4)]
    lines = _text(render_comparison("t", rows, {("m", "customersim"): grid, ("m", "synbio"): other})).splitlines()
    base_lines = [line for line in lines if "base model" in line]
    assert len(base_lines) == 2 and "3.500" in base_lines[0] and "5.500" in base_lines[1]
    assert any("m / customersim" in line for line in lines) and any("m / synbio" in line for line in lines)
    single = _text(render_comparison("t", rows[:1], {("m", "customersim"): grid}))
    assert "model / data" not in single and single.count("base model") == 1
