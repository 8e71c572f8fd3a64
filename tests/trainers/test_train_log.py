"""The training log: one line per optimizer step with the documented fields, and TensorBoard events beside it."""

from __future__ import annotations

import json

import pytest

from privtune.launch.cli import main

BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "num_examples": 24, "max_length": 48, "canaries": None},
    "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1},
    "privacy": {"target_epsilon": 8.0},
    "eval": {"max_examples": 2, "exposure": False, "extraction_max_spans": 0, "mia": False},
}


def _run(tmp_path, method: str) -> list[dict]:
    tree = json.loads(json.dumps(BASE))
    tree.update(name=method, output_dir=str(tmp_path / "runs"))
    tree["train"]["method"] = method
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tree))
    assert main(["run", str(cfg)]) == 0
    log = tmp_path / "runs" / method / "logs" / "train.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_dp_log_has_every_step_its_epsilon_and_norm_aggregates(tmp_path):
    from privtune.accounting.calibrate import compute_epsilon

    rows = _run(tmp_path, "dp-lora")
    assert [r["step"] for r in rows] == [1, 2, 3]
    plan = json.loads((tmp_path / "runs" / "dp-lora" / "model" / "efficiency.json").read_text())["dp_plan"]
    for r in rows:  # ε spent after step t is the accountant's ε for t steps, independently recomputed here
        assert r["epsilon"] == pytest.approx(compute_epsilon(
            noise_multiplier=plan["noise_multiplier"], delta=plan["delta"], sample_rate=plan["sample_rate"],
            steps=r["step"], accountant="pld"), rel=1e-9)
        q = r["unit_norm_quantiles"]
        assert q["p10"] <= q["p50"] <= q["p90"] <= q["max"]
        assert 0.0 <= r["clipped_fraction"] <= 1.0 and r["loss"] > 0 and r["tokens"] > 0
    assert rows[-1]["epsilon"] <= 8.0
    # warm-up: the learning rate of step 1 is half of the configured one (LambdaLR (s+1)/(warmup+1))
    assert rows[0]["learning_rate"] == pytest.approx(5e-3) and rows[1]["learning_rate"] == pytest.approx(1e-2)


def test_non_dp_log_and_tensorboard_events(tmp_path):
    rows = _run(tmp_path, "full")
    assert [r["step"] for r in rows] == [1, 2, 3] and "epsilon" not in rows[0]
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: only the JSONL log is written")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "full" / "logs" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
