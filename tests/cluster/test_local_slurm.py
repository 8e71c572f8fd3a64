"""The local Slurm harness and privtune's Slurm wrappers, on a real cluster (no mocks).

A 1-node cluster is started and stopped through the CLI (so ``stop`` runs in a fresh process that only has the
folder); the rest runs on the session's 2-node cluster: multi-node ``srun``, arrays, dependencies, requeue and
the one-line errors. Each job writes under ``tmp_path``; the whole file takes well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privtune.cluster import slurm
from privtune.cluster.local import LocalSlurm
from privtune.errors import UserError

pytestmark = pytest.mark.slurm


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    return path


def where(tmp_path: Path, name: str) -> list[str]:
    return [f"--chdir={tmp_path}", f"--output={tmp_path / name}"]


def local_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privtune.cluster.local", *args], capture_output=True, text=True,
                          timeout=120)


def test_a_one_node_cluster_runs_a_job_and_stops_leaving_no_daemon(slurm_installed, tmp_path):
    root = tmp_path / "c"  # short: slurmd's step sockets live under it
    started = time.monotonic()
    up = local_cli("start", str(root), "--nodes", "1")
    try:
        assert up.returncode == 0, up.stderr
        print(f"1-node cluster up in {time.monotonic() - started:.1f} s")
        assert up.stdout.startswith(f"export SLURM_CONF={root / 'slurm.conf'}")
        processes = json.loads((root / "pids.json").read_text())["processes"]
        assert {p["name"] for p in processes} == {"munged", "slurmctld", "slurmd-localhost"}
        assert all(running(p["pid"]) for p in processes)

        job = script(tmp_path / "hello.sh", 'echo "hello from $SLURM_JOB_ID on $SLURMD_NODENAME"\n')
        done = subprocess.run(["sbatch", "--wait", *where(tmp_path, "hello.out"), str(job)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **LocalSlurm(root).env})
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.split()[-1]  # "Submitted batch job N"
        assert (tmp_path / "hello.out").read_text() == f"hello from {job_id} on localhost\n"
    finally:
        down = local_cli("stop", str(root))
    assert down.returncode == 0, down.stderr
    assert not any(running(p["pid"]) for p in processes)
    assert not (root / "pids.json").exists()
    LocalSlurm(root).stop()  # stopping a stopped cluster does nothing


def test_srun_runs_one_task_on_each_of_two_nodes(slurm_cluster, tmp_path):
    assert slurm.available() is None
    # Single quotes: the rank variables must be expanded inside each task, not once in the batch shell.
    job = script(tmp_path / "ranks.sh", "srun -N2 --ntasks-per-node=1 bash -c 'echo $SLURM_NODEID $SLURM_PROCID "
                                        "$SLURMD_NODENAME'\n")
    job_id = slurm.submit(job, extra_args=["-N2", "--ntasks-per-node=1", "--job-name=ranks of two",
                                           "--comment=a comment with spaces", *where(tmp_path, "ranks.out")])
    assert slurm.wait_for(job_id, timeout=30) == "COMPLETED"
    assert sorted((tmp_path / "ranks.out").read_text().splitlines()) == ["0 0 n1", "1 1 n2"]

    [record] = slurm.job_records(job_id)
    assert record["JobId"] == job_id and record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0"
    assert record["JobName"] == "ranks of two" and record["Comment"] == "a comment with spaces"
    assert record["StdOut"] == str(tmp_path / "ranks.out") and record["BatchHost"] == "n1"
    assert slurm.hostnames(record["NodeList"]) == ["n1", "n2"]
    assert slurm.node_address("n2") == "127.0.0.1"  # node names do not resolve: reach nodes by NodeAddr
    assert slurm.job_state(job_id) == "COMPLETED"


def test_an_array_completes_every_task_and_a_dependent_job_runs_after_it(slurm_cluster, tmp_path):
    tasks = script(tmp_path / "task.sh", 'sleep 1; echo "task $SLURM_ARRAY_TASK_ID"\n')
    array = slurm.submit(tasks, extra_args=["--array=0-2%2", f"--chdir={tmp_path}",
                                            f"--output={tmp_path / 'task-%a.out'}"])
    after = slurm.submit(script(tmp_path / "after.sh", "echo after\n"), dependency=f"afterany:{array}",
                         extra_args=where(tmp_path, "after.out"))
    assert slurm.job_records(after)[0]["JobState"] == "PENDING"  # the array takes at least 2 s

    assert slurm.wait_for(array, timeout=30) == "COMPLETED"
    records = slurm.job_records(array)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2"]
    assert {(r["ArrayJobId"], r["JobState"], r["ExitCode"]) for r in records} == {(array, "COMPLETED", "0:0")}
    for task in range(3):
        assert (tmp_path / f"task-{task}.out").read_text() == f"task {task}\n"

    assert slurm.wait_for(after, timeout=30) == "COMPLETED"
    [dependent] = slurm.job_records(after)
    assert dependent["StartTime"] >= max(r["EndTime"] for r in records)  # ISO times compare as strings
    assert (tmp_path / "after.out").read_text() == "after\n"


def test_a_requeued_job_runs_again_with_its_restart_count(slurm_cluster, tmp_path):
    restarts = tmp_path / "restarts"
    job = script(tmp_path / "sleeper.sh", f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {restarts}\nsleep 300\n')
    job_id = slurm.submit(job, extra_args=["--requeue", *where(tmp_path, "sleeper.out")])
    slurm.wait_for(job_id, states=("RUNNING",), timeout=30)
    deadline = time.monotonic() + 10
    while not restarts.exists() and time.monotonic() < deadline:
        time.sleep(0.1)

    requeued = time.monotonic()
    slurm.requeue(job_id)
    while restarts.read_text().split() != ["0", "1"] and time.monotonic() < requeued + 60:
        time.sleep(0.1)
    print(f"the requeued job ran again {time.monotonic() - requeued:.1f} s after scontrol requeue")
    assert restarts.read_text().split() == ["0", "1"]
    assert slurm.job_records(job_id)[0]["Restarts"] == "1"

    slurm.cancel(job_id)
    assert slurm.wait_for(job_id, timeout=30) == "CANCELLED"


def test_a_refused_job_raises_a_one_line_user_error(slurm_cluster, tmp_path):
    bad = script(tmp_path / "bad.sh", "#SBATCH --no-such-option\necho never\n")
    with pytest.raises(UserError) as refused:
        slurm.submit(bad)
    message = str(refused.value)
    assert "\n" not in message and "no-such-option" in message, message


def test_an_unknown_job_has_no_records(slurm_cluster):
    assert slurm.job_records("999999") == []
    assert slurm.job_state("999999") is None


def test_without_sbatch_submit_says_where_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"^sbatch not found: .*python -m privtune.cluster.local start DIR"):
        slurm.submit(tmp_path / "job.sh")
    assert slurm.available().startswith("sbatch not found")


def test_without_a_cluster_submit_says_so_at_once(slurm_installed, monkeypatch, tmp_path):
    job = script(tmp_path / "job.sh", "true\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))  # sbatch itself would retry for 60 s
    with pytest.raises(UserError, match=r"^SLURM_CONF names .*missing.conf, which does not exist: check"):
        slurm.submit(job)
    if Path("/etc/slurm/slurm.conf").exists():
        return  # without SLURM_CONF this machine's own cluster answers
    monkeypatch.delenv("SLURM_CONF")
    with pytest.raises(UserError, match=r"^sbatch cannot reach a Slurm controller: .*configuration source"):
        slurm.submit(job)
    assert "configuration source" in slurm.available()
