"""``privtune status``: what it reports is what the run's files and Slurm say.

The run dirs are real: one tiny DP training (tiny-llama, a handful of steps, checkpoints every 2) made by
``privtune run``; a copy with ``model/`` and ``eval/`` removed, the train log cut short and the newest checkpoint
turned back into a partial one stands for a run in progress. The ``slurm/`` files are written by hand in the
formats of launch/submit.py and cluster/render.py; Slurm itself is replaced by fakes of ``cluster.slurm``'s
``available``, ``job_records`` and ``hostnames``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest

from privtune.accounting.budget import compose_ledgers
from privtune.cluster import slurm
from privtune.cluster.status import gather, render, status_command
from privtune.errors import UserError
from privtune.launch.cli import main

CONFIG = {
    "name": "st",
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "num_examples": 30, "max_length": 48, "canaries": {"count": 1, "repetitions": 2}},
    # epochs, not max_steps: status must compute the total the way the trainer does, from N
    "train": {"method": "dp", "epochs": 1.0, "batch_size": 4, "learning_rate": 1e-2, "checkpoint_every": 2},
    "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0},
    "performance": {"micro_batch_size": 4},
    "eval": {"max_examples": 4, "mia_bootstrap": 0, "exposure_sample_size": 10, "extraction_max_spans": 0},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("status")
    config = root / "st.json"
    config.write_text(json.dumps({**CONFIG, "output_dir": str(root / "runs")}))
    assert main(["run", str(config)]) == 0
    return root / "runs" / "st"


def train_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]


@pytest.fixture
def in_progress(finished, tmp_path) -> Path:
    """The finished run as it stood one step before its end: the last checkpoint being written (still partial)."""
    run = tmp_path / "runs" / "st"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "eval")
    total = len(train_log(run))
    log = (run / "logs" / "train.jsonl").read_text().splitlines(keepends=True)
    (run / "logs" / "train.jsonl").write_text("".join(log[:total - 1]))
    newest = max((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    (newest / "COMPLETED").unlink()  # what save_checkpoint's staging folder holds before its marker
    newest.rename(newest.parent / f".{newest.name}.partial")
    # and a newer step folder without its marker: what an interrupted overwrite (rmtree) of a checkpoint leaves
    (run / "checkpoints" / f"step-{total + 1}").mkdir()
    (run / "checkpoints" / f"step-{total + 1}" / "optimizer.pt").write_text("")
    return run


@pytest.fixture
def fake_slurm(monkeypatch):
    """Slurm answering with ``records[job_id]``; ``unreachable`` set makes it not answer at all."""
    state = {"records": {}, "unreachable": None, "hosts": ["n1", "n2"]}
    monkeypatch.setattr(slurm, "available", lambda: state["unreachable"])
    monkeypatch.setattr(slurm, "job_records", lambda job_id: state["records"].get(str(job_id), []))
    monkeypatch.setattr(slurm, "hostnames", lambda nodelist: state["hosts"])
    return state


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def submit(run: Path, job_id: str, **more) -> dict:
    """The jobs.jsonl line launch/submit.py writes for a train job."""
    entry = {"job_id": job_id, "kind": "train", "submitted": time.time(), "script": str(run / "slurm/train.sbatch"),
             "nodes": 2, "procs_per_node": 2, "array_task": None, "log": str(run / "slurm" / f"{job_id}.out"),
             **more}
    (run / "slurm").mkdir(exist_ok=True)
    with open(run / "slurm" / "jobs.jsonl", "a") as f:  # appended, one line per submission
        f.write(json.dumps(entry) + "\n")
    return entry


def record(job_id: str, run: Path, **fields) -> dict[str, str]:
    return {"JobId": job_id, "JobState": "RUNNING", "Reason": "None", "Restarts": "0", "NodeList": "n[1-2]",
            "RunTime": "01:02:03", "ExitCode": "0:0", "StdOut": str(run / "slurm" / f"{job_id}.out"),
            "Comment": f"privtune:{run}", **fields}


def agent_summary(*, when: float, host: str, rank: int, local_rank: int, exitcode: int, signal: str = "") -> str:
    """torchrun's ChildFailedError summary as torch.distributed.elastic prints it."""
    stamp = datetime.fromtimestamp(when).isoformat(sep="_")
    return f"""torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
privtune FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : {stamp}
  host      : {host}
  rank      : {rank} (local_rank: {local_rank})
  exitcode  : {exitcode} (pid: 4242) {signal}
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def rank_log(run: Path, job: str, node: int, local_rank: int, stderr: str, launch: str = "4312_ab12") -> Path:
    folder = run / "slurm" / "ranks" / job / f"node{node}" / launch / "attempt_0" / str(local_rank)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stdout.log").write_text("")
    (folder / "stderr.log").write_text(stderr)
    return folder.parent.parent


TRACEBACK = """Traceback (most recent call last):
  File "/x/privtune/trainers/recipe.py", line 200, in train
    stats = self._dp_step()
            ^^^^^^^^^^^^^^^
ValueError: first failure

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/x/privtune/trainers/dp/step.py", line 90, in run
    total.add_(grad)
RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB
[rank3]:[W1 12:00:00 ProcessGroupNCCL.cpp:1] destroy_process_group() was not called
"""


# ----------------------------------------------------------------------------------------------------------------


def test_a_finished_run_reports_the_models_steps_and_the_ledgers_epsilon(finished):
    status = gather(str(finished))
    card = json.loads((finished / "model" / "privtune.json").read_text())
    train = status["train"]
    assert status["stages"] == {"data": "done", "model": "done", "eval": "done"}
    assert status["eval_metrics"] == str(finished / "eval" / "metrics.json")
    assert train["step"] == train["total"] == card["steps"] == train_log(finished)[-1]["step"] >= 4
    guarantee = card["guarantee"]
    budget = compose_ledgers([finished], delta=guarantee["delta"], accountants=(guarantee["accountant"],))
    assert train["epsilon"] == budget["epsilon"] and train["delta"] == guarantee["delta"]
    assert train["epsilon_from"] == "ledger.json"
    assert train["epsilon"] == pytest.approx(train_log(finished)[-1]["epsilon"], rel=1e-3)
    assert train["last_checkpoint_step"] == card["steps"] - card["steps"] % 2
    assert status["job"] is None  # never submitted to Slurm: nothing asked of it
    text = render(status)
    assert f"step {card['steps']} / {card['steps']}" in text and "data ✓  model ✓  eval ✓" in text
    assert "no Slurm job recorded" in text


def test_a_run_in_progress_reports_the_train_log_and_the_newest_complete_checkpoint(finished, in_progress):
    status = gather(str(in_progress))
    train, last = status["train"], train_log(in_progress)[-1]
    assert status["stages"] == {"data": "done", "model": "started", "eval": None}
    # The planned total, computed from the config and the ledger's N, is the count the trainer reached.
    assert train["total"] == json.loads((finished / "model" / "privtune.json").read_text())["steps"]
    assert "ledger.json" in train["total_from"]
    assert train["step"] == last["step"] == train["total"] - 1
    assert (train["epsilon"], train["delta"], train["epsilon_from"]) == (last["epsilon"], last["delta"], "train log")
    partial = [p.name for p in (in_progress / "checkpoints").glob(".step-*.partial")]
    assert partial and int(partial[0][len(".step-"):-len(".partial")]) > train["last_checkpoint_step"]
    assert train["last_checkpoint"] == str(in_progress / "checkpoints" / f"step-{train['last_checkpoint_step']}")
    assert (in_progress / "checkpoints" / f"step-{train['last_checkpoint_step']}" / "COMPLETED").exists()
    assert f"last checkpoint step-{train['last_checkpoint_step']}" in render(status)

    (in_progress / "ledger.json").unlink()  # before training starts there is no ledger: N from the prepared data
    assert gather(str(in_progress))["train"]["total"] == train["total"]


def test_a_running_job_shows_its_state_last_log_line_and_the_failed_rank(in_progress, fake_slurm):
    run = in_progress
    submit(run, "4310")  # an older submission: not the one reported
    submit(run, "4312")
    (run / "slurm" / "4312.out").write_text("privtune: job 4312 (restart 1) on n[1-2]\n"
                                            "train 40%|████      | 2/5\rtrain 60%|██████    | 3/5\r\n\n")
    fake_slurm["records"]["4312"] = [record("4312", run, Restarts="1")]
    rank_log(run, "4312", 0, 0, "progress\n")
    rank_log(run, "4312", 0, 1, "privtune: error: data file went away: restore it.\n")
    launch = rank_log(run, "4312", 1, 1, TRACEBACK)
    rank_log(run, "4312", 1, 0, "")
    started = launch.stat().st_mtime
    # node 1's task log: the failure summary of the run before the requeue (must be ignored), then this one's
    (run / "slurm" / "4312.node1.out").write_text(
        agent_summary(when=started - 600, host="n2", rank=2, local_rank=0, exitcode=138)
        + "[1]:some tee'd line\n"
        + agent_summary(when=started + 5, host="n2", rank=3, local_rank=1, exitcode=1))

    status = gather(str(run))
    job = status["job"]
    assert (job["job_id"], job["source"], job["state"], job["restarts"], job["nodes"], job["run_time"]) == \
        ("4312", "slurm", "RUNNING", 1, "n[1-2]", "01:02:03")
    assert job["last_log_line"] == "train 60%|██████    | 3/5"
    assert job["ranks"] == [
        {"job_id": "4312", "rank": 3, "local_rank": 1, "node": 1, "host": "n2", "exit_code": 1,
         "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"},
        {"job_id": "4312", "rank": None, "local_rank": 1, "node": 0, "host": "n1", "exit_code": None,
         "error": "privtune: error: data file went away: restore it."},
    ]
    lines = render(status).splitlines()
    assert "job     4312 (train) RUNNING on n[1-2] for 01:02:03, restarts 1" in lines
    assert "ranks   rank 3 (node n2): RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in lines
    assert "ranks   local rank 1 (node n1): privtune: error: data file went away: restore it." in lines
    assert "log     train 60%|██████    | 3/5" in lines

    assert gather("4312") == status  # the job id finds its run through Slurm's Comment=privtune:RUN_DIR


def test_a_killed_rank_shows_its_signal_from_the_agent_summary(in_progress, fake_slurm):
    run = in_progress
    submit(run, "4400")
    fake_slurm["records"]["4400"] = [record("4400", run, JobState="FAILED", ExitCode="9:0", RunTime="00:10:00")]
    launch = rank_log(run, "4400", 0, 0, "loading...\n", launch="4400_x")
    (run / "slurm" / "4400.node0.out").write_text(
        agent_summary(when=launch.stat().st_mtime + 3, host="n1", rank=0, local_rank=0, exitcode=-9,
                      signal="(SIGKILL)"))
    job = gather(str(run))["job"]
    assert job["ranks"] == [{"job_id": "4400", "rank": 0, "local_rank": 0, "node": 0, "host": "n1",
                             "exit_code": -9, "error": "exit code -9 (SIGKILL)"}]
    assert "job     4400 (train) FAILED on n[1-2] after 00:10:00, exit code 9:0, restarts 0" in render(
        gather(str(run))).splitlines()


def test_the_exit_record_speaks_once_slurm_forgot_the_job(in_progress, fake_slurm, monkeypatch):
    run = in_progress
    submit(run, "4312")
    write_jsonl(run / "slurm" / "exits.jsonl", [
        {"job_id": "4312", "exit_code": 138, "restart": 0, "ended": 1700000000, "requeued": True},
        {"job_id": "4999", "exit_code": 1, "restart": 0, "ended": 1700000100, "requeued": False},
        {"job_id": "4312", "exit_code": 0, "restart": 1, "ended": 1700000500, "requeued": False},
    ])
    job = gather(str(run))["job"]  # fake_slurm knows no job: the controller forgot it after MinJobAge
    assert (job["source"], job["state"], job["exit_code"], job["restarts"], job["ended"]) == \
        ("exit record", None, 0, 1, 1700000500)
    assert "exit record" in job["note"] and "no longer knows" in job["note"]
    assert "from the job's exit record" in render(gather(str(run)))

    monkeypatch.chdir(run.parent.parent)  # a forgotten job id is looked for in the runs under ./runs
    assert gather("4312")["run_dir"] == str(run.resolve())

    fake_slurm["unreachable"] = "sbatch not found: this machine has no Slurm client on PATH"
    status = gather(str(run))
    assert status["slurm_unreachable"] == fake_slurm["unreachable"]
    assert status["job"]["source"] == "exit record" and status["job"]["exit_code"] == 0
    assert status["train"]["step"] is not None  # everything from the files is still there
    assert "slurm   not reachable here (sbatch not found" in render(status)


def test_a_sweep_shows_one_line_per_task(finished, in_progress, fake_slurm, tmp_path):
    home = tmp_path / "runs" / ".sweeps" / "sw"
    home.mkdir(parents=True)
    (home / "runs.json").write_text(json.dumps([{"task": 0, "name": "st-done", "run_dir": str(finished)},
                                                {"task": 1, "name": "st-busy", "run_dir": str(in_progress)},
                                                {"task": 2, "name": "st-next", "run_dir": str(in_progress)}]))
    (home / "jobs.json").write_text(json.dumps({"array": "700", "report": "703", "submitted": time.time()}))
    submit(in_progress, "700_1", kind="sweep-task", array_task=1, log=str(home / "logs" / "700_1.out"))
    comment = f"privtune-sweep:{home}"
    fake_slurm["records"]["700"] = [
        record("700", finished, ArrayJobId="700", ArrayTaskId="2", JobState="PENDING", Reason="JobArrayTaskLimit",
               Comment=comment),
        record("701", in_progress, ArrayJobId="700", ArrayTaskId="1", Comment=comment),
        record("702", finished, ArrayJobId="700", ArrayTaskId="0", JobState="COMPLETED", Comment=comment),
    ]
    fake_slurm["records"]["703"] = [record("703", home, JobState="PENDING", Reason="Dependency", Comment=comment)]
    fake_slurm["records"]["700_1"] = [fake_slurm["records"]["700"][1]]

    status = gather("703")  # the report job's id names the sweep too
    assert status["kind"] == "sweep" and status["array_job_id"] == "700"
    assert status["tasks"] == {"COMPLETED": 1, "RUNNING": 1, "PENDING": 1}
    busy = status["runs"][1]["status"]
    assert busy["job"]["state"] == "RUNNING" and busy["train"]["step"] == train_log(in_progress)[-1]["step"]
    text = render(status)
    assert "array job 700: 1 COMPLETED, 1 PENDING, 1 RUNNING of 3" in text
    assert any("st-busy  RUNNING  step" in line for line in text.splitlines())
    assert gather(str(home)) == status
    assert gather("700_1")["run_dir"] == str(in_progress)


def test_an_array_job_of_a_run_counts_its_tasks(in_progress, fake_slurm):
    run = in_progress
    submit(run, "800", kind="eval-shards", nodes=1, procs_per_node=1, log=str(run / "slurm" / "800_%a.out"))
    (run / "slurm" / "800_1.out").write_text("scoring shard 1/3\n")
    fake_slurm["records"]["800"] = [
        record("800", run, ArrayJobId="800", ArrayTaskId="2", JobState="PENDING", Reason="Resources",
               StdOut=str(run / "slurm" / "800_%a.out")),
        record("801", run, ArrayJobId="800", ArrayTaskId="1", StdOut=str(run / "slurm" / "800_1.out")),
        record("802", run, ArrayJobId="800", ArrayTaskId="0", JobState="COMPLETED",
               StdOut=str(run / "slurm" / "800_0.out")),
    ]
    job = gather(str(run))["job"]
    assert job["tasks"] == {"PENDING": 1, "RUNNING": 1, "COMPLETED": 1} and job["state"] is None
    assert job["last_log_line"] == "scoring shard 1/3"
    assert "job     800 (eval-shards) array: 1 COMPLETED, 1 PENDING, 1 RUNNING of 3" in render(gather(str(run)))

    fake_slurm["records"].clear()  # forgotten: the tasks' exit records
    write_jsonl(run / "slurm" / "exits.jsonl", [
        {"job_id": f"800_{i}", "exit_code": code, "restart": 0, "ended": 1700000000 + i, "requeued": False}
        for i, code in enumerate([0, 0, 3])])
    job = gather(str(run))["job"]
    assert job["source"] == "exit record" and job["tasks"] == {"ended (exit 0)": 2, "ended (exit 3)": 1}


@pytest.mark.parametrize("target", ["no/such/run", "4o12", "12_"])
def test_a_target_that_is_neither_a_run_dir_nor_a_job_id_is_a_user_error(target, fake_slurm):
    with pytest.raises(UserError) as err:
        gather(target)
    assert "\n" not in str(err.value) and target in str(err.value)


def test_a_directory_that_is_not_a_run_and_an_unknown_job_are_user_errors(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="neither a run dir"):
        gather(str(tmp_path))
    with pytest.raises(UserError, match="Slurm does not know job 999 and no run under runs/ records it"):
        gather("999")
    fake_slurm["unreachable"] = "scontrol not found"
    with pytest.raises(UserError, match=r"Slurm is not reachable here \(scontrol not found\)"):
        gather("999")
    fake_slurm["unreachable"] = None
    fake_slurm["records"]["998"] = [{"JobId": "998", "JobState": "RUNNING", "Comment": "(null)"}]
    with pytest.raises(UserError, match="not submitted by privtune"):
        gather("998")


def test_status_command_prints_text_or_hands_the_dict_to_print_json(finished, capsys):
    assert status_command(str(finished), as_json=False, print_json=None) == 0
    assert capsys.readouterr().out.startswith(f"run     {finished}")
    printed = []
    assert status_command(str(finished), as_json=True, print_json=printed.append) == 0
    assert printed == [gather(str(finished))] and json.loads(json.dumps(printed[0])) == printed[0]


def test_rank_dirs_of_an_earlier_launch_are_not_read(in_progress, fake_slurm):
    run = in_progress
    submit(run, "4500")
    old = rank_log(run, "4500", 0, 0, TRACEBACK, launch="4500_old")
    os.utime(old, (time.time() - 900, time.time() - 900))  # the launch before a requeue
    rank_log(run, "4500", 0, 0, "resumed from step-2\n", launch="4500_new")
    assert gather(str(run))["job"]["ranks"] == []


@pytest.mark.slurm
def test_a_real_job_is_found_by_its_id_and_reported_until_it_completes(slurm_cluster, in_progress, tmp_path):
    (in_progress / "slurm").mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1\n"
                      f"#SBATCH --output={in_progress}/slurm/%j.out\n#SBATCH --comment=privtune:{in_progress}\n"
                      'echo "privtune: hello from $SLURM_JOB_ID"\nsleep 1\n')
    job_id = slurm.submit(script)
    submit(in_progress, job_id, nodes=1, procs_per_node=1)
    seen = gather(job_id)  # found through the job's Comment
    assert seen["run_dir"] == str(in_progress) and seen["job"]["source"] == "slurm"
    assert seen["job"]["state"] in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED")
    slurm.wait_for(job_id, timeout=120)
    job = gather(str(in_progress))["job"]
    assert (job["state"], job["exit_code"]) == ("COMPLETED", "0:0")
    assert job["last_log_line"] == f"privtune: hello from {job_id}"


def test_the_cli_prints_the_status_and_exits_2_on_a_bad_target(finished, capsys):
    assert main(["status", str(finished), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == gather(str(finished))
    assert main(["status", "no/such/run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["privtune: error: no/such/run is not a directory or a Slurm job id: pass a run dir such as "
                   "runs/NAME, or a job id such as 4312."]
