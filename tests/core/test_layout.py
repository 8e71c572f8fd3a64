"""The package layout tools can read: ``privtune/<stage>`` is a relative symlink to the top-level ``<stage>/``.

So the folder ``privtune/`` *is* the package Python imports — for the editable install, for plain path lookup
from the repository root (no editable finder), and for static tools (jedi, mypy) that follow the path.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import jedi
import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ("accounting", "corpora", "trainers", "eval", "synth", "cluster", "launch")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_a_relative_symlink_in_the_package(stage):
    link = REPO / "privtune" / stage
    assert link.is_symlink(), f"privtune/{stage} must be a symlink to ../{stage}"
    assert os.readlink(link) == f"../{stage}"
    assert link.resolve() == REPO / stage
    assert (REPO / stage / "__init__.py").is_file()


def test_every_top_level_package_folder_is_linked():
    folders = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"privtune"}
    assert folders == set(STAGES)
    assert not (REPO / "privtune" / "dp").exists()  # trainers/dp comes along inside trainers


def first_cross_stage_import(path: Path, stage: str) -> tuple[int, int, str, str]:
    """(line, column, name, module) of the first name ``path`` imports from another stage."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if len(parts) > 2 and parts[0] == "privtune" and parts[1] in STAGES and parts[1] != stage:
                alias = node.names[0]
                line = path.read_text().splitlines()[alias.lineno - 1]
                return alias.lineno, line.index(alias.name, alias.col_offset), alias.name, node.module
    raise AssertionError(f"{path} imports nothing from another stage")


@pytest.mark.parametrize("source", ["launch/summary.py", "launch/stages.py", "eval/extraction.py"])
def test_jedi_goes_to_a_definition_in_another_stage(source):
    path = REPO / source
    line, column, name, module = first_cross_stage_import(path, path.parent.name)
    found = jedi.Script(path=str(path), project=jedi.Project(REPO)).goto(line, column, follow_imports=True)
    assert found, f"jedi resolved nothing for {name} from {module}"
    target = REPO / module.split(".")[1]
    for definition in found:
        assert definition.name == name
        assert definition.module_path is not None
        assert Path(definition.module_path).resolve().is_relative_to(target), definition.module_path


PLAIN_IMPORT = """
import sys
# no editable finder: only sys.path (PYTHONPATH = the repository root, then site-packages) is searched
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
import privtune.trainers.dp as m
print(m.__file__)
"""


def test_plain_path_lookup_from_the_repo_root_finds_the_stages():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_IMPORT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = Path(done.stdout.strip())
    assert found == REPO / "privtune" / "trainers" / "dp" / "__init__.py"
    assert found.resolve() == REPO / "trainers" / "dp" / "__init__.py"
