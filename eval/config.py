"""The ``eval`` section of the run config, and what the evaluation stage reads of the whole run config.

Owns: ``EvalConfig`` (which measures run, on how many examples, with which batch sizes) and ``EvalRun``, the
attributes of the whole run config (the ``RunConfig`` assembled above the stages) that ``eval/stage.py`` and
``eval/measures.py`` read; eval never imports the layer that assembles it.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import Field

from privtune.configbase import Strict
from privtune.corpora.config import DataConfig
from privtune.trainers.config import ModelConfig, PerformanceConfig, TrainConfig


class EvalConfig(Strict):
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


class EvalRun(Protocol):
    """What evaluation reads of the run config: where runs live, the seed, the model, data, method and eval."""

    output_dir: str
    seed: int
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    performance: PerformanceConfig
    eval: EvalConfig
