"""The typed run configuration: one schema for every YAML under ``configs/``.

Owns: ``RunConfig``, which assembles the sections each stage owns (``data`` in ``corpora/config.py``; ``model``,
``train``, ``privacy``, ``performance`` in ``trainers/config.py``; ``eval`` in ``eval/config.py``; ``cluster``, which
no stage keys on, in ``cluster/config.py``) and checks them against each other; parsing YAML plus ``key=value``
overrides into a validated ``RunConfig``; dumping it. Unknown keys are refused (a misspelled option must never be
silently ignored); errors name the field and say how to fix it. The section classes are re-exported here for
launch and the tests.

Sensitive: ``PrivacyConfig`` (``trainers/config.py``) is frozen and kept apart from ``PerformanceConfig``; see
there for what the guarantee rests on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from privtune.cluster.config import ClusterConfig
from privtune.configbase import Strict
from privtune.corpora.config import CanaryConfig, DataConfig
from privtune.errors import UserError
from privtune.eval.config import EvalConfig
from privtune.trainers.config import (
    DP_METHODS,
    LoraConfig,
    Method,
    ModelConfig,
    PerformanceConfig,
    PrivacyConfig,
    TrainConfig,
)

__all__ = [
    "DP_METHODS", "CanaryConfig", "ClusterConfig", "DataConfig", "EvalConfig", "LoraConfig", "Method", "ModelConfig",
    "PerformanceConfig", "PrivacyConfig", "RunConfig", "TrainConfig", "apply_overrides", "config_from_dict",
    "dump_config", "finite", "load_config",
]


class RunConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.privacy.unit == "group" and not self.data.group_by:
            raise ValueError("privacy.unit is 'group' but data.group_by is not set; name the user column")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def is_dp(self) -> bool:
        return self.train.method in DP_METHODS


# --------------------------------------------------------------------------------------------------------------
# Loading


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value", "write e.g. train.method=lora")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' has an empty key", "write e.g. train.method=lora")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = _parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override '{text}': '{part}' is not a section", "check the key path")
            node = child
        node[path[-1]] = value
    return tree


def _format_validation_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{origin}: unknown field '{loc}': remove it or fix its spelling (see configs/quickstart.yaml)"
    if kind == "missing":
        return f"{origin}: missing required field '{loc}': add it"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{origin}: field '{loc}': {msg}{got_text}: fix the value"


def config_from_dict(tree: dict, origin: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist", "check the path (shipped configs are under configs/)")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}", "fix the syntax there") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path} must hold a mapping of sections at the top level", "see configs/quickstart.yaml")
    tree = apply_overrides(tree, overrides or [])
    return config_from_dict(tree, origin=str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
