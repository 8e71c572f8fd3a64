"""Shared fixtures for the accounting tests: Paper B's setting and the one-line user-error check."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from privtune.launch.errors import UserError

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
