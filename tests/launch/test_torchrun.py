"""torchrun on the shipped quickstart config: its grid runs as a sweep under 2 processes, rank 0 reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.name=tiny-llama", "data.num_examples=24", "data.max_length=64", "train.max_steps=2",
         "eval.max_examples=4", "eval.exposure_sample_size=20", "eval.extraction_max_spans=2",
         "eval.mia_bootstrap=20"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "privtune", "run", str(REPO / "configs" / "quickstart.yaml"), *SMALL,
           f"output_dir={tmp_path / 'runs'}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)


@pytest.mark.distributed
@pytest.mark.slow
def test_quickstart_grid_under_torchrun_reports_once_from_rank_0(tmp_path):
    proc = _torchrun(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # exactly one JSON document: rank 1 prints nothing
    assert [row["method"] for row in result["runs"]] == ["full", "lora", "dp", "dp-lora"]
    assert all(row["test_nonsensitive_nll"] is not None for row in result["runs"])
    for row in result["runs"]:
        eff = json.loads((tmp_path / "runs" / row["run"] / "model" / "efficiency.json").read_text())
        assert eff["world_size"] == 2
    assert "Traceback" not in proc.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_quickstart_without_its_grid_under_torchrun(tmp_path):
    proc = _torchrun(tmp_path, "grid=null", "train.method=dp-lora", "name=mine", "privacy.target_epsilon=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "mine" / "eval" / "metrics.json").read_text())
    assert metrics["guarantee"]["epsilon"] <= 3.0 and "trained" in metrics
    assert proc.stdout.count("run dir:") == 1  # one summary, from rank 0
