"""The ``data`` section of the run config: what corpus to build and how to cut it.

Owns: ``DataConfig`` (source, size, split, tokenized length, the user column for user-level privacy) and
``CanaryConfig`` (the Secret Sharer canaries planted in the training split). Validated on load; unknown keys are
refused (``privtune.configbase``).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from privtune.configbase import Strict


class CanaryConfig(Strict):
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


class DataConfig(Strict):
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
