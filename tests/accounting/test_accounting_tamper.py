"""Tamper evidence: the ledger's hash chain, and `privtune budget` checking a run's ledger against its model card.

The scenario this guards against: σ edited in RUN/ledger.json from 0.49 to 5 makes `privtune budget` report a far
smaller ε, although the released model was trained with σ = 0.49 (and its card says so).
"""

from __future__ import annotations

import json

import pytest

from privtune.accounting import (
    GaussianEvent,
    Ledger,
    NoGuaranteeError,
    NonPrivateEvent,
    PoissonGaussianEvent,
    compose_ledgers,
    new_run_id,
)
from privtune.accounting.ledger import LEDGER_FILENAME
from privtune.errors import UserError

Q, SIGMA, STEPS, N = 0.05, 0.49, 40, 2_000
MATCHES_CARD = "hash chain intact; matches the model card"
NO_CARD = "hash chain intact (no model card to check)"


def _dp(steps: int, sigma: float = SIGMA) -> PoissonGaussianEvent:
    return PoissonGaussianEvent(sample_rate=Q, noise_multiplier=sigma, steps=steps)


def _read(run_dir) -> dict:
    return json.loads((run_dir / LEDGER_FILENAME).read_text())


def _write(run_dir, data: dict) -> None:
    (run_dir / LEDGER_FILENAME).write_text(json.dumps(data, indent=2))


def _released_run(run_dir, *, card: bool = True) -> Ledger:
    """A DP training run that finished and released its model: the card records the ledger head and event, as
    the training recipe writes them."""
    (run_dir / "model").mkdir(parents=True)
    ledger = Ledger.create(run_dir, privacy_unit="example", dataset_size=N)
    run = new_run_id()
    for step in (10, 20, 30, STEPS):
        ledger.record_training(_dp(step), stage="train", run_id=run)
    entry = ledger.close_training(stage="train", run_id=run)
    if card:
        (run_dir / "model" / "privtune.json").write_text(
            json.dumps(
                {"method": "dp-full", "steps": STEPS, "ledger": ledger.head, "event": entry.event.to_dict()},
                indent=2,
                sort_keys=True,
            )
        )
    return ledger


@pytest.fixture
def cli(monkeypatch, capsys):
    """`privtune ...` in-process: returns (exit code, stdout, stderr)."""
    from privtune.launch.cli import main

    for name, value in [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")]:
        monkeypatch.setenv(name, value)  # main() sets these; keep them from leaking into other tests

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what earlier calls in the test printed (e.g. dp_accounting's log lines)
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _refused(cli, *argv: str) -> str:
    code, out, err = cli(*argv)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("privtune: error: ") and err.count("\n") == 1, err
    return err


# ---- (a) the chain is what the spec says ----------------------------------------------------------------------


def test_chain_equals_an_independent_recomputation(tmp_path, chain):
    ledger = Ledger.create(tmp_path, privacy_unit="example", dataset_size=N, dataset="customersim")
    ledger.record(GaussianEvent.from_std(std=10.0, sensitivity=1.0), stage="histogram")
    run = new_run_id()
    ledger.record_training(_dp(5), stage="train", run_id=run)
    open_hash = _read(tmp_path)["entries"][1]["hash"]
    first_hash = _read(tmp_path)["entries"][0]["hash"]
    ledger.set_steps(stage="train", run_id=run, steps=6)

    data = _read(tmp_path)
    expected = chain(data)  # hashlib over the file's own JSON, not the module's helper
    assert [e["hash"] for e in data["entries"]] == expected[1:]
    assert data["entries"][0]["hash"] == first_hash  # a closed entry before the open one never changes
    assert data["entries"][1]["hash"] != open_hash  # the open entry's steps grew: its hash was recomputed
    assert ledger.head == {"ledger_id": data["header"]["ledger_id"], "seq": 2, "hash": expected[2]}
    assert [ledger.hash_at(s) for s in (0, 1, 2)] == expected
    assert ledger.state_dict() == data  # what a checkpoint stores carries the same hashes
    assert Ledger.load(tmp_path).head == ledger.head


def test_empty_ledger_head_is_the_header_hash(tmp_path, chain):
    ledger = Ledger.create(tmp_path, privacy_unit="example", dataset_size=N)
    assert ledger.head == {"ledger_id": ledger.ledger_id, "seq": 0, "hash": chain(_read(tmp_path))[0]}
    with pytest.raises(UserError):
        ledger.hash_at(1)


def test_reformatting_the_file_keeps_it_valid(tmp_path):
    """The hash covers canonical JSON: key order and whitespace are not content."""
    ledger = _released_run(tmp_path, card=False)
    data = _read(tmp_path)
    data["entries"][0] = dict(reversed(list(data["entries"][0].items())))
    (tmp_path / LEDGER_FILENAME).write_text(json.dumps(data, separators=(",", ":")))
    assert Ledger.load(tmp_path).head == ledger.head


def test_consistent_hashes_over_a_form_privtune_never_writes_are_refused(tmp_path, rehash, one_line):
    """steps 40 -> 40.0 with every hash recomputed: same meaning, but the head would not match what was stored."""
    _released_run(tmp_path, card=False)
    data = _read(tmp_path)
    data["entries"][0]["event"]["steps"] = float(STEPS)
    _write(tmp_path, rehash(data))
    with pytest.raises(UserError) as err:
        Ledger.load(tmp_path)
    assert "entry 1 is not in the form privtune writes" in one_line(err)


# ---- (b) a naive hand edit ---------------------------------------------------------------------------------------


def test_edited_sigma_is_refused_on_load_and_by_budget(tmp_path, cli, one_line):
    run_dir = tmp_path / "run"
    _released_run(run_dir)
    code, out, _ = cli("budget", str(run_dir), "--delta", "1e-5")
    assert code == 0 and "verified: " + MATCHES_CARD in out

    data = _read(run_dir)
    data["entries"][0]["event"]["noise_multiplier"] = 5  # 0.49 -> 5: a much smaller ε, if it were believed
    _write(run_dir, data)
    with pytest.raises(UserError) as err:
        Ledger.load(run_dir)
    assert "entry 1's hash does not match its content (edited by hand?)" in one_line(err)
    with pytest.raises(UserError):
        Ledger.open(run_dir, privacy_unit="example", dataset_size=N)  # training cannot append to it either
    err_line = _refused(cli, "budget", str(run_dir), "--delta", "1e-5")
    assert f"ledger {run_dir / LEDGER_FILENAME}: entry 1's hash does not match" in err_line
    assert "restore ledger.json from a good copy" in err_line
    _refused(cli, "budget", str(run_dir / LEDGER_FILENAME), "--delta", "1e-5", "--json")


# ---- (c) an edit that recomputes the chain, checked against the model card --------------------------------------


def test_rehashed_edit_is_refused_by_the_model_card(tmp_path, cli, rehash, one_line):
    run_dir = tmp_path / "run"
    _released_run(run_dir)
    honest = compose_ledgers([run_dir], delta=1e-5)["epsilon"]
    _write(run_dir, rehash(_edit_sigma(_read(run_dir), 5.0)))

    edited = Ledger.load(run_dir)  # the chain alone cannot tell: every hash is consistent
    assert edited.events() == [_dp(STEPS, sigma=5.0)]
    assert compose_ledgers([edited], delta=1e-5)["epsilon"] < honest / 5  # what the edit would have bought
    with pytest.raises(UserError) as err:
        compose_ledgers([run_dir], delta=1e-5)
    message = one_line(err)
    assert f"{run_dir}'s model card records ledger hash " in message
    assert "at entry 1 but ledger.json has " in message
    assert "the ledger was changed after the model was released" in message
    assert "the ledger was changed after the model was released" in _refused(
        cli, "budget", str(run_dir), "--delta", "1e-5"
    )


def _edit_sigma(data: dict, sigma: float) -> dict:
    data["entries"][0]["event"]["noise_multiplier"] = sigma
    return data


def test_card_event_must_match_the_ledger_entry(tmp_path, one_line):
    """Hash matches but the card's event does not: card and ledger were not written together."""
    run_dir = tmp_path / "run"
    _released_run(run_dir)
    card_path = run_dir / "model" / "privtune.json"
    card = json.loads(card_path.read_text())
    card["event"]["noise_multiplier"] = 5.0
    card_path.write_text(json.dumps(card))
    with pytest.raises(UserError) as err:
        compose_ledgers([run_dir], delta=1e-5)
    assert "records event" in one_line(err) and "ran" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda c: c["ledger"].update(ledger_id="0" * 32), "the ledger was replaced"),
        (lambda c: c["ledger"].update(seq=7), "has no entry 7 (its last is 1)"),
        (lambda c: c["ledger"].update(hash="ab" * 32), "but ledger.json has"),
        (lambda c: c["ledger"].update(seq="1"), "malformed 'ledger' record"),
        (lambda c: c["ledger"].pop("hash"), "malformed 'ledger' record"),
        (lambda c: c.pop("ledger"), "records an event but no 'ledger' position"),
    ],
)
def test_card_disagreements_are_refused(tmp_path, edit, words, one_line):
    run_dir = tmp_path / "run"
    _released_run(run_dir)
    card_path = run_dir / "model" / "privtune.json"
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))
    with pytest.raises(UserError) as err:
        compose_ledgers([run_dir], delta=1e-5)
    assert words in one_line(err)


def test_non_dp_card_with_null_event(tmp_path, rehash, one_line):
    """A non-DP run's card pins the ledger head (its non-private entry) with "event": null; null means absent."""
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    ledger = Ledger.create(run_dir, privacy_unit="example", dataset_size=N)
    ledger.record(NonPrivateEvent(reason="method full adds no noise", steps=3), stage="train")
    card_path = run_dir / "model" / "privtune.json"
    card_path.write_text(json.dumps({"method": "full", "ledger": ledger.head, "event": None}))
    with pytest.raises(NoGuaranteeError) as err:  # the card agrees, so the honest refusal is what remains
        compose_ledgers([run_dir], delta=1e-5)
    assert "no formal guarantee" in one_line(err)
    # Rewriting the non-private entry as a DP one (hashes recomputed) is caught by the card's hash.
    data = _read(run_dir)
    data["entries"][0].update(
        status="closed", sampler="poisson", event={**_dp(3).to_dict()}, run_id="r", note="honest, really"
    )
    _write(run_dir, rehash(data))
    with pytest.raises(UserError) as err:
        compose_ledgers([run_dir], delta=1e-5)
    assert "the ledger was changed after the model was released" in one_line(err)

    card_path.write_text(json.dumps({"method": "full", "ledger": None, "event": None}))
    result = compose_ledgers([run_dir], delta=1e-5)
    assert result["ledgers"][0]["verified"] == "hash chain intact (the model card records no ledger hash)"


def test_unreadable_card_is_refused(tmp_path, one_line):
    run_dir = tmp_path / "run"
    _released_run(run_dir)
    (run_dir / "model" / "privtune.json").write_text("{not json")
    with pytest.raises(UserError) as err:
        compose_ledgers([run_dir], delta=1e-5)
    assert "not valid JSON" in one_line(err)


def test_what_was_verified_is_reported(tmp_path, cli):
    with_card, without_card, no_keys = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a = _released_run(with_card)
    _released_run(without_card, card=False)  # a run that released no model yet
    _released_run(no_keys, card=False)
    card = {"method": "full", "steps": 3}  # a non-DP or older run's card: nothing to check
    (no_keys / "model" / "privtune.json").write_text(json.dumps(card))
    # A later release appended to the run's ledger does not disturb the card's hash at entry 1.
    a.record(GaussianEvent(noise_multiplier=10.0), stage="histogram")

    result = compose_ledgers([with_card, without_card, no_keys], delta=1e-5)
    verified = [ledger["verified"] for ledger in result["ledgers"]]
    assert verified == [MATCHES_CARD, NO_CARD, "hash chain intact (the model card records no ledger hash)"]
    assert result["ledgers"][0]["head"] == a.head and a.head["seq"] == 2
    file_only = compose_ledgers([with_card / LEDGER_FILENAME], delta=1e-5)  # a ledger file: no card beside it
    assert file_only["ledgers"][0]["verified"] == NO_CARD

    code, out, _ = cli("budget", str(with_card), str(without_card), "--delta", "1e-5")
    assert code == 0
    assert f"head {a.head['hash'][:12]} at entry 2; verified: {MATCHES_CARD}" in out
    assert f"verified: {NO_CARD}" in out
    code, out, _ = cli("budget", str(with_card), "--delta", "1e-5", "--json")
    (shown,) = json.loads(out)["ledgers"]
    assert code == 0 and shown["head"] == a.head and shown["verified"] == MATCHES_CARD


# ---- (d) resume keeps a valid chain --------------------------------------------------------------------------


def test_resume_from_a_checkpoint_keeps_a_valid_chain(tmp_path, chain, one_line):
    run = new_run_id()
    ledger = Ledger.create(tmp_path, privacy_unit="example", dataset_size=N)
    ledger.record(GaussianEvent(noise_multiplier=10.0), stage="histogram")
    checkpoints = {}
    for step in range(1, 28):
        ledger.record_training(_dp(step), stage="train", run_id=run)
        if step % 10 == 0:
            checkpoints[step] = json.loads(json.dumps(ledger.state_dict()))
    del ledger  # crash at step 27

    resumed = Ledger.open(tmp_path, privacy_unit="example", dataset_size=N)
    before = resumed.hash_at(1)
    assert resumed.rewind(checkpoints[20], stage="train", run_id=run).event.steps == 20
    for step in range(21, STEPS + 1):
        resumed.set_steps(stage="train", run_id=run, steps=step)
    resumed.close_training(stage="train", run_id=run)

    data = _read(tmp_path)
    assert [e["hash"] for e in data["entries"]] == chain(data)[1:]
    final = Ledger.load(tmp_path)
    assert final.events() == [GaussianEvent(noise_multiplier=10.0), _dp(STEPS)]
    assert final.hash_at(1) == before and final.head == resumed.head

    tampered = json.loads(json.dumps(checkpoints[10]))
    tampered["entries"][1]["event"]["steps"] = 1  # a checkpoint is as easy to edit as ledger.json
    other = Ledger.create(tmp_path / "other.json", privacy_unit="example", dataset_size=N)
    with pytest.raises(UserError) as err:
        other.rewind(tampered, stage="train", run_id=run)
    assert "the checkpoint's ledger state: entry 2's hash does not match" in one_line(err)


# ---- (e) format version 1 ------------------------------------------------------------------------------------


def _as_v1(data: dict) -> dict:
    data["header"]["format_version"] = 1
    for entry in data["entries"]:
        entry.pop("hash")
    return data


def test_v1_ledger_is_refused(tmp_path, cli, one_line):
    run_dir = tmp_path / "run"
    ledger = _released_run(run_dir, card=False)
    state = _as_v1(ledger.state_dict())
    _write(run_dir, json.loads(json.dumps(state)))
    with pytest.raises(UserError) as err:
        Ledger.load(run_dir)
    assert "format_version 1, which predates the hash chain and cannot be verified" in one_line(err)
    assert "predates the hash chain" in _refused(cli, "budget", str(run_dir), "--delta", "1e-5")
    fresh = Ledger.create(tmp_path / "fresh.json", privacy_unit="example", dataset_size=N)
    with pytest.raises(UserError) as err:  # a checkpoint written by the old version cannot be resumed from
        fresh.rewind(state, stage="train", run_id="r")
    assert "predates the hash chain" in one_line(err)
