"""Shared fixtures for the accounting tests: Paper B's setting, the one-line user-error check, and an independent
implementation of the ledger's hash chain (hashlib only, never the module's helpers)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from privtune.errors import UserError

# Paper B (Yu et al., ICML 2024): 180k instructions, logical batch 4096, 10 epochs -> 439 steps, δ = 5e-7.
PAPER_B = {"sample_rate": 4096 / 180_000, "steps": 439, "delta": 5e-7, "dataset_size": 180_000}


def _one_line(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserError), type(excinfo.value)
    assert "\n" not in message, message
    assert ": " in message and message.endswith("."), message  # "problem: fix."
    assert excinfo.value.exit_code == 2
    return message


@pytest.fixture
def one_line() -> Callable[[pytest.ExceptionInfo[BaseException]], str]:
    """Check that a raised error is a one-line ``UserError`` ("problem: fix.", exit code 2); return its text."""
    return _one_line


@pytest.fixture(scope="session")
def paper_b() -> dict[str, float]:
    return dict(PAPER_B)


@pytest.fixture(scope="session")
def paper_b_sigmas() -> dict[float, float]:
    """σ calibrated with the PLD accountant for Paper B's two generator budgets (computed once per session)."""
    from privtune.accounting import calibrate_noise

    return {
        eps: calibrate_noise(
            target_epsilon=eps,
            delta=PAPER_B["delta"],
            sample_rate=PAPER_B["sample_rate"],
            steps=PAPER_B["steps"],
            accountant="pld",
        )
        for eps in (5.94, 2.86)
    }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canon(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def chain_of(data: dict[str, Any]) -> list[str]:
    """[h_0, h_1, ...] of a ledger's JSON (``state_dict()`` or ledger.json), recomputed from the spec:
    h_0 = sha256(canonical header), h_i = sha256(h_{i-1} + canonical entry i without "hash")."""
    hashes = [_sha(_canon(data["header"]))]
    for entry in data["entries"]:
        hashes.append(_sha(hashes[-1] + _canon({k: v for k, v in entry.items() if k != "hash"})))
    return hashes


def rechain(data: dict[str, Any]) -> dict[str, Any]:
    """Recompute every entry's hash in place, as someone editing the file by hand and covering it up would."""
    for entry, digest in zip(data["entries"], chain_of(data)[1:], strict=True):
        entry["hash"] = digest
    return data


@pytest.fixture
def chain() -> Callable[[dict[str, Any]], list[str]]:
    return chain_of


@pytest.fixture
def rehash() -> Callable[[dict[str, Any]], dict[str, Any]]:
    return rechain
