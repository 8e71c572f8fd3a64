"""The ``privtune budget`` / ``privtune budget calibrate`` command bodies: output, warnings and errors."""

from __future__ import annotations

import json

import pytest

from privtune.accounting import GaussianEvent, Ledger, NonPrivateEvent, PoissonGaussianEvent, new_run_id
from privtune.accounting.cli import budget_command, calibrate_command
from privtune.errors import UserError


@pytest.fixture
def run_dirs(tmp_path):
    """A generator run dir and a histogram run dir over the same 10k examples."""
    gen, hist = tmp_path / "gen", tmp_path / "hist"
    gen.mkdir()
    hist.mkdir()
    g = Ledger.create(gen, privacy_unit="example", dataset_size=10_000)
    run = new_run_id()
    g.record_training(
        PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.0, steps=200), stage="gen", run_id=run
    )
    g.close_training(stage="gen", run_id=run)
    h = Ledger.create(hist, privacy_unit="example", dataset_size=10_000)
    h.record(GaussianEvent.from_std(std=10.0, sensitivity=1.0), stage="histogram")
    return gen, hist


def test_budget_json(run_dirs, capsys):
    gen, hist = run_dirs
    assert budget_command([str(gen), str(hist / "ledger.json")], delta=1e-6, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["delta"] == 1e-6 and out["epsilon"] == out["per_accountant"]["pld"]["epsilon"] > 0
    assert set(out["per_accountant"]) == {"pld", "rdp"}
    assert [e["event"]["type"] for e in out["events"]] == ["poisson_gaussian", "gaussian"]
    heads = [ledger["head"] for ledger in out["ledgers"]]
    assert [h["seq"] for h in heads] == [1, 1] and all(len(h["hash"]) == 64 for h in heads)
    assert [ledger["verified"] for ledger in out["ledgers"]] == [
        "hash chain intact (no model card to check)"
    ] * 2


def test_budget_table(run_dirs, capsys):
    gen, hist = run_dirs
    assert budget_command([str(gen), str(hist)], delta=1e-6, as_json=False) == 0
    captured = capsys.readouterr()
    result = json.loads(_json_of(run_dirs, capsys))
    shown = f"{result['epsilon']:.4f}"[:-1]  # the table rounds up in the 4th decimal; compare the first three
    assert "Privacy budget" in captured.out and "histogram" in captured.out and shown in captured.out
    head = result["ledgers"][0]["head"]["hash"]
    assert f"head {head[:12]} at entry 1; verified: hash chain intact" in captured.out
    assert captured.err == ""


def _json_of(run_dirs, capsys) -> str:
    budget_command([str(p) for p in run_dirs], delta=1e-6, as_json=True)
    return capsys.readouterr().out


def test_budget_warns_when_delta_is_not_below_one_over_n(run_dirs, capsys):
    budget_command([str(p) for p in run_dirs], delta=1e-4, as_json=True)  # 1/N = 1e-4
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "1/N" in err and "δ should be far smaller" in err


def test_budget_refuses_non_private(tmp_path, one_line):
    ledger = Ledger.create(tmp_path, privacy_unit="example", dataset_size=100)
    ledger.record(NonPrivateEvent(reason="sigma=0 debug run"), stage="debug")
    with pytest.raises(UserError) as err:
        budget_command([str(tmp_path)], delta=1e-6, as_json=False)
    assert "no formal guarantee" in one_line(err)


def test_budget_missing_path(tmp_path, one_line):
    with pytest.raises(UserError) as err:
        budget_command([str(tmp_path / "missing")], delta=1e-6, as_json=True)
    one_line(err)


def test_calibrate_json(capsys):
    code = calibrate_command(
        epsilon=3.0, delta=1e-6, sample_rate=0.01, steps=1000, accountant="pld", as_json=True
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sigma"] > 0 and out["epsilon"] <= out["target_epsilon"] == 3.0
    assert out["per_accountant"]["pld"]["epsilon"] == out["epsilon"]
    assert out["per_accountant"]["rdp"]["epsilon"] >= out["epsilon"]
    assert out["lower_epsilon"] > 3.0


def test_calibrate_table_never_prints_above_target(capsys):
    calibrate_command(epsilon=3.0, delta=1e-6, sample_rate=0.01, steps=1000, accountant="rdp", as_json=False)
    out = capsys.readouterr().out
    assert "σ = " in out and "≤ 3" in out


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sample_rate=0.0),
        dict(sample_rate=1.5),
        dict(epsilon=0.0),
        dict(epsilon=1e-4, sample_rate=0.5, steps=100_000),  # unreachable
        dict(steps=0),
        dict(delta=1.0),
        dict(accountant="prv"),
    ],
)
def test_calibrate_errors(kwargs, one_line):
    args = (
        dict(epsilon=3.0, delta=1e-6, sample_rate=0.01, steps=1000, accountant="pld", as_json=True) | kwargs
    )
    with pytest.raises(UserError) as err:
        calibrate_command(**args)
    one_line(err)
