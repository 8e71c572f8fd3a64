"""Test helper: a run config from a base tree plus ``section__key=value`` overrides (shared by the trainer tests)."""

from __future__ import annotations

import copy
from pathlib import Path

from privtune.launch.config import RunConfig, config_from_dict


def config_with(base: dict, tmp_path: Path, **sections) -> RunConfig:
    """``base`` with each ``a__b=value`` set at ``a.b``; ``output_dir`` under ``tmp_path``."""
    tree = copy.deepcopy(base)
    for key, value in sections.items():
        node = tree
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    tree["output_dir"] = str(tmp_path / "runs")
    return config_from_dict(tree)
