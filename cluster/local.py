"""A throwaway Slurm cluster under one folder: for privtune's tests, and for users to try ``privtune submit``.

Owns: ``ensure_installed`` (Debian's slurmctld, slurmd, slurm-client and munge, installed with apt-get when
root), ``LocalSlurm`` (under its folder: a munge key, ``slurm.conf``, a private munged, one slurmctld and one
slurmd per node, all on 127.0.0.1 with free ports, their PIDs recorded in ``pids.json``), ``cannot_start_reason``
and a tiny CLI: ``python -m privtune.cluster.local start DIR [--nodes N]`` / ``stop DIR``.

Never: kills a process by name (only the PIDs it recorded, checked against their start time so a reused PID is
left alone), or reads or writes system-wide Slurm or munge configuration: every file lives under the folder and
clients find the cluster through ``SLURM_CONF`` (``LocalSlurm.env``). Needs root on Linux: every daemon runs as
root (slurmd launches jobs as the user who submitted them).

Layout under the folder: ``slurm.conf``, ``pids.json``, ``munge/`` (key, socket, munged's log), ``log/``
(slurmctld.log, slurmd-<node>.log), ``state/`` (slurmctld's saved state), ``run/`` (PID files) and ``<node>/``
(that slurmd's spool: job scripts and one Unix socket per job step, whose path may not exceed 107 characters).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from privtune.atomic import atomic_write_json
from privtune.progress import info

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Each command the harness runs, and the Debian package that ships it.
COMMANDS = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}
PARTITION = "debug"
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_SOCKET_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


class HarnessUnavailable(Exception):
    """The local cluster cannot run here; ``str(err)`` is the reason on one line."""


def _which(command: str) -> str | None:
    return shutil.which(command, path=_SEARCH_PATH)


def _missing() -> list[str]:
    return [command for command in COMMANDS if _which(command) is None]


def cannot_start_reason() -> str | None:
    """Why a local cluster cannot start on this machine (cheap: no daemon is started); None if it probably can."""
    if not sys.platform.startswith("linux"):
        return f"the local Slurm harness runs on Linux only (this is {sys.platform})"
    missing = _missing()
    if os.geteuid() != 0:
        if missing:
            return (f"{missing[0]} is not installed and this process is not root: "
                    f"apt-get install {' '.join(PACKAGES)}")
        return "the local Slurm harness needs root (its daemons run as root)"
    if missing and _which("apt-get") is None:
        return f"{missing[0]} is not installed and there is no apt-get: install Slurm and munge"
    return None


def ensure_installed() -> None:
    """Install slurmctld, slurmd, slurm-client and munge with apt-get when a command is missing (root only)."""
    missing = _missing()
    if not missing:
        return
    reason = cannot_start_reason()
    if reason is not None:
        raise HarnessUnavailable(reason)
    info(f"installing Slurm for a local cluster ({', '.join(missing)} missing): "
         f"apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=900)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0 or _missing():
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise HarnessUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                                 f"{lines[-1] if lines else f'exit code {result.returncode}'}")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live process (field 22 of /proc/PID/stat); None once it exited.

    A zombie counts as exited: the daemons are reparented to a PID 1 that may never reap them.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(record: dict) -> bool:
    return _start_time(record["pid"]) == record["start"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise HarnessUnavailable("cannot read MemTotal from /proc/meminfo")


class LocalSlurm:
    """A Slurm cluster of ``nodes`` slurmd daemons on this machine, everything under ``root``.

    ``with LocalSlurm(root) as cluster:`` starts it and stops it; set ``cluster.env`` in a client's environment.
    ``stop()`` also works from another process given the same ``root`` (it reads ``pids.json``).
    """

    START_TIMEOUT = 30.0
    STOP_TIMEOUT = 15.0

    def __init__(self, root: Path, *, nodes: int = 2, cpus_per_node: int = 2, memory_mb: int | None = None):
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("a local cluster needs at least one node and one CPU per node")
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.pids_file = self.root / "pids.json"
        self.cpus_per_node = cpus_per_node
        self.memory_mb = memory_mb
        # One node is named `localhost`; the machine's own host name is something else, so every slurmd is
        # started with `-N <NodeName>` and NodeHostname names the real host.
        self.node_names = ["localhost"] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]
        self._munge = self.root / "munge"

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client (sbatch, srun, scontrol, and jobs they start) needs to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Write the config, start munged, slurmctld and the slurmds; return once every node is idle."""
        if reason := cannot_start_reason():
            raise HarnessUnavailable(reason)
        ensure_installed()
        if any(_alive(r) for r in self._records()):
            raise HarnessUnavailable(f"a local cluster already runs under {self.root}: "
                                     f"python -m privtune.cluster.local stop {self.root}")
        socket_path = self._munge / "munged.sock"
        # slurmd puts one socket per job step in its spool folder, NODE_JOB.STEP (job ids stay below 67108864)
        name = max(self.node_names, key=len)
        longest = self.root / name / f"{name}_67108863.4294967294"
        if len(str(longest)) > _SOCKET_MAX:
            raise HarnessUnavailable(f"the folder path {self.root} is too long for the Unix sockets under it "
                                     f"({len(str(longest))} > {_SOCKET_MAX} characters): choose a shorter one")
        try:
            self._write_files(socket_path)
            self._start_munged(socket_path)
            run = self.root / "run"
            self._daemon("slurmctld", [_which("slurmctld"), "-f", str(self.conf)], run / "slurmctld.pid")
            for node in self.node_names:
                self._daemon(f"slurmd-{node}", [_which("slurmd"), "-f", str(self.conf), "-N", node],
                             run / f"slurmd-{node}.pid")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise

    def _write_files(self, socket_path: Path) -> None:
        for sub in ("log", "state", "run", *self.node_names):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._munge.mkdir(parents=True, exist_ok=True)
        os.chmod(self._munge, 0o755)  # munged refuses a folder that others may write to
        key = self._munge / "munge.key"
        if not key.exists():  # a restart under the same folder keeps its key
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        host = socket.gethostname().split(".")[0]
        controller, *node_ports = _free_ports(1 + len(self.node_names))
        memory = self.memory_mb or _total_memory_mb() // len(self.node_names)
        r = self.root
        lines = [
            "# A throwaway cluster written by privtune.cluster.local: everything lives under this folder.",
            "ClusterName=privtune-local",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={controller}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job is held (Reason=BeginTime) for cred_expire + 1 s, so that its old step credentials
            # expire first. The default is 120 s; 5 is Slurm's minimum: a requeued job runs again ~6 s later.
            f"AuthInfo=socket={socket_path},cred_expire=5",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",  # the nodes may claim more CPUs than this machine has
            "ReturnToService=2",
            # Schedule at once and every second (the default waits for a scheduling pass: arrays took 9 s).
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` for an hour (no accounting)
            "KillWait=30",  # SIGTERM, then SIGKILL 30 s later: time for a checkpoint, as on a real cluster
            "JobRequeue=1",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / '%n'}",  # directly under the folder: step sockets need short paths
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
        ]
        for node, port in zip(self.node_names, node_ports, strict=True):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory={memory} State=UNKNOWN")
        lines.append(f"PartitionName={PARTITION} Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE "
                     "State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munged(self, socket_path: Path) -> None:
        m = self._munge
        for stale in (m / "munged.pid", socket_path):
            stale.unlink(missing_ok=True)
        # munged runs as root, with --force: run as user munge it cannot read a key under a folder whose parents
        # only root may enter (pytest's temporary folders are 0700), and as root it refuses to serve a socket
        # whose path not everyone may traverse unless forced. Every client here is root, so nothing is lost.
        command = [_which("munged"), "--force", f"--key-file={m / 'munge.key'}",
                   f"--socket={socket_path}", f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                   f"--seed-file={m / 'munged.seed'}"]
        self._daemon("munged", command, m / "munged.pid")

    def _daemon(self, name: str, command: list, pid_file: Path) -> None:
        """Run a daemon that forks into the background and writes its PID file; record that PID."""
        pid_file.unlink(missing_ok=True)
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise HarnessUnavailable(f"{name} did not start: {_last_line(result.stderr + result.stdout)}"
                                     f"{self._log_tails()}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            start = _start_time(pid)
            if start is None:
                break
            self._record({"name": name, "pid": pid, "start": start})
            return
        raise HarnessUnavailable(f"{name} exited or wrote no PID file ({pid_file}){self._log_tails()}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            result = self._client(["sinfo", "-h", "-N", "-o", "%N %t"])
            states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
            if all(states.get(node) == "idle" for node in self.node_names):
                return
            time.sleep(0.1)
        seen = ", ".join(f"{n} {s}" for n, s in states.items()) or "no answer"
        raise HarnessUnavailable(f"the nodes were not idle after {self.START_TIMEOUT:.0f} s (sinfo: {seen})"
                                 f"{self._log_tails()}")

    # -- stop ------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, ``scontrol shutdown``, end munged; then SIGTERM/SIGKILL any recorded PID left.

        Idempotent; needs only ``root`` (the PIDs come from ``pids.json``)."""
        records = self._records()
        alive = [r for r in records if _alive(r)]
        if any(r["name"] == "slurmctld" for r in alive):
            with contextlib.suppress(subprocess.TimeoutExpired):  # a hung controller gets signals below
                # slurmd's shutdown leaves running jobs' processes behind: end the jobs first, at once (no
                # KillWait), then the pending ones.
                self._client(["scancel", f"--partition={PARTITION}", "--signal=KILL", "--full"])
                self._client(["scancel", f"--partition={PARTITION}"])
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self._client(["squeue", "-h", "-t", "R,CG,S"]).stdout.strip():
                    time.sleep(0.2)
                self._client(["scontrol", "shutdown"])
        slurm = [r for r in alive if r["name"] != "munged"]
        self._wait_gone(slurm, self.STOP_TIMEOUT)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # munged, and any slurm daemon that ignored the shutdown
            left = [r for r in alive if _alive(r)]
            for record in left:
                with contextlib.suppress(ProcessLookupError):  # it exited since the check
                    os.kill(record["pid"], sig)
            self._wait_gone(left, 5.0)
        if any(_alive(r) for r in alive):
            raise HarnessUnavailable(f"recorded daemons outlived SIGKILL: {[r for r in alive if _alive(r)]}")
        self.pids_file.unlink(missing_ok=True)

    @staticmethod
    def _wait_gone(records: list[dict], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(_alive(r) for r in records) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _client(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, env={**os.environ, **self.env})

    def _records(self) -> list[dict]:
        try:
            return json.loads(self.pids_file.read_text())["processes"]
        except FileNotFoundError:
            return []

    def _record(self, record: dict) -> None:
        records = [r for r in self._records() if r["name"] != record["name"]] + [record]
        atomic_write_json(self.pids_file, {"conf": str(self.conf), "processes": records})

    def _log_tails(self, lines: int = 3) -> str:
        """The last lines of every daemon log, on one line, to explain a failed start."""
        parts = []
        for log in sorted([*(self.root / "log").glob("*.log"), self._munge / "munged.log"]):
            if log.is_file():
                tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
                if tail:
                    parts.append(f"{log.name}: {' / '.join(tail[-lines:])}")
        return f"; last log lines: {' | '.join(parts)}" if parts else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privtune.cluster.local",
                                     description="Start or stop a throwaway Slurm cluster under a folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a cluster and print the SLURM_CONF line to export")
    start.add_argument("dir", type=Path)
    start.add_argument("--nodes", type=int, default=2)
    stop = commands.add_parser("stop", help="stop the cluster running under DIR")
    stop.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = LocalSlurm(args.dir, nodes=args.nodes)
            cluster.start()
            print(f"export SLURM_CONF={shlex.quote(str(cluster.conf))}")
            print(f"# {len(cluster.node_names)} node(s) up; stop with: python -m privtune.cluster.local stop "
                  f"{shlex.quote(str(cluster.root))}", file=sys.stderr)
        else:
            LocalSlurm(args.dir).stop()
    except HarnessUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
