"""Shared fixtures for the corpora tests: the two tokenizers the mask alignment is checked with."""

from __future__ import annotations

import pytest

from privtune.trainers.models import byte_tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model's BPE tokenizer (cached; loads in about a second)."""
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def byte_tok():
    return byte_tokenizer()
