"""The design's arrows between layers, checked on the source: which privtune package may import which.

Every ``import privtune.X`` / ``from privtune.X import`` anywhere in a stage's files (inside functions too) counts.
The core (``privtune/``: errors, progress, atomic, fingerprint, configbase, process) imports no stage. The rules:

- ``accounting`` imports nothing of privtune but the core (it must be auditable alone);
- ``corpora`` imports no trainers, eval or synth;
- ``eval`` never imports ``trainers.dp``;
- ``trainers`` imports no eval, cluster or launch;
- no stage imports ``launch`` (the CLI and the stage runner sit on top).

Each stage owns its config section (``corpora/config.py``, ``trainers/config.py``, ``eval/config.py``); only
``launch/config.py`` assembles them, so no stage needs launch. ``PENDING`` lists imports that still break an
arrow, to be fixed later; it is empty, and any violation fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = {"privtune", "privtune.errors", "privtune.progress", "privtune.atomic", "privtune.fingerprint",
        "privtune.configbase", "privtune.process"}
STAGES = ("accounting", "corpora", "trainers", "eval", "synth", "cluster", "launch")
PENDING: set[tuple[str, str]] = set()


def imports_of(root: Path) -> set[str]:
    """Every privtune module named in an import statement of a .py file below ``root``."""
    found: set[str] = set()
    for path in root.rglob("*.py"):
        if any((root / up).is_symlink() for up in path.relative_to(root).parents if up.parts):
            continue  # privtune/<stage> links to a stage folder: the core is privtune/'s own files
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("privtune"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("privtune"):
                found.add(node.module)
    return found


def violations(stage: str, modules: set[str]) -> set[tuple[str, str]]:
    def allowed(module: str) -> bool:
        if module in CORE or module == f"privtune.{stage}" or module.startswith(f"privtune.{stage}."):
            return True
        target = module.split(".")[1]
        if stage == "accounting":
            return False
        if target == "launch" and stage != "launch":
            return False
        if stage == "corpora" and target in ("trainers", "eval", "synth"):
            return False
        if stage == "eval" and module.startswith("privtune.trainers.dp"):
            return False
        if stage == "trainers" and target in ("eval", "cluster", "launch"):
            return False
        return True

    return {(stage, m) for m in modules if not allowed(m)}


def test_the_core_imports_no_stage():
    core = imports_of(REPO / "privtune") - {"privtune.launch.cli"}  # __main__.py: `python -m privtune` is the CLI
    assert core <= CORE
    assert imports_of_file(REPO / "privtune" / "__main__.py") == {"privtune.launch.cli"}


def imports_of_file(path: Path) -> set[str]:
    tmp = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
    return {m for m in tmp if m and m.startswith("privtune")}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_keeps_the_design_arrows(stage):
    broken = violations(stage, imports_of(REPO / stage)) - PENDING
    assert not broken, f"imports that break the layering: {sorted(broken)}"


def test_the_check_fails_on_a_planted_import(tmp_path):
    planted = tmp_path / "accounting"
    planted.mkdir()
    (planted / "x.py").write_text("def f():\n    from privtune.trainers.dp import DPEngine\n")
    assert violations("accounting", imports_of(planted)) == {("accounting", "privtune.trainers.dp")}
    (planted / "x.py").write_text("import privtune.eval.report\n")
    assert violations("trainers", imports_of(planted)) == {("trainers", "privtune.eval.report")}
