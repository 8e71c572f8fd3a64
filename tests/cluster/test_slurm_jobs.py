"""privtune's Slurm jobs on a real local cluster (two slurmd "nodes" on loopback, tests/cluster/conftest.py).

The reference is a local two-process run (``torchrun --nproc_per_node 2``) of the same tiny DP-LoRA config. Each
job is submitted with ``privtune submit --nodes 2`` (one process per node, torchrun on each, c10d rendezvous at
the head node) and must end with the reference's weights and ledger:

- uninterrupted;
- sent ``scontrol requeue`` mid-run: Slurm signals every task, the ranks checkpoint and stop, Slurm requeues the
  job, the requeued job resumes from the newest complete checkpoint; ``privtune status`` is polled throughout
  and must have shown each state the job passed through (PENDING behind a job holding both nodes, RUNNING,
  the requeue, COMPLETED);
- sent Slurm's warning signal (what ``--signal=B:USR1@S`` delivers: USR1 to the batch shell only): the shell
  passes it on, the ranks checkpoint, the job requeues itself and resumes.

No step is counted twice: the training log holds steps 1..T once and the ledger records T steps. Then a sweep of
3 runs as an array (throttle 2) plus its dependent report job, whose report lists all 3; and an eval sharded over
2 array tasks plus the merge job equals the eval of one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 6
CONFIG = """name: {name}
output_dir: {out}
model: {{name: tiny-llama}}
data: {{source: customersim, num_examples: 24, max_length: 48, canaries: {{count: 1, repetitions: 2}}}}
train: {{method: dp-lora, max_steps: {steps}, batch_size: 4, learning_rate: 1.0e-2, checkpoint_every: 1}}
privacy: {{noise_multiplier: 1.0, clip_norm: 1.0, reproducible: true}}
performance: {{micro_batch_size: 2, num_threads: 1, parallel: ddp}}
eval: {{max_examples: 4}}
"""


def _env() -> dict[str, str]:  # read at call time: the cluster fixture sets SLURM_CONF in os.environ
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _config(tmp_path: Path, name: str, **extra) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = CONFIG.format(name=name, out=tmp_path / "runs", steps=extra.pop("steps", STEPS))
    path.write_text(text + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    return path


def _privtune(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "privtune", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _submit(config: Path, *flags: str) -> tuple[str, Path]:
    doc = json.loads(_privtune("submit", str(config), "--nodes", "2", *flags, "--json", cwd=config.parent).stdout)
    return doc["job_id"], Path(doc["run_dir"])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted((run_dir / "model").glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _ledger_events(run_dir: Path) -> list[dict]:
    return [e["event"] for e in json.loads((run_dir / "ledger.json").read_text())["entries"]]


def _assert_same_run(reference: Path, run_dir: Path) -> None:
    a, b = _weights(reference), _weights(run_dir)
    assert a and a.keys() == b.keys()
    for name in a:  # the ranks may meet in another order: the sums of the two ranks' parts commute up to rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert _ledger_events(reference) == _ledger_events(run_dir)
    assert _ledger_events(run_dir)[0]["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # every optimizer step once, none twice


def _exits(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "slurm" / "exits.jsonl").read_text().splitlines()]


def _wait_checkpoint(run_dir: Path, step: int, job_id: str, timeout: float = 300) -> None:
    from privtune.cluster import slurm

    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / f"step-{step}" / "COMPLETED").exists():
        state = slurm.job_state(job_id)
        assert state not in ("FAILED", "CANCELLED", "COMPLETED") and time.time() < deadline, (state, _logs(run_dir))
        time.sleep(0.05)


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted((run_dir / "slurm").glob("*.out")))


def _wait(job_id: str, run_dir: Path | None = None, timeout: float = 400) -> str:
    from privtune.cluster import slurm

    state = slurm.wait_for(job_id, timeout=timeout)
    assert state == "COMPLETED", (state, _logs(run_dir) if run_dir else "")
    return state


class StatusPoller:
    """``privtune status``'s view of a run, read every 0.2 s on a thread: the Slurm states it showed, in order."""

    def __init__(self, run_dir: Path):
        from privtune.cluster.status import gather

        self.states: list[str] = []
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                try:
                    state = (gather(str(run_dir)).get("job") or {}).get("state")
                except Exception:  # the run dir is still being made
                    state = None
                if state and (not self.states or self.states[-1] != state):
                    self.states.append(state)
                time.sleep(0.2)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        return self.states


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The local two-process run every Slurm job must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    config = _config(tmp, "local")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "privtune", "run", str(config)], capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "local"


def test_two_node_dp_lora_job_equals_the_local_two_process_run(slurm_cluster, reference, tmp_path):
    job_id, run_dir = _submit(_config(tmp_path, "slurm"))
    _wait(job_id, run_dir)
    _assert_same_run(reference, run_dir)
    assert (run_dir / "eval" / "metrics.json").exists()
    assert [e["exit_code"] for e in _exits(run_dir)] == [0]
    node_logs = sorted(p.name for p in (run_dir / "slurm").glob(f"{job_id}.node*.out"))
    assert node_logs == [f"{job_id}.node0.out", f"{job_id}.node1.out"]  # one task per node, each its own log
    ranks = list((run_dir / "slurm" / "ranks" / job_id).rglob("stderr.log"))
    assert len(ranks) == 2  # per-rank logs in the run dir


def test_scontrol_requeue_mid_run_resumes_and_equals_the_uninterrupted_run(slurm_cluster, reference, tmp_path):
    from privtune.cluster import slurm

    blocker = tmp_path / "blocker.sh"  # holds both nodes until released, so the job is seen PENDING first
    blocker.write_text(f"#!/bin/bash\nuntil [ -e {tmp_path}/release ]; do sleep 0.1; done\n")
    block_id = slurm.submit(blocker, extra_args=["--nodes=2", "--exclusive", f"--output={tmp_path}/block.out"])
    slurm.wait_for(block_id, states=("RUNNING",), timeout=60)
    config = _config(tmp_path, "requeued")
    poller = StatusPoller(tmp_path / "runs" / "requeued")
    job_id, run_dir = _submit(config, "--requeue")
    deadline = time.time() + 60
    while "PENDING" not in poller.states:
        assert time.time() < deadline, poller.states
        time.sleep(0.1)
    (tmp_path / "release").touch()
    _wait_checkpoint(run_dir, 2, job_id)
    slurm.requeue(job_id)
    _wait(job_id, run_dir)
    time.sleep(0.5)
    states = poller.stop()
    slurm.wait_for(block_id, timeout=60)
    _assert_same_run(reference, run_dir)
    exits = _exits(run_dir)
    assert len(exits) == 2 and exits[-1]["exit_code"] == 0 and exits[-1]["restart"] == 1, exits
    # privtune status showed each state: queued behind the blocker, running, requeued, running again, done
    assert states[0] == "PENDING" and states[-1] == "COMPLETED", states
    assert "RUNNING" in states and any(s in ("REQUEUED", "PENDING") for s in states[states.index("RUNNING"):]), states
    assert states.count("RUNNING") >= 2, states


def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, reference, tmp_path):
    from privtune.cluster import slurm

    job_id, run_dir = _submit(_config(tmp_path, "warned"), "--requeue")
    _wait_checkpoint(run_dir, 2, job_id)
    slurm.cancel(job_id, signal="USR1", batch=True)  # what --signal=B:USR1@S delivers: the batch shell alone
    _wait(job_id, run_dir)
    _assert_same_run(reference, run_dir)
    exits = _exits(run_dir)
    assert [e["requeued"] for e in exits] == [True, False] and exits[-1]["exit_code"] == 0, exits
    assert "warning signal from Slurm" in (run_dir / "slurm" / f"{job_id}.out").read_text()


def test_sweep_array_and_its_report_job(slurm_cluster, tmp_path):
    from privtune.cluster import slurm

    config = _config(tmp_path, "sw", steps=2)
    config.write_text(config.read_text().replace("checkpoint_every: 1", "checkpoint_every: null")
                      + "grid:\n  train.method: [lora, dp-lora, full]\n")
    doc = json.loads(_privtune("sweep", str(config), "--slurm", "--throttle", "2", "--nodes", "1", "--json",
                               cwd=tmp_path).stdout)
    assert "ArrayTaskThrottle=2" in subprocess.run(["scontrol", "show", "job", doc["array_job_id"]],
                                                    capture_output=True, text=True).stdout
    assert slurm.wait_for(doc["report_job_id"], timeout=600) == "COMPLETED", doc
    assert slurm.wait_for(doc["array_job_id"], timeout=60) == "COMPLETED"
    report = (Path(doc["report"]) / "report.md").read_text()
    for name in ("sw-lora", "sw-dp-lora", "sw-full"):
        assert (tmp_path / "runs" / name / "eval" / "metrics.json").exists()
    rows = json.loads((Path(doc["report"]) / "rows.json").read_text())
    assert sorted(r["run"] for r in rows if r["run"]) == ["sw-dp-lora", "sw-full", "sw-lora"], report
    assert "Not in this report" not in report
    # Submitted again, every run is finished: nothing is queued.
    again = json.loads(_privtune("sweep", str(config), "--slurm", "--nodes", "1", "--json", cwd=tmp_path).stdout)
    assert again["array_job_id"] is None and sorted(again["skipped_finished"]) == sorted(doc["runs"])


def test_eval_sharded_over_array_tasks_equals_one_process(slurm_cluster, tmp_path):
    from privtune.cluster import slurm

    config = _config(tmp_path, "ev", steps=2)
    config.write_text(config.read_text().replace("max_examples: 4", "max_examples: 8"))
    _privtune("run", str(config), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "ev"
    one = json.loads((run_dir / "eval" / "metrics.json").read_text())
    import shutil

    shutil.rmtree(run_dir / "eval")
    doc = json.loads(_privtune("eval", str(run_dir), "--slurm", "--shards", "2", "--json", cwd=tmp_path).stdout)
    assert slurm.wait_for(doc["shard_job_id"], timeout=300) == "COMPLETED"
    assert slurm.wait_for(doc["merge_job_id"], timeout=300) == "COMPLETED", _logs(run_dir)
    sharded = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for label in ("base", "trained"):
        assert sharded[label]["grid"] == one[label]["grid"]
    logs = "".join(p.read_text() for p in (run_dir / "slurm").glob("*.out"))
    assert "shard 0/2 scored" in logs and "shard 1/2 scored" in logs
