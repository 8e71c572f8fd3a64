"""The recipe under the sharding presets, end to end with torchrun (2 gloo processes on the CPU).

- ddp and fsdp2 × {dp, dp-lora, full, lora}, zero3 × {full, dp-lora}: 2 processes give the model 1 process
  gives (the DP noise is keyed by coordinate, so it does not depend on the world size), and model/ is an ordinary model plain transformers / peft load.
- fsdp2 stopped by SIGTERM (a Slurm preemption) resumes bit-identically on 2 processes, with the same ledger,
  and its checkpoint also resumes on 1 process.
- presets a launch cannot honour are refused with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privtune.errors import UserError

BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "num_examples": 24, "max_length": 48, "canaries": {"count": 1, "repetitions": 2}},
    "train": {"method": "dp", "max_steps": 3, "batch_size": 4, "learning_rate": 1e-2},
    "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "reproducible": True},
    "performance": {"micro_batch_size": 2},
    "eval": {"max_examples": 4},
}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cfg(tmp_path: Path, name: str, **overrides) -> Path:
    tree = json.loads(json.dumps(BASE))
    tree.update(name=name, output_dir=str(tmp_path / "runs"))
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if key == "grid":
            tree["grid"] = value
            continue
        tree.setdefault(section, {})[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(tree))
    return path


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
            "-m", "privtune", *args]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in (run_dir / "model").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert out, f"no weights in {run_dir / 'model'}"
    return out


METHODS = ("dp", "dp-lora", "full", "lora")
GRID = {"variants": [{"name": m, "train.method": m} for m in METHODS]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The four methods on one process (ddp), as one sweep: the reference of every sharded launch below."""
    root = tmp_path_factory.mktemp("one-process")
    _run([sys.executable, "-m", "privtune", "run", str(_cfg(root, "one", grid=GRID))])
    return root / "runs"


def _same_models(one_runs: Path, runs: Path, preset: str, methods) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from privtune.trainers.models import build_tiny

    for method in methods:
        a, b = _weights(one_runs / f"one-{method}"), _weights(runs / f"two-{method}")
        assert a.keys() == b.keys()
        for name in a:
            # AdamW divides by sqrt(v): where a gradient is near 0 the order of fp32 sums (another reduction)
            # moves a weight by up to ~5e-6 (seen: zero3, full); the three steps move every weight by ~3e-2.
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=2e-5, msg=f"{method}: {name}")
        model_dir = runs / f"two-{method}" / "model"
        eff = json.loads((model_dir / "efficiency.json").read_text())
        assert eff["world_size"] == 2 and eff["parallel"] == preset
        # model/ is what plain transformers / peft read: nothing of the sharding engine is left in it
        if method.endswith("lora"):
            loaded = PeftModel.from_pretrained(build_tiny("tiny-llama", seed=0)[0], str(model_dir)).merge_and_unload()
            reference = PeftModel.from_pretrained(build_tiny("tiny-llama", seed=0)[0],
                                                  str(one_runs / f"one-{method}" / "model")).merge_and_unload()
        else:
            loaded = AutoModelForCausalLM.from_pretrained(str(model_dir))
            reference = AutoModelForCausalLM.from_pretrained(str(one_runs / f"one-{method}" / "model"))
        for (name, p), (_, q) in zip(loaded.named_parameters(), reference.named_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-5, msg=f"{method}: {name}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ddp", "fsdp2"])
def test_two_processes_give_the_one_process_models_as_ordinary_models(tmp_path, one_process, preset):
    """Every method, as one sweep per launch (the grid's runs share one process start)."""
    _run(_torchrun("run", str(_cfg(tmp_path, "two", grid=GRID, performance__parallel=preset))))
    _same_models(one_process, tmp_path / "runs", preset, METHODS)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_on_two_processes_gives_the_one_process_models_as_ordinary_models(tmp_path, one_process):
    grid = {"variants": [{"name": m, "train.method": m} for m in ("full", "dp", "dp-lora")]}
    _run(_torchrun("run", str(_cfg(tmp_path, "two", grid=grid, performance__parallel="zero3"))))
    _same_models(one_process, tmp_path / "runs", "zero3", ("full", "dp", "dp-lora"))
    written = json.loads((tmp_path / "runs" / "two-full" / "parallel" / "deepspeed.json").read_text())
    assert written["zero_optimization"]["stage"] == 3 and written["gradient_clipping"] == 0


def _stop_after(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start ``cmd`` in its own session; SIGTERM every process of it (as Slurm signals every task) once the
    checkpoint of ``step`` is complete; wait for the checkpoint-and-exit."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 400
    while not (run_dir / "checkpoints" / f"step-{step}" / "COMPLETED").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1].decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert not (run_dir / "model").exists(), err.decode()[-2000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_sigterm_then_resume_is_bit_identical_and_resumes_on_one_process_too(tmp_path):
    over = dict(train__max_steps=6, train__checkpoint_every=1, performance__parallel="fsdp2")
    _run(_torchrun("run", str(_cfg(tmp_path, "straight", **over))))

    interrupted = _cfg(tmp_path, "interrupted", **over)
    run_dir = tmp_path / "runs" / "interrupted"
    _stop_after(_torchrun("run", str(interrupted)), run_dir, step=2)
    _run(_torchrun("run", str(interrupted)))
    a, b = _weights(tmp_path / "runs" / "straight"), _weights(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    ledgers = [json.loads((tmp_path / "runs" / n / "ledger.json").read_text()) for n in ("straight", "interrupted")]
    assert [e["event"] for e in ledgers[0]["entries"]] == [e["event"] for e in ledgers[1]["entries"]]
    assert ledgers[1]["entries"][0]["event"]["steps"] == 6
    log = [json.loads(line) for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 7))

    # The same checkpoint, resumed on ONE process (ddp): the noise and the sample do not depend on the world
    # size, so it ends where the 2-process run ended (up to the order of floating-point sums).
    moved_dir = tmp_path / "runs" / "moved"
    _stop_after(_torchrun("run", str(_cfg(tmp_path, "moved", **over))), moved_dir, step=2)
    one_process = _cfg(tmp_path, "moved", train__max_steps=6, train__checkpoint_every=1)  # parallel: ddp
    _run([sys.executable, "-m", "privtune", "run", str(one_process)])
    c = _weights(moved_dir)
    for name in a:
        torch.testing.assert_close(a[name], c[name], rtol=1e-5, atol=1e-6, msg=name)


def test_presets_the_launch_cannot_honour_are_refused(monkeypatch):
    from privtune.trainers.parallel import check_launch

    with pytest.raises(UserError, match="single"):
        check_launch("single", world_size=2, device_type="cpu")
    check_launch("ddp", world_size=1, device_type="cpu")  # one process, nothing to shard: fine
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu` sets (checked, 1.15)
    for preset in ("ddp", "fsdp2", "zero3"):
        with pytest.raises(UserError, match="torchrun"):
            check_launch(preset, world_size=1, device_type="cpu")


def test_preset_method_pairs_without_a_test_are_refused_before_any_work(tmp_path):
    from privtune.launch.config import config_from_dict
    from privtune.trainers.parallel import check_parallel

    for method in ("full", "dp", "dp-lora"):  # zero3-offload is tested with lora only
        cfg = config_from_dict({**json.loads(json.dumps(BASE)), "name": "z", "output_dir": str(tmp_path),
                                "train": {**BASE.get("train", {}), "method": method},
                                "performance": {"parallel": "zero3-offload"}})
        with pytest.raises(UserError, match="not covered"):
            check_parallel(cfg)


@pytest.mark.parametrize("preset", ["single", "ddp", "fsdp2", "zero2", "zero3"])
def test_the_written_accelerate_config_is_one_accelerate_reads(tmp_path, preset):
    """accelerate's own loader accepts the file, and reads back the preset's sharding and world size."""
    from accelerate.commands.config.config_args import ClusterConfig

    from privtune.trainers.parallel.launch_configs import write_launch_configs

    deepspeed = {"zero_optimization": {"stage": 3}, "gradient_clipping": 0} if preset.startswith("zero") else None
    write_launch_configs(tmp_path, preset=preset, num_processes=8, precision="bf16", layer_class="LlamaDecoderLayer",
                         deepspeed=deepspeed)
    loaded = ClusterConfig.from_yaml_file(str(tmp_path / "parallel" / "accelerate.yaml"))
    assert loaded.num_processes == 8 and loaded.mixed_precision == "bf16"
    expected = {"single": "NO", "ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert str(loaded.distributed_type).endswith(expected[preset])
    if preset == "fsdp2":
        assert loaded.fsdp_config["fsdp_version"] == 2
        assert loaded.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    if deepspeed is not None:
        file = Path(loaded.deepspeed_config["deepspeed_config_file"])
        assert json.loads(file.read_text()) == deepspeed


@pytest.mark.slow
def test_accelerate_launch_on_the_cpu_is_refused_with_one_line(tmp_path):
    cfg = _cfg(tmp_path, "acc", performance__parallel="fsdp2")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "privtune", "run", str(cfg)], env=ENV, capture_output=True, text=True, timeout=300)
    # privtune exits 2 with one line (accelerate then adds its own traceback and exit status 1 around it)
    assert "returned non-zero exit status 2" in proc.stderr, proc.stderr[-2000:]
    assert [line.startswith("privtune: error:") for line in proc.stderr.splitlines()].count(True) == 1
    assert "torchrun --nproc_per_node" in proc.stderr
    assert not (tmp_path / "runs" / "acc").exists()  # refused before any work
