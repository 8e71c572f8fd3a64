"""The ``cluster:`` section of a run config: how ``privtune submit`` starts this run's Slurm job.

Owns: the job's default Slurm options (partition, account, time limit, ...), the shell lines that prepare a node
(``setup``: modules, a virtual environment) and the variables exported to every task (``env``). The command-line
flags of ``privtune submit`` override the options here. Nothing in this section changes what a run computes, so
no stage keys on it (``launch/stages.py``): moving a run to another partition never redoes its training.

Every value that lands on an ``#SBATCH`` line is checked here and again when the script is rendered: Slurm never
expands variables there, so ``$`` (or a newline) in one is refused instead of silently reaching Slurm verbatim.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from privtune.configbase import Strict

# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED/INFINITE.
TIME_PATTERN = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$")
MEM_PATTERN = re.compile(r"^\d+[KMGT]?$")  # sbatch --mem: a number with an optional unit (0 = all of the node)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.,:+\-\[\]|&()!*=]+$")  # partition, account, qos, constraint expressions
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_time(value: str) -> str:
    if not TIME_PATTERN.match(value):
        raise ValueError(f"'{value}' is not a Slurm time limit; write e.g. 30, 4:00:00 or 2-00:00:00")
    return value


def check_mem(value: str) -> str:
    if not MEM_PATTERN.match(value):
        raise ValueError(f"'{value}' is not a Slurm memory size; write e.g. 64G or 500000M")
    return value


def check_name(value: str, what: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"'{value}' is not a valid {what} (no spaces, '$' or quotes: #SBATCH lines are not expanded)")
    return value


class ClusterConfig(Strict):
    """Slurm defaults of this run (``privtune submit`` flags override them) and how its nodes are prepared."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # the job's time limit, e.g. 24:00:00
    mem: str | None = None  # memory per node, e.g. 480G
    cpus_per_task: int | None = Field(None, ge=1)  # one task per node: the CPUs of that node's processes
    constraint: str | None = None
    exclusive: bool = False
    gpus_per_node: int | None = Field(None, ge=0)
    # Further sbatch options, verbatim, e.g. ["--mail-type=END", "--reservation=llm"] (checked like the others).
    sbatch: list[str] = Field(default_factory=list)
    # Shell lines run on every node before privtune starts, e.g. ["module load cuda/12.4", "source ~/venv/bin/activate"].
    setup: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)  # exported to every task, e.g. {NCCL_DEBUG: WARN}
    # The interpreter on the nodes; default: the one running `privtune submit` (a shared-filesystem venv).
    python: str | None = None

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v):
        if isinstance(v, int):  # YAML 1.1 reads an unquoted 24:00:00 as the number 86400 (Slurm: minutes!)
            raise ValueError(f"the time limit must be quoted (YAML read {v}); write e.g. time: '24:00:00'")
        return None if v is None else check_time(str(v))

    @field_validator("mem")
    @classmethod
    def _mem(cls, v):
        return None if v is None else check_mem(v)

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _names(cls, v, info):
        return None if v is None else check_name(v, info.field_name)

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, v):
        for option in v:
            if not option.startswith("--") or "$" in option or "\n" in option:
                raise ValueError(f"'{option}' is not a literal sbatch option; write e.g. --mail-type=END")
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v):
        if any("\n" in line for line in v):
            raise ValueError("each cluster.setup entry is one shell line; split multi-line entries")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v):
        for name, value in v.items():
            if not ENV_NAME.match(name) or "\n" in str(value):
                raise ValueError(f"cluster.env: '{name}' is not a variable name (or its value spans lines)")
        return v


__all__ = ["ClusterConfig", "check_mem", "check_name", "check_time"]
