"""The typed run configuration: one schema for every YAML under ``configs/``.

Owns: parsing YAML plus ``key=value`` overrides into a validated ``RunConfig``; unknown keys are refused (a
misspelled option must never be silently ignored); errors name the field and say how to fix it.

Sensitive: ``PrivacyConfig`` is frozen and kept apart from ``PerformanceConfig``. Everything that determines the
privacy guarantee (unit, δ, ε target or σ, clipping norm, sampler, accountant) lives in ``PrivacyConfig``;
performance knobs (micro-batch size, precision, workers) must never change the guarantee, and a test checks that
they do not change the update either.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from privtune.errors import UserError

Method = Literal["none", "full", "lora", "dp", "dp-lora"]
DP_METHODS = ("dp", "dp-lora")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    # A registry name (smollm2-135m, tiny-llama, tiny-pythia, tiny-gemma, tiny-qwen), a local directory or a hub id
    # that is already in the local Hugging Face cache. Nothing is downloaded at run time.
    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"


class CanaryConfig(_Strict):
    """Secret Sharer canaries: ``count`` distinct secrets, each inserted ``repetitions`` times into training data."""

    pattern: str = "My ID is {secret}."
    secret_digits: int = Field(6, ge=1, le=12)
    count: int = Field(1, ge=0)
    repetitions: int = Field(10, ge=1)

    @field_validator("pattern")
    @classmethod
    def _has_placeholder(cls, v: str) -> str:
        if v.count("{secret}") != 1:
            raise ValueError("must contain the placeholder {secret} exactly once")
        return v


class DataConfig(_Strict):
    # customersim | synbio | a local .jsonl / .csv file or a dataset directory saved with `datasets`
    source: str = "customersim"
    num_examples: int = Field(1000, ge=1, description="generated corpora only")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_length: int = Field(128, ge=8)
    seed: int = 0
    text_field: str = "text"
    spans_field: str = "sensitive_spans"
    # User-level privacy: the column whose value names the user. Required when privacy.unit == "group".
    group_by: str | None = None
    canaries: CanaryConfig | None = Field(default_factory=CanaryConfig)


class PrivacyConfig(_Strict):
    """Everything the (ε, δ) guarantee rests on. Frozen: nothing may change it after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["example", "group"] = "example"
    # Either a target ε (σ is calibrated so that the printed ε never exceeds it) or an explicit σ.
    target_epsilon: float | None = Field(None, gt=0.0)
    noise_multiplier: float | None = Field(None, ge=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)  # default 1 / (10 N) when unset
    clip_norm: float = Field(1.0, gt=0.0)
    clipping: Literal["flat", "per_layer"] = "flat"
    sampler: Literal["poisson"] = "poisson"
    accountant: Literal["pld", "rdp"] = "pld"
    # By default the Poisson sample and the noise come from a 128-bit key drawn from the OS CSPRNG and kept only in
    # the run's checkpoints. reproducible: derive both from `seed` instead (tests, experiments): anyone with the
    # config can then recompute the batches and subtract the noise, so such a run is never a release.
    reproducible: bool = False
    # Every noise value from OS randomness (slow; hardens the noise generator itself, not reproducible).
    secure_rng: bool = False
    # σ = 0 under a DP method is refused unless this is set; then no ε is claimed anywhere.
    non_private_debug: bool = False

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("set either target_epsilon or noise_multiplier, not both")
        if self.reproducible and self.secure_rng:
            raise ValueError("reproducible and secure_rng exclude each other (OS randomness cannot be replayed)")
        return self


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" or explicit module names (q_proj, v_proj, query_key_value, ...)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(_Strict):
    method: Method = "none"
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)
    # Logical batch: exact size for non-DP methods, the *expected* Poisson batch size for DP ones.
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup_steps: int = Field(0, ge=0)
    loss_on: Literal["all", "response"] = "all"
    checkpoint_every: int | None = Field(None, ge=1)
    # DP methods: recompute one or two sampled units' clipped gradients with plain autograd on the first step and
    # every N steps, and stop on a mismatch (trainers/dp/selfcheck.py). null turns it off.
    self_check_every: int | None = Field(100, ge=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)


class PerformanceConfig(_Strict):
    """Knobs that change speed and memory, never the guarantee or the update."""

    micro_batch_size: int = Field(8, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: int | None = Field(None, ge=1)


class EvalConfig(_Strict):
    batch_size: int = Field(8, ge=1)
    max_examples: int | None = Field(None, ge=1, description="per split; None scores every example")
    base_model: bool = True
    mia: bool = True
    mia_bootstrap: int = Field(1000, ge=0)
    exposure: bool = True
    exposure_method: Literal["auto", "exact", "extrapolate"] = "auto"
    exposure_batch_size: int = Field(256, ge=1)
    exposure_sample_size: int = Field(5000, ge=10, description="candidates drawn for the skew-normal fit")
    extraction_max_spans: int = Field(100, ge=0, description="0 turns extraction off")


class RunConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

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
