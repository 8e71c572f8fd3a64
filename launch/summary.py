"""The summary printed at the end of ``privtune run``: the 2×2 grid, the readings, where the artifacts are."""

from __future__ import annotations

from rich.console import Console

from privtune.eval.grid import render_grid
from privtune.launch.config import RunConfig


def _f(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)  # a cell with no tokens has no mean


def print_run_summary(cfg: RunConfig, metrics: dict) -> None:
    console = Console(highlight=False, width=110)
    console.print()
    ex = metrics["examples"]
    for label in ("base", "trained"):
        if label not in metrics:
            continue
        who = f"{cfg.model.name} (base)" if label == "base" else f"{cfg.model.name} + {cfg.train.method}"
        title = f"{who} on {cfg.data.source}: per-token NLL (greedy hit rate), {ex['train']} train / {ex['test']} test examples"
        console.print(render_grid(title, metrics[label]["grid"]))
        r = metrics[label]["readings"]
        gain = r.get("privacy_gain_over_base")
        console.print(
            f"privacy: train-sensitive NLL {_f(r['privacy_train_sensitive_nll'])}"
            + (f" (drop from base {_f(gain, '+.3f')})" if gain is not None else "")
            + f", test−train sensitive gap {_f(r['privacy_train_test_gap'], '+.3f')}    "
            f"utility: test non-sensitive NLL {_f(r['utility_test_nonsensitive_nll'])} "
            f"(ppl {_f(r['utility_test_nonsensitive_ppl'], '.1f')})"
        )
    g = metrics.get("guarantee")
    if g is not None:
        eps = f"ε = {g['epsilon']:.3f} at δ = {g['delta']:.2g}" if g["epsilon"] is not None else "no formal guarantee"
        cost = metrics["cost"]
        console.print(f"privacy guarantee: {eps}    cost: {cost['wall_seconds']:.0f} s, "
                      f"{cost['tokens_per_second']:.0f} tok/s, {cost['trainable_parameters']:,} trainable parameters")
    console.print(f"run dir: {cfg.run_dir}   ({metrics['wall_seconds']:.0f} s)   metrics: {cfg.run_dir / 'eval' / 'metrics.json'}")
