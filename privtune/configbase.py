"""The base every config section derives from: unknown keys are refused and assignments are validated.

Owns: ``Strict``, the pydantic base of each stage's config section (``corpora/config.py``, ``trainers/config.py``,
``eval/config.py``) and of the assembled ``RunConfig`` (``launch/config.py``). A misspelled option must never be
silently ignored, so ``extra="forbid"``; a value assigned after loading is validated like one read from YAML.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
