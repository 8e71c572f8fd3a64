"""sbatch scripts for privtune's Slurm jobs, rendered from plain values so that they are right by construction.

Owns: ``SbatchOptions`` (what goes on the ``#SBATCH`` lines), ``NodeLaunch`` (what each node runs) and
``render_script``, which joins them with the fixed body every privtune job shares. Pure: nothing here reads the
cluster or the run dir, so the golden-file tests (tests/cluster/test_render.py) pin every line.

The failures this body avoids, each seen in other tools (../shared/notes/anchors.md):

- every node getting rank 0: the batch shell runs on the first node only, so nothing rank-specific is computed
  there. ``srun`` starts ONE task per node; inside it (``node_task``, exported to the tasks) torchrun reads that
  node's own ``SLURM_NNODES`` and meets the other nodes at a c10d rendezvous, which hands out ranks itself;
- ``#SBATCH`` lines holding shell variables: Slurm never expands them; ``render_script`` refuses any ``$``,
  backtick, quote or whitespace in a value (``check_directives``) instead of letting Slurm read it verbatim;
- launchers that need pdsh or ssh, or run on the head node only: ``srun`` alone starts the node tasks;
- a rendezvous on a name that does not resolve: the head node's ``NodeAddr`` from ``scontrol show node``;
- preemption that loses work or counts steps twice: with ``requeue``, Slurm's warning signal (``B:USR1@S``) reaches
  this shell, which passes USR1 to every task (``scancel --signal=USR1``); each task hands it to its privtune
  processes (torchrun itself ignores it: its default action would kill the launcher under its workers), which
  checkpoint at the end of the current step — collectively, with the ledger — and exit; then the job requeues
  itself and the requeued job's ``privtune run`` resumes from the newest complete checkpoint. A job killed
  without warning (``scontrol requeue``, a node failure) resumes from the last complete checkpoint: a partial one
  is never read (trainers/checkpoint.py).

Every end of a batch script appends one line to ``RUN_DIR/slurm/exits.jsonl`` (job id, exit code, restart count,
requeued): Slurm forgets finished jobs, ``privtune status`` does not. Logs: the batch shell's in ``output``, each
node task's in ``RUN_DIR/slurm/<job>.node<N>.out``, each rank's under ``RUN_DIR/slurm/ranks/<job>/node<N>/``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from privtune.errors import UserError

# A port from the job id; a requeued job (same id) moves on by its restart count, as the last attempt's
# rendezvous port may still be in TIME_WAIT on the head node.
PORT_BASE, PORT_SPAN = 20000, 20000
_UNSAFE = re.compile(r"[$`'\"\\\s]")


@dataclass(frozen=True)
class SbatchOptions:
    """The ``#SBATCH`` lines of one job. Values are literal: no shell ever expands them."""

    job_name: str
    nodes: int
    output: str  # Slurm's own patterns (%j, %A, %a) are fine; shell variables are not
    chdir: str
    comment: str
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    mem: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    requeue: bool = False
    warning_seconds: int | None = None  # with requeue: Slurm signals USR1 this long before the time limit
    array: str | None = None  # e.g. "0-2%2"
    dependency: str | None = None  # e.g. "afterany:1234"
    extra: tuple[str, ...] = ()

    def directives(self) -> list[str]:
        pairs = [("job-name", self.job_name), ("nodes", self.nodes), ("ntasks-per-node", 1)]
        if self.gpus_per_node:
            pairs.append(("gpus-per-node", self.gpus_per_node))
        for key, value in (("cpus-per-task", self.cpus_per_task), ("partition", self.partition),
                           ("account", self.account), ("qos", self.qos), ("time", self.time), ("mem", self.mem),
                           ("constraint", self.constraint), ("array", self.array),
                           ("dependency", self.dependency)):
            if value is not None:
                pairs.append((key, value))
        pairs += [("chdir", self.chdir), ("output", self.output), ("open-mode", "append"),
                  ("comment", self.comment)]
        lines = [f"--{key}={value}" for key, value in pairs]
        if self.exclusive:
            lines.append("--exclusive")
        if self.requeue:
            lines.append("--requeue")
            if self.warning_seconds:
                lines.append(f"--signal=B:USR1@{self.warning_seconds}")
        # Without requeue the cluster's own policy applies (JobRequeue): a job Slurm reruns after a node failure
        # resumes from its last complete checkpoint all the same.
        return [*lines, *self.extra]


@dataclass(frozen=True)
class NodeLaunch:
    """What each node's task runs: ``torchrun`` over ``procs_per_node`` processes of ``python -m privtune ARGS``.

    ``args`` are shell words as they will appear in the script (quote literals with ``shlex.quote``; a word may
    name a variable the script sets, e.g. ``"$CONFIG"``)."""

    python: str
    args: tuple[str, ...]
    procs_per_node: int


@dataclass(frozen=True)
class JobBody:
    """The run-specific top of the script body: where records go and what is run."""

    run_dir: str  # a shell word: a quoted literal, or an expression of the array task id
    arrays: Mapping[str, Sequence[str]] = field(default_factory=dict)  # NAME -> literal values (batch shell only)
    variables: Mapping[str, str] = field(default_factory=dict)  # NAME -> shell word, exported to the tasks
    setup: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)


def check_directives(lines: Sequence[str]) -> None:
    """Refuse a ``#SBATCH`` value Slurm would take verbatim or split: ``$``, backticks, quotes, whitespace."""
    for line in lines:
        value = line.split("=", 1)[1] if "=" in line else line
        if _UNSAFE.search(value) or not line.startswith("--"):
            bad = "a shell variable ('$')" if "$" in value else "a space, quote or backslash"
            raise UserError(f"#SBATCH {line} holds {bad}; Slurm does not expand or quote #SBATCH lines",
                            "use literal values (paths without spaces; Slurm's %j/%A/%a patterns are fine)")


def _function(launch: NodeLaunch, nodes: int) -> list[str]:
    if nodes == 1:
        rendezvous = ["--standalone"]  # one node: torchrun picks a free local port itself
    else:
        rendezvous = ['--rdzv-backend=c10d', '--rdzv-id="$JOB"', '--rdzv-endpoint="$RDZV"']
    torchrun = [shlex.quote(launch.python), "-m", "torch.distributed.run", '--nnodes="$SLURM_NNODES"',
                f"--nproc-per-node={launch.procs_per_node}", *rendezvous, "--max-restarts=0",
                '--log-dir="$RUN_DIR/slurm/ranks/$JOB/node$SLURM_NODEID"', "--redirects=3", "--tee=3",
                "-m", "privtune", *launch.args]
    return [
        "# One task per node (srun); runs there, so SLURM_NODEID and SLURM_NNODES are that node's own.",
        "node_task() {",
        "  # torchrun ignores USR1 (an ignored signal stays ignored across exec); privtune's processes catch it.",
        "  (trap '' USR1; exec " + " \\\n      ".join(_wrap(torchrun)) + ") &",
        "  local launcher=$!",
        "  # Slurm may signal only this task's first process: hand USR1 to the launcher's children (the ranks).",
        "  trap 'pkill -USR1 -P \"$launcher\"' USR1",
        '  local code=0; wait "$launcher" || code=$?',
        '  while kill -0 "$launcher" 2>/dev/null; do code=0; wait "$launcher" || code=$?; done',
        '  return "$code"',
        "}",
        "export -f node_task",
    ]


def _wrap(words: list[str], width: int = 88) -> list[str]:
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] += " " + word
    return lines


def render_script(*, header: Sequence[str], options: SbatchOptions, body: JobBody, launch: NodeLaunch) -> str:
    """The whole sbatch script. ``header``: comment lines (without '# ') saying what rendered it and how."""
    directives = options.directives()
    check_directives(directives)
    lines = ["#!/bin/bash", *(f"# {h}" for h in header)]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += ["set -uo pipefail", ""]
    lines += ["# --- what this job runs"]
    for name, values in body.arrays.items():
        lines += [f"{name}=(", *(f"  {shlex.quote(v)}" for v in values), ")"]
    lines += [f"{name}={word}" for name, word in body.variables.items()]
    lines += [f"RUN_DIR={body.run_dir}",
              'JOB="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"',
              'JOB="${JOB:-$SLURM_JOB_ID}"  # an array task: ARRAYID_TASK, as squeue and scontrol name it',
              f"export RUN_DIR JOB{''.join(' ' + n for n in body.variables)}", ""]
    if body.setup or body.env:
        lines += ["# --- node setup (the config's cluster.setup and cluster.env)", *body.setup]
        lines += [f"export {name}={shlex.quote(str(value))}" for name, value in body.env.items()]
        lines.append("")
    lines += [
        "# --- records read by `privtune status`: one line per end of this script (a requeued job ends twice)",
        'mkdir -p "$RUN_DIR/slurm/ranks/$JOB"',
        "requeued=false",
        "record_end() {",
        '  printf \'{"job_id": "%s", "exit_code": %d, "restart": %d, "ended": %d, "requeued": %s}\\n\' \\',
        '    "$JOB" "$1" "${SLURM_RESTART_COUNT:-0}" "$(date +%s)" "$requeued" >> "$RUN_DIR/slurm/exits.jsonl"',
        "}",
        "trap 'record_end $?' EXIT",
        "# Slurm ending the job (scancel, scontrol requeue, time limit) signals every task too: keep waiting for them.",
        "trap 'echo \"privtune: SIGTERM from Slurm: the ranks checkpoint and stop\"' TERM",
        "",
    ]
    if options.requeue:
        lines += [
            "# --- preemption: Slurm's warning signal reaches this shell only; every task gets it, every rank",
            "# checkpoints at the end of its step and exits, then the job requeues and resumes from that checkpoint.",
            "on_warning() {",
            '  echo "privtune: warning signal from Slurm: checkpointing, then requeueing $JOB"',
            "  requeued=true",
            '  scancel --signal=USR1 "$SLURM_JOB_ID"',
            "}",
            "trap on_warning USR1",
            "",
        ]
    lines += [
        "# --- rendezvous at the head node's address (node names need not resolve; NodeAddr does)",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "head_addr=$(scontrol show node -o \"$head_node\" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)",
        f'RDZV="$head_addr:$(( {PORT_BASE} + (SLURM_JOB_ID + 7919 * ${{SLURM_RESTART_COUNT:-0}}) % {PORT_SPAN} ))"',
        "export RDZV",
        'echo "privtune: job $JOB (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, rendezvous $RDZV"',
        "",
        *_function(launch, options.nodes),
        "",
        f"srun --nodes={options.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        '  --output="$RUN_DIR/slurm/$JOB.node%n.out" bash -c node_task &',
        "tasks=$!",
        'code=0; wait "$tasks" || code=$?',
        '# a trapped signal interrupts `wait`: wait again until the tasks are done',
        'while kill -0 "$tasks" 2>/dev/null; do code=0; wait "$tasks" || code=$?; done',
    ]
    if options.requeue:
        lines += [
            'if [ "$requeued" = true ]; then',
            '  echo "privtune: requeueing $JOB; it resumes from the newest complete checkpoint"',
            '  trap - EXIT; record_end "$code"  # recorded first: the requeue ends this shell',
            '  scontrol requeue "$JOB"',
            "fi",
        ]
    lines += ['exit "$code"', ""]
    return "\n".join(lines)


__all__ = ["JobBody", "NodeLaunch", "SbatchOptions", "check_directives", "render_script"]
