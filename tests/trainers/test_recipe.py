"""The training recipe end to end on a tiny model: guardrails, ledger bookkeeping, resume, data parallelism."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_configs import config_with
from safetensors.torch import load_file

from privtune.errors import UserError
from privtune.launch.cli import main
from privtune.launch.pipeline import ensure_data
from privtune.trainers.recipe import FineTuneRecipe

BASE = {
    "name": "r",
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "num_examples": 24, "max_length": 48, "canaries": {"count": 1, "repetitions": 2}},
    "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2},
    # reproducible: these tests compare separate runs, so their sample and noise must follow from the seed
    "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "reproducible": True},
    "performance": {"micro_batch_size": 2},
    "eval": {"max_examples": 4},
}


def make_cfg(tmp_path: Path, **sections):
    return config_with(BASE, tmp_path, **sections)


@pytest.mark.parametrize("method", ["full", "lora", "dp", "dp-lora"])
def test_every_trainable_parameter_changes_after_a_step(tmp_path, method):
    # Two steps: LoRA's B starts at zero, so A's first gradient is exactly zero (then A moves from step 2 on).
    cfg = make_cfg(tmp_path, train__method=method, train__max_steps=2)
    run_dir, _ = ensure_data(cfg)
    recipe = FineTuneRecipe(cfg, run_dir)
    recipe.setup()
    before = {id(p): p.detach().clone() for p in recipe.trainable}
    frozen = {name: p.detach().clone() for name, p in recipe.model.named_parameters() if not p.requires_grad}
    recipe.train()
    recipe.cleanup()
    unchanged = [i for i, p in enumerate(recipe.trainable) if torch.equal(before[id(p)], p.detach())]
    assert not unchanged, f"{len(unchanged)} trainable tensors were not updated"
    for name, p in recipe.model.named_parameters():
        if name in frozen:
            assert torch.equal(frozen[name], p.detach()), f"frozen {name} changed"
    if method.endswith("lora"):
        assert all("lora_" in n for n, p in recipe.model.named_parameters() if p.requires_grad)


def test_ledger_counts_optimizer_steps_not_micro_batches(tmp_path):
    cfg = make_cfg(tmp_path, train__method="dp", train__max_steps=4, train__batch_size=8,
                   performance__micro_batch_size=1)
    run_dir, _ = ensure_data(cfg)
    recipe = FineTuneRecipe(cfg, run_dir)
    recipe.setup()
    stats = recipe.train()
    recipe.cleanup()
    ledger = json.loads((run_dir / "ledger.json").read_text())
    (entry,) = ledger["entries"]
    assert entry["event"]["type"] == "poisson_gaussian"
    assert entry["event"]["steps"] == stats["steps"] == recipe.scheduler.last_epoch == 4
    assert entry["event"]["sample_rate"] == pytest.approx(8 / recipe.plan.num_units)
    assert entry["event"]["noise_multiplier"] == 1.0


def test_zero_noise_is_refused_unless_debug_and_then_no_epsilon_is_claimed(tmp_path, capsys):
    cfg = make_cfg(tmp_path, train__method="dp", privacy__noise_multiplier=0.0)
    with pytest.raises(UserError, match="non_private_debug"):  # refused before any work: no run dir
        ensure_data(cfg)
    assert not cfg.run_dir.exists()
    # The trainer refuses it too, should anything reach it with σ = 0.
    run_dir, _ = ensure_data(make_cfg(tmp_path, train__method="dp"))
    with pytest.raises(UserError, match="non_private_debug"):
        FineTuneRecipe(cfg, run_dir).setup()

    cfg_path = tmp_path / "debug.yaml"
    tree = json.loads(json.dumps(BASE))
    tree.update(name="dbg", output_dir=str(tmp_path / "runs"))
    tree["train"]["method"] = "dp"
    tree["privacy"] = {"noise_multiplier": 0.0, "non_private_debug": True}
    cfg_path.write_text(json.dumps(tree))
    assert main(["run", str(cfg_path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["guarantee"]["epsilon"] is None
    run = tmp_path / "runs" / "dbg"
    assert "No formal privacy guarantee" in (run / "model" / "README.md").read_text()
    entry = json.loads((run / "ledger.json").read_text())["entries"][0]
    assert entry["event"]["type"] == "non_private"
    assert main(["budget", str(run), "--delta", "1e-5"]) == 2  # composition refuses to state an ε


def test_target_epsilon_is_a_hard_limit(tmp_path):
    cfg = make_cfg(tmp_path, train__method="dp-lora", privacy={"target_epsilon": 2.0})
    run_dir, _ = ensure_data(cfg)
    recipe = FineTuneRecipe(cfg, run_dir)
    recipe.setup()
    assert recipe.plan.epsilon <= 2.0 and recipe.plan.epsilon > 1.9
    recipe.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model_dir = run_dir / "model"
    files = list(model_dir.glob("*.safetensors"))
    assert files, f"no weights in {model_dir}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _write_cfg(tmp_path: Path, name: str, **overrides) -> Path:
    tree = json.loads(json.dumps(BASE))
    tree.update(name=name, output_dir=str(tmp_path / "runs"))
    tree["train"].update(method="dp", max_steps=8, checkpoint_every=1)
    for key, value in overrides.items():
        section, field = key.split("__")
        tree[section][field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(tree))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_stop_signal_then_resume_matches_an_uninterrupted_run(tmp_path, signum):
    """SIGTERM (Slurm preemption) and Ctrl-C both checkpoint after the current step, exit 128+signal, and resume."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = _write_cfg(tmp_path, "straight")
    assert subprocess.run([sys.executable, "-m", "privtune", "run", str(straight)], env=env,
                          capture_output=True).returncode == 0

    interrupted = _write_cfg(tmp_path, "interrupted")
    run_dir = tmp_path / "runs" / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "privtune", "run", str(interrupted)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    target = int(torch.randint(1, 6, ()).item())  # interrupt after a random step
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / f"step-{target}" / "COMPLETED").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err.decode()
    assert b"resume" in err
    assert not (run_dir / "model").exists()
    stopped_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert stopped_at < 8

    resumed = subprocess.run([sys.executable, "-m", "privtune", "run", str(interrupted)], env=env,
                             capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert b"resumed from step-" in resumed.stderr

    a, b = _final_weights(tmp_path / "runs" / "straight"), _final_weights(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    ledgers = [json.loads((tmp_path / "runs" / n / "ledger.json").read_text()) for n in ("straight", "interrupted")]
    events = [[e["event"] for e in ledger["entries"]] for ledger in ledgers]
    assert events[0] == events[1] and events[0][0]["steps"] == 8
    # The training log shows every step once, as an uninterrupted run's does.
    logs = [[json.loads(line) for line in (tmp_path / "runs" / n / "logs" / "train.jsonl").read_text().splitlines()]
            for n in ("straight", "interrupted")]
    assert [row["step"] for row in logs[1]] == list(range(1, 9))
    assert [row["loss"] for row in logs[0]] == pytest.approx([row["loss"] for row in logs[1]], rel=1e-6)
    assert [row["epsilon"] for row in logs[0]] == [row["epsilon"] for row in logs[1]]
