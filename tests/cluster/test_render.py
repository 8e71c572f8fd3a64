"""Rendered sbatch scripts, pinned line by line (golden files), and every bad flag refused with one line.

The scripts come from the real commands (``privtune submit|sweep|eval ... --dry-run``), with this test's folder and
interpreter replaced by ``/WORK`` and ``/PYTHON`` so the files do not depend on the machine. After a deliberate
change, regenerate them with ``PRIVTUNE_UPDATE_GOLDEN=1 pytest tests/cluster/test_render.py`` and read the diff.
Each golden script is also checked by ``bash -n`` (it parses) and for what the job depends on: no ``#SBATCH``
line holds a shell variable, rank variables appear only inside the node task, one task per node.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from privtune.launch.cli import main

GOLDEN = Path(__file__).with_name("golden")
BASE = """name: t
model: {name: tiny-llama}
data: {source: customersim, num_examples: 24, max_length: 48}
train: {method: dp-lora, max_steps: 3, batch_size: 4}
privacy: {noise_multiplier: 1.0, reproducible: true}
performance: {parallel: ddp}
"""
CLUSTER = """cluster:
  partition: gpu
  account: llm-privacy
  setup: ["module load cuda/12.4", "source /shared/venvs/privtune/bin/activate"]
  env: {NCCL_DEBUG: WARN}
"""
GRID = "grid:\n  train.method: [lora, dp-lora]\n  seed: [0, 1]\n"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _render(capsys, workdir: Path, *argv) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.replace(str(workdir), "/WORK").replace(sys.executable, "/PYTHON")


def _check_golden(name: str, text: str) -> None:
    text = re.sub(r"privtune \d+\.\d+\.\d+\S*:", "privtune VERSION:", text)
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("PRIVTUNE_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with PRIVTUNE_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}: the rendered script changed (see the module docstring)"
    for script in text.split("#!/bin/bash")[1:]:
        script = "#!/bin/bash" + script
        parsed = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert parsed.returncode == 0, parsed.stderr
        directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
        assert directives and not any("$" in line for line in directives)
        assert "#SBATCH --ntasks-per-node=1" in directives
        body = script.split("# One task per node", 1)
        assert "SLURM_NODEID" not in body[0] and "SLURM_PROCID" not in script  # rank variables: node task only


def _config(workdir: Path, extra: str = "") -> str:
    path = workdir / "c.yaml"
    path.write_text(BASE + f"output_dir: {workdir}/runs\n" + extra)
    return str(path)


def test_one_node_job(workdir, capsys):
    text = _render(capsys, workdir, "submit", _config(workdir), "--nodes", "1", "--procs-per-node", "2",
                   "--dry-run")
    _check_golden("one_node", text)
    assert "--standalone" in text and "--rdzv-endpoint" not in text
    assert not (workdir / "runs").exists()  # --dry-run writes nothing


def test_two_node_gpu_job_with_cluster_section(workdir, capsys):
    text = _render(capsys, workdir, "submit", _config(workdir, CLUSTER), "--nodes", "2", "--gpus-per-node", "8",
                   "--time", "24:00:00", "--mem", "480G", "--exclusive", "--dry-run")
    _check_golden("two_nodes", text)
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=llm-privacy", "#SBATCH --exclusive",
                 "module load cuda/12.4", "export NCCL_DEBUG=WARN", "srun --nodes=2 --ntasks-per-node=1"):
        assert line in text
    assert '--rdzv-endpoint="$RDZV"' in text and "--nproc-per-node=8" in text


def test_requeue_job(workdir, capsys):
    text = _render(capsys, workdir, "submit", _config(workdir), "--nodes", "2", "--requeue",
                   "--warning-seconds", "300", "--dry-run")
    _check_golden("requeue", text)
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@300" in text
    assert 'scancel --signal=USR1 "$SLURM_JOB_ID"' in text and 'scontrol requeue "$JOB"' in text


def test_sweep_array_with_throttle_and_report_dependency(workdir, capsys):
    text = _render(capsys, workdir, "sweep", _config(workdir, GRID), "--slurm", "--throttle", "2", "--dry-run")
    _check_golden("sweep_array", text)
    assert "#SBATCH --array=0-3%2" in text and "#SBATCH --dependency=afterany:ARRAY_JOB_ID" in text
    assert text.count("#!/bin/bash") == 2  # the array, then the report job
    assert "--skip-unfinished" in text


def test_eval_shards_and_merge(workdir, capsys):
    cfg = _config(workdir, "train: {method: none}\n")
    run_dir = workdir / "runs" / "t"
    (run_dir).mkdir(parents=True)
    from privtune.launch.config import dump_config, load_config

    (run_dir / "config.resolved.yaml").write_text(dump_config(load_config(cfg)))
    text = _render(capsys, workdir, "eval", str(run_dir), "--slurm", "--shards", "4", "--dry-run")
    _check_golden("eval_shards", text)
    words = " ".join(text.replace("\\\n", " ").split())  # continuation lines joined
    assert "#SBATCH --array=0-3" in text and '--shard "$SLURM_ARRAY_TASK_ID/4"' in words


def test_sbatch_values_with_shell_syntax_are_refused():
    from privtune.cluster.render import check_directives
    from privtune.errors import UserError

    for line in ("--output=$HOME/x.out", "--comment=a b", "--job-name=`id`", "--chdir=/a'b"):
        with pytest.raises(UserError, match="Slurm does not expand or quote"):
            check_directives([line])
    check_directives(["--output=/runs/x/slurm/%j.out", "--array=0-3%2", "--dependency=afterany:12"])


BAD_FLAGS = {
    "nodes zero": (["--nodes", "0"], "--nodes 0"),
    "nodes not a number": (["--nodes", "two"], "invalid int value"),
    "negative gpus": (["--gpus-per-node", "-1"], "--gpus-per-node -1"),
    "procs differ from gpus": (["--gpus-per-node", "4", "--procs-per-node", "2"], "one process per GPU"),
    "bad time": (["--time", "1 day"], "not a Slurm time limit"),
    "bad mem": (["--mem", "lots"], "not a Slurm memory size"),
    "partition with a variable": (["--partition", "$PART"], "not a valid partition"),
    "account with a space": (["--account", "a b"], "not a valid account"),
    "zero cpus": (["--cpus-per-task", "0"], "--cpus-per-task 0"),
    "zero warning": (["--requeue", "--warning-seconds", "0"], "--warning-seconds 0"),
    "bad gpu memory": (["--gpu-memory", "0"], "--gpu-memory 0"),
    "unknown flag": (["--nodez", "2"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_every_bad_flag_exits_2_with_one_line(workdir, capsys, case):
    flags, needle = BAD_FLAGS[case]
    code = main(["submit", _config(workdir), *flags, "--dry-run"])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("privtune: error: "), err
    assert needle in lines[0] and "Traceback" not in err
    assert not (workdir / "runs").exists()


def test_bad_cluster_section_and_sweep_flags_exit_2(workdir, capsys):
    for extra, argv, needle in (
        ("cluster: {time: soon}\n", ["submit"], "not a Slurm time limit"),
        ("cluster: {sbatch: ['--output=$HOME/x']}\n", ["submit"], "not a literal sbatch option"),
        (GRID, ["sweep", "--slurm", "--throttle", "0"], "--throttle 0"),
        (GRID, ["sweep", "--throttle", "2"], "without --slurm"),
    ):
        cfg = _config(workdir, extra)
        command = argv[0]
        code = main([command, cfg, *argv[1:], "--dry-run"] if command == "submit" else [command, cfg, *argv[1:]])
        _, err = capsys.readouterr()
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_submit_json_dry_run(workdir, capsys):
    code = main(["submit", _config(workdir), "--nodes", "2", "--dry-run", "--json"])
    out, _ = capsys.readouterr()
    doc = json.loads(out)
    assert code == 0 and doc["dry_run"] and doc["job_id"] is None and doc["rendered"].startswith("#!/bin/bash")
