"""A real local Slurm cluster for the cluster tests: two slurmd "nodes" on 127.0.0.1, started once a session.

Where the harness cannot run (not Linux, not root, no Slurm and no apt-get, a daemon that will not start) the
tests that need it are skipped with the reason, which ``-ra`` prints in the summary.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from privtune.cluster.local import HarnessUnavailable, LocalSlurm, cannot_start_reason, ensure_installed


def _skip(reason: str):
    pytest.skip(f"Slurm harness cannot start here: {reason}")


@pytest.fixture(scope="session")
def slurm_installed() -> None:
    """Slurm's daemons and clients are on this machine (installed with apt-get if root), else skip."""
    if reason := cannot_start_reason():
        _skip(reason)
    try:
        ensure_installed()
    except HarnessUnavailable as err:
        _skip(str(err))


@pytest.fixture(scope="session")
def slurm_cluster(slurm_installed, tmp_path_factory) -> Iterator[LocalSlurm]:
    """A running 2-node cluster; ``os.environ`` points Slurm's commands at it for the session."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
    except HarnessUnavailable as err:
        _skip(str(err))
    saved = {key: os.environ.get(key) for key in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cluster.stop()
