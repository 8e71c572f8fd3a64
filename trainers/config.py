"""The ``model``, ``train``, ``privacy`` and ``performance`` sections of the run config.

Owns: ``ModelConfig`` (which model, in which dtype), ``TrainConfig`` with its ``LoraConfig`` (the method and the
optimization), ``PrivacyConfig``, ``PerformanceConfig``, the ``Method`` names (``DP_METHODS`` are the private
ones) and ``TrainingRun``: what the training stage reads of the whole run config (the ``RunConfig`` that the
layer above assembles from every stage's section; trainers never import that layer).

Sensitive: ``PrivacyConfig`` is what the (ε, δ) guarantee rests on. It is frozen and kept apart from
``PerformanceConfig``. Everything that determines the privacy guarantee (unit, δ, ε target or σ, clipping norm,
sampler, accountant) lives in ``PrivacyConfig``; performance knobs (micro-batch size, precision, workers) must
never change the guarantee, and a test checks that they do not change the update either.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import ConfigDict, Field, model_validator

from privtune.configbase import Strict
from privtune.corpora.config import DataConfig

Method = Literal["none", "full", "lora", "dp", "dp-lora"]
DP_METHODS = ("dp", "dp-lora")
# How the model is spread over the processes of a launch (trainers/parallel/): one process; data parallel with
# replicated weights; FSDP2 (parameters, gradients and optimizer state sharded along dim 0); DeepSpeed ZeRO
# stage 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters), 3 with optimizer state offloaded to CPU.
Parallel = Literal["single", "ddp", "fsdp2", "zero1", "zero2", "zero3", "zero3-offload"]
PARALLEL_PRESETS: tuple[str, ...] = ("single", "ddp", "fsdp2", "zero1", "zero2", "zero3", "zero3-offload")


class ModelConfig(Strict):
    # A registry name (smollm2-135m, tiny-llama, tiny-pythia, tiny-gemma, tiny-qwen), a local directory or a hub id
    # that is already in the local Hugging Face cache. Nothing is downloaded at run time.
    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"


class PrivacyConfig(Strict):
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


class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" or explicit module names (q_proj, v_proj, query_key_value, ...)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(Strict):
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


class PerformanceConfig(Strict):
    """Knobs that change speed and memory, never the guarantee or the update."""

    micro_batch_size: int = Field(8, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: int | None = Field(None, ge=1)
    # ddp under one process is the single-process run; "single" refuses a multi-process launch.
    parallel: Parallel = "ddp"


class TrainingRun(Protocol):
    """What training reads of the run config (the assembled ``RunConfig`` is one)."""

    name: str
    seed: int
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    privacy: PrivacyConfig
    performance: PerformanceConfig

    @property
    def is_dp(self) -> bool: ...
