"""Thin wrappers over Slurm's own commands: what privtune's submit and status code call.

Owns: ``available`` (is there a Slurm client and a controller that answers), ``submit`` (``sbatch --parsable``),
``job_records`` / ``job_state`` / ``wait_for`` (``scontrol show job -o``, parsed), ``requeue``, ``cancel``,
``node_address`` and ``hostnames``. Every command runs in this process's environment (``SLURM_CONF`` there picks
the cluster, e.g. a local one from ``privtune.cluster.local``) with a timeout. A failure the user can act on
(no ``sbatch``, a refused job, a controller that does not answer) is a one-line ``UserError``; nothing here
parses ``sacct`` (a cluster may have no accounting storage), so a job is known for ``MinJobAge`` after it ends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from privtune.errors import UserError

FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE")
# For an array, wait_for reports its worst task: later in this tuple is worse; other states rank below all.
_SEVERITY = ("COMPLETED", "PREEMPTED", "CANCELLED", "DEADLINE", "TIMEOUT", "OUT_OF_MEMORY", "FAILED", "BOOT_FAIL",
             "NODE_FAIL")
_NO_SLURM_FIX = ("run privtune submit on a Slurm login node "
                 "(or start a local cluster: python -m privtune.cluster.local start DIR)")
_UNREACHABLE = ("Could not establish a configuration source", "Unable to process configuration file",
                "Unable to contact slurm controller", "Connection refused", "Socket timed out")
_REACH_FIX = "check that the controller answers (scontrol ping) and that SLURM_CONF names the cluster's slurm.conf"
_TIMEOUT = 60.0  # seconds for one Slurm command; a healthy controller answers in well under one
_POLL = 0.2
# A field of `scontrol show ... -o` starts after a space with `Key=`; Slurm's keys start with a capital letter
# (JobId, S:C:T, Socks/Node, MCS_label), so lower-case words with `=` inside free text (Comment=, Command=,
# WorkDir=, JobName=) do not split a value. A key seen twice in a record is taken as part of the previous value.
_FIELD = re.compile(r"(?:^|\s)([A-Z][A-Za-z0-9_:/]*)=")


def _config_problem(command: str) -> str | None:
    if shutil.which(command) is None:
        return f"{command} not found: this machine has no Slurm client on PATH"
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # Slurm's commands would retry reading it for a minute
        return f"SLURM_CONF names {conf}, which does not exist"
    return None


def _run(args: Sequence[str], *, timeout: float = _TIMEOUT) -> subprocess.CompletedProcess[str]:
    if problem := _config_problem(args[0]):
        raise UserError(problem, _NO_SLURM_FIX if "not found" in problem else _REACH_FIX)
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(args)}` did not answer within {timeout:.0f} s", _REACH_FIX) from None


def _message(result: subprocess.CompletedProcess[str]) -> str:
    """Slurm's own reason for a failure, on one line: its fatal line, else its first error line, else its first."""
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    fatal = [line for line in lines if "fatal:" in line]
    errors = [line for line in lines if "error" in line.lower()]
    return (fatal or errors or lines or [f"exit code {result.returncode}"])[0]


def _unreachable(result: subprocess.CompletedProcess[str]) -> bool:
    """The command found no cluster (no slurm.conf, a controller that is down), as opposed to refusing a job."""
    text = result.stderr + result.stdout
    return any(marker in text for marker in _UNREACHABLE)


def _check(args: Sequence[str], fix: str) -> str:
    result = _run(args)
    if result.returncode != 0:
        raise UserError(f"`{' '.join(args)}` failed: {_message(result)}", fix)
    return result.stdout


def available() -> str | None:
    """None when ``sbatch`` and ``scontrol`` exist and the controller answers, else a one-line reason."""
    for command in ("sbatch", "scontrol"):
        if problem := _config_problem(command):
            return problem
    try:
        result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"the Slurm controller did not answer `scontrol ping` within {_TIMEOUT:.0f} s"
    if result.returncode != 0 or " is UP" not in result.stdout:
        return f"the Slurm controller does not answer: {_message(result)}"
    return None


def submit(script: Path, *, dependency: str | None = None, extra_args: Sequence[str] = ()) -> str:
    """``sbatch --parsable [--dependency=DEP] *extra_args script``; the new job's id."""
    args = ["sbatch", "--parsable"]
    if dependency:
        args.append(f"--dependency={dependency}")
    args += [*extra_args, str(script)]
    result = _run(args)
    if result.returncode != 0 and _unreachable(result):
        raise UserError(f"sbatch cannot reach a Slurm controller: {_message(result)}", _REACH_FIX)
    if result.returncode != 0:
        raise UserError(f"sbatch refused {script}: {_message(result)}",
                        "fix the job's Slurm options (the cluster: section of the config or the flags of "
                        "privtune submit; see sinfo for partitions)")
    words = result.stdout.split()
    job_id = words[-1].split(";")[0] if words else ""  # "123", or "123;cluster" on a federation
    if not job_id.isdigit():
        raise UserError(f"sbatch printed no job id for {script}: {result.stdout.strip()!r}",
                        "check the Slurm client's version and configuration (sbatch --version)")
    return job_id


def parse_record(line: str) -> dict[str, str]:
    """One line of ``scontrol show job|node -o`` as {field: value}; values keep their inner spaces."""
    matches = list(_FIELD.finditer(line))
    record: dict[str, str] = {}
    current = None
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        key = match.group(1)
        if current is not None and key in record:  # a key seen before, inside free text: part of the value
            record[current] += line[match.start():end]
        else:
            current = key
            record[key] = line[match.end():end]
    return {key: value.strip() for key, value in record.items()}


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o JOB``: one dict per job, every task of an array; [] once Slurm forgot the job."""
    result = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if result.returncode != 0:
        if "invalid job id" in (result.stderr + result.stdout).lower():
            return []
        raise UserError(f"`scontrol show job {job_id}` failed: {_message(result)}", _REACH_FIX)
    return [parse_record(line) for line in result.stdout.splitlines() if line.strip()]


def job_state(job_id: str) -> str | None:
    """The JobState of one job (None when Slurm does not know it)."""
    records = job_records(job_id)
    return records[0].get("JobState") if records else None


def _worst(states: list[str]) -> str:
    return max(states, key=lambda s: _SEVERITY.index(s) if s in _SEVERITY else -1)


def wait_for(job_id: str, *, states: Collection[str] = FINISHED_STATES, timeout: float) -> str:
    """Poll until every record of the job (each array task) is in one of ``states``; that state (an array's
    worst). Raises ``TimeoutError`` with the last records after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        records = job_records(job_id)
        if not records:
            raise UserError(f"Slurm does not know job {job_id}",
                            "it ended more than MinJobAge ago or the id is wrong (squeue shows the live ones)")
        current = [r.get("JobState", "") for r in records]
        if all(state in states for state in current):
            return _worst(current)
        if time.monotonic() > deadline:
            summary = "; ".join(f"{r.get('JobId')} {r.get('JobState')} Reason={r.get('Reason')}" for r in records)
            raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {summary}")
        time.sleep(_POLL)


def requeue(job_id: str) -> None:
    """``scontrol requeue JOB``: a running job is stopped and queued again (SLURM_RESTART_COUNT goes up)."""
    _check(["scontrol", "requeue", str(job_id)], "only batch jobs can be requeued, and only where the job allows it (sbatch --requeue)")


def cancel(job_id: str, *, signal: str | None = None, full: bool = False, batch: bool = False) -> None:
    """``scancel [--signal=SIG] [--full | --batch] JOB``: with a signal, the job is signalled rather than cancelled;
    ``batch``: the batch shell alone (what ``--signal=B:SIG@T`` delivers), ``full``: the shell and every step."""
    args = ["scancel"]
    if signal:
        args.append(f"--signal={signal}")
    if full:
        args.append("--full")
    elif batch:
        args.append("--batch")
    _check([*args, str(job_id)], "check the job id with squeue")


def node_address(node: str) -> str:
    """The address to reach ``node`` at (its NodeAddr): node names need not resolve."""
    out = _check(["scontrol", "show", "node", "-o", node], "check the node name with sinfo -N")
    address = parse_record(out.splitlines()[0]).get("NodeAddr") if out.strip() else None
    if not address:
        raise UserError(f"Slurm reports no NodeAddr for node {node}", "check the node name with sinfo -N")
    return address


def hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST``: n[1-3] -> [n1, n2, n3]."""
    out = _check(["scontrol", "show", "hostnames", nodelist], "pass a Slurm node list such as n[1-2]")
    return [line.strip() for line in out.splitlines() if line.strip()]
