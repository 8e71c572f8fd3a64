"""Every command in README.md works when pasted in order into a fresh clone (after `make install`).

The ```bash blocks are run top to bottom, one command a line, in a copy of the repository that shares this
checkout's .venv (what `make install` made). The commands that are not run here, and why:
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_ON_A_CLUSTER = ("needs a Slurm cluster with GPUs and the Llama-2 weights; the same commands on tiny models run "
                 "against a real local Slurm in tests/cluster/test_slurm_jobs.py")
NOT_RUN = {
    "make demo": "the quickstart grid, ~10 min: its single-method runs are in the README and run here",
    "make test": "this test runs inside it",
    "make test-fast": "this test runs inside `make test`",
    "torchrun --nproc_per_node 2 -m privtune run configs/quickstart.yaml grid=null train.method=dp-lora "
    "name=dp3-fsdp2 privacy.target_epsilon=3 performance.parallel=fsdp2":
        "~6 min on 2 cores; the same recipe under fsdp2 on 2 processes is tests/trainers/test_recipe_parallel.py",
    "privtune submit configs/cluster/llama-2-7b-dp-lora.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time "
    "24:00:00 --requeue": _ON_A_CLUSTER,
    "privtune status runs/cluster-llama-2-7b-dp-lora": _ON_A_CLUSTER,
    "privtune sweep configs/paper_a/cpu.yaml --slurm --throttle 4 --partition cpu --time 2:00:00": _ON_A_CLUSTER,
    "privtune eval runs/cluster-llama-2-7b-dp-lora --slurm --shards 8 --gpus-per-node 1": _ON_A_CLUSTER,
    "privtune sweep configs/paper_a/cpu.yaml": "43 min; sweeps are tested on tiny models (tests/launch/test_sweep.py, "
                                               "test_torchrun.py) and this config by tests/launch/test_config.py",
}
__doc__ += "".join(f"\n- ``{cmd}``: {why}" for cmd, why in NOT_RUN.items())


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, in order (a trailing backslash continues a line)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            line = pending + line
            if line.endswith("\\"):
                pending = line[:-1]
                continue
            pending = ""
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def _skipped(command: str) -> str | None:
    bare = command.split("  #")[0].strip()
    return NOT_RUN.get(bare)


def _fresh_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_symlink():  # privtune/<stage> -> ../<stage>, as a clone has it
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to(os.readlink(src))
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(REPO / ".venv")


def test_readme_parser_reads_every_block_in_order():
    commands = readme_commands((REPO / "README.md").read_text())
    assert commands[:2] == ["make demo   # creates .venv, installs privtune and the embedded model, runs: privtune "
                            "run configs/quickstart.yaml", "make test   # the same set-up, then the whole test suite"]
    assert any(c.startswith("torchrun") for c in commands) and all("CONFIG" not in c for c in commands)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(2400)  # 15 commands, some on the embedded model: ~6 min alone on 2 cores, far more under load
def test_readme_commands_work_when_pasted_in_order(tmp_path):
    if not (REPO / ".venv" / "bin" / "privtune").exists():
        pytest.fail("no .venv with privtune: run `make install` first (make test does)")
    clone = tmp_path / "clone"
    _fresh_copy(clone)
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("VIRTUAL_ENV", None)
    ran = []
    for command in readme_commands((REPO / "README.md").read_text()):
        if _skipped(command):
            continue
        started = time.perf_counter()
        proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=900, stdin=subprocess.DEVNULL)
        ran.append((command, round(time.perf_counter() - started, 1)))
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
    assert len(ran) >= 12, ran
    print("\n".join(f"{seconds:7.1f} s  {command}" for command, seconds in ran))
