"""The summary printed at the end of ``privtune run``: the 2×2 grid, the readings, where the artifacts are."""

from __future__ import annotations

from rich.console import Console

from privtune.eval.grid import render_grid
from privtune.launch.config import RunConfig


def print_run_summary(cfg: RunConfig, metrics: dict) -> None:
    console = Console(highlight=False)
    console.print()
    ex = metrics["examples"]
    title = f"{cfg.model.name} (base) on {cfg.data.source}: per-token NLL (greedy hit rate), {ex['train']} train / {ex['test']} test examples"
    console.print(render_grid(title, metrics["base"]["grid"]))
    r = metrics["base"]["readings"]
    console.print(
        f"privacy: train-sensitive NLL {r['privacy_train_sensitive_nll']:.3f}, "
        f"test−train sensitive gap {r['privacy_train_test_gap']:+.3f}    "
        f"utility: test non-sensitive NLL {r['utility_test_nonsensitive_nll']:.3f} "
        f"(ppl {r['utility_test_nonsensitive_ppl']:.1f})"
    )
    console.print(f"run dir: {cfg.run_dir}   ({metrics['wall_seconds']:.0f} s)   metrics: {cfg.run_dir / 'eval' / 'metrics.json'}")
