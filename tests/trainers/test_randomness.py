"""Secret randomness by default: the Poisson sample and the noise of a DP run come from a 128-bit key drawn from
the OS CSPRNG and kept only in checkpoints; privacy.reproducible derives them from the public seed and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from privtune.fingerprint import read_record
from privtune.launch.cli import main
from privtune.launch.config import config_from_dict
from privtune.launch.pipeline import ensure_data
from privtune.launch.stages import train_wanted
from privtune.trainers.checkpoint import latest_checkpoint, load_secret
from privtune.trainers.recipe import FineTuneRecipe

BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "num_examples": 24, "max_length": 40, "canaries": None},
    "train": {"method": "dp-lora", "max_steps": 3, "batch_size": 6, "learning_rate": 5e-2},
    "privacy": {"noise_multiplier": 1.0},
    "performance": {"micro_batch_size": 4},
    "eval": {"max_examples": 2, "exposure": False, "extraction_max_spans": 0, "mia": False},
}


def _cfg(tmp_path: Path, name: str, **privacy):
    tree = json.loads(json.dumps(BASE))
    tree.update(name=name, output_dir=str(tmp_path / "runs"))
    tree["privacy"].update(privacy)
    return config_from_dict(tree)


def _train(cfg, *, steps: int | None = None, replay_key: int | None = None) -> tuple[dict, FineTuneRecipe]:
    run_dir, _ = ensure_data(cfg)
    train_key = train_wanted(cfg, read_record(run_dir / "data")).key  # what the pipeline gives its checkpoints
    recipe = FineTuneRecipe(cfg, run_dir, train_key=train_key, replay_key=replay_key)
    recipe.setup()
    if steps is not None:
        recipe.total_steps = steps
    recipe.train()
    recipe.cleanup()
    return {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}, recipe


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_runs_differ_and_reproducible_runs_are_identical(tmp_path):
    first, r1 = _train(_cfg(tmp_path, "a"))
    second, r2 = _train(_cfg(tmp_path, "b"))
    assert r1.randomness_key != r2.randomness_key and r1.randomness_key.bit_length() > 64
    assert not _same(first, second)  # fresh secret each run: another sample and other noise
    third, r3 = _train(_cfg(tmp_path, "c", reproducible=True))
    fourth, _ = _train(_cfg(tmp_path, "d", reproducible=True))
    assert r3.randomness_key == 0 and _same(third, fourth)


def _key_forms(key: int) -> list[bytes]:
    little = key.to_bytes((key.bit_length() + 8) // 8, "little")
    return [str(key).encode(), f"{key:x}".encode(), f"{key:#x}".encode(), little, little[::-1]]


def test_the_key_is_written_into_checkpoints_only(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    tree = json.loads(json.dumps(BASE))
    tree.update(name="k", output_dir=str(tmp_path / "runs"))
    tree["train"]["checkpoint_every"] = 1
    cfg_path.write_text(json.dumps(tree))
    assert main(["run", str(cfg_path)]) == 0
    out, err = capsys.readouterr()
    run = tmp_path / "runs" / "k"
    key = load_secret(latest_checkpoint(run))["randomness_key"]
    assert key.bit_length() > 100
    forms = _key_forms(key)
    for path in run.rglob("*"):
        if path.is_file() and "checkpoints" not in path.relative_to(run).parts:
            data = path.read_bytes()
            assert not any(f in data for f in forms), f"the secret key leaked into {path.relative_to(run)}"
    assert not any(f in (out + err).encode() for f in forms)
    assert "secret 128-bit key" in err  # the plan says what the guarantee rests on


def test_resume_in_the_default_mode_replays_the_secret(tmp_path):
    interrupted = _cfg(tmp_path, "i")
    tree = interrupted.model_dump(mode="json")
    tree["train"]["checkpoint_every"] = 1
    interrupted = config_from_dict(tree)
    _, stopped = _train(interrupted, steps=2)  # stops after step 2 as a preempted run does (checkpoint at 2)
    key = stopped.randomness_key
    resumed, again = _train(interrupted)  # a new process: the key comes back from checkpoint step-2
    assert again.randomness_key == key
    straight, _ = _train(_cfg(tmp_path, "s"), replay_key=key)  # the test injects the same secret
    assert _same(resumed, straight)


def test_reproducible_runs_are_marked_and_budget_refuses_them_unless_asked(tmp_path, capsys):
    cfg_path = tmp_path / "r.yaml"
    tree = json.loads(json.dumps(BASE))
    tree.update(name="r", output_dir=str(tmp_path / "runs"))
    tree["privacy"]["reproducible"] = True
    cfg_path.write_text(json.dumps(tree))
    assert main(["run", str(cfg_path)]) == 0
    _, err = capsys.readouterr()
    assert "REPRODUCIBLE from the public seed" in err and "NOT A RELEASE" in err
    run = tmp_path / "runs" / "r"
    assert "NOT A RELEASE" in (run / "model" / "README.md").read_text()
    (entry,) = json.loads((run / "ledger.json").read_text())["entries"]
    assert entry["event"]["randomness"] == "reproducible"
    assert main(["budget", str(run), "--delta", "1e-3"]) == 2
    _, err = capsys.readouterr()
    assert "public seed" in err and "--allow-reproducible" in err and err.strip().count("\n") == 0
    assert main(["budget", str(run), "--delta", "1e-3", "--allow-reproducible", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["epsilon"] > 0 and "NOT A GUARANTEE" in err


def test_reproducible_and_secure_rng_exclude_each_other(tmp_path):
    from privtune.errors import UserError

    with pytest.raises(UserError, match="exclude each other"):
        _cfg(tmp_path, "x", reproducible=True, secure_rng=True)
