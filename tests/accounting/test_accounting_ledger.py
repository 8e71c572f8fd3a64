"""The ledger file: format, atomic writes, corruption, and the resume rule (no step counted twice or lost)."""

from __future__ import annotations

import json
import os

import pytest

from privtune.accounting import (
    GaussianEvent,
    Ledger,
    NonPrivateEvent,
    PLDAccountant,
    PoissonGaussianEvent,
    ShuffledGaussianEvent,
    new_run_id,
)
from privtune.accounting.ledger import LEDGER_FILENAME, LedgerHeader, resolve_ledger_path
from privtune.errors import UserError

Q, SIGMA = 0.01, 1.1


def _dp(steps: int) -> PoissonGaussianEvent:
    return PoissonGaussianEvent(sample_rate=Q, noise_multiplier=SIGMA, steps=steps)


def _new(tmp_path, **kwargs) -> Ledger:
    return Ledger.create(tmp_path, privacy_unit="example", dataset_size=10_000, **kwargs)


def _leftovers(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name != LEDGER_FILENAME)


def test_create_load_roundtrip_and_format(tmp_path):
    ledger = _new(tmp_path, dataset="customersim-v1")
    run = new_run_id()
    ledger.record_training(_dp(5), stage="train", run_id=run, note="dp-lora")
    ledger.record(GaussianEvent.from_std(std=10.0, sensitivity=1.0), stage="histogram")
    data = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert data["header"]["format_version"] == 2
    assert all(len(e["hash"]) == 64 for e in data["entries"])  # the chain itself: test_accounting_tamper.py
    assert data["header"]["neighbouring"] == "add_remove"
    assert data["header"]["privacy_unit"] == "example" and data["header"]["dataset_size"] == 10_000
    assert [e["seq"] for e in data["entries"]] == [1, 2]
    assert [e["sampler"] for e in data["entries"]] == ["poisson", "full_dataset"]
    assert data["entries"][0]["event"] == {
        "type": "poisson_gaussian",
        "sample_rate": Q,
        "noise_multiplier": SIGMA,
        "steps": 5,
        "sampler": "poisson",
        "randomness": "secret",
    }
    again = Ledger.load(tmp_path)  # a run dir works as well as the file
    assert again.state_dict() == ledger.state_dict()
    assert again.events() == [_dp(5), GaussianEvent(noise_multiplier=10.0)]
    assert resolve_ledger_path(tmp_path) == tmp_path / LEDGER_FILENAME
    assert resolve_ledger_path(tmp_path / LEDGER_FILENAME) == tmp_path / LEDGER_FILENAME
    assert resolve_ledger_path(tmp_path / "not-yet-a-run") == tmp_path / "not-yet-a-run" / LEDGER_FILENAME
    assert resolve_ledger_path(tmp_path / "other.json") == tmp_path / "other.json"


def test_header_is_a_frozen_record_and_the_file_reads_back_byte_for_byte(tmp_path, one_line):
    ledger = _new(tmp_path, dataset="customersim-v1")
    ledger.record_training(_dp(5), stage="train", run_id=new_run_id())
    stored = (tmp_path / LEDGER_FILENAME).read_bytes()
    header = LedgerHeader.from_dict(json.loads(stored)["header"])
    assert list(header.to_dict()) == ["format_version", "ledger_id", "created_at", "neighbouring", "privacy_unit",
                                      "group_by", "dataset_size", "dataset"]  # the order privtune writes
    assert header.to_dict() == ledger.header and header.dataset_size == 10_000
    with pytest.raises(AttributeError):
        header.dataset_size = 1  # type: ignore[misc]
    Ledger.load(tmp_path).save()
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == stored
    with pytest.raises(UserError) as err:
        LedgerHeader.from_dict({**header.to_dict(), "privacy_unit": "token"})
    assert "privacy_unit 'token' is unknown" in one_line(err)


def test_create_in_a_missing_run_dir_is_refused(tmp_path, one_line):
    with pytest.raises(UserError) as err:
        Ledger.create(tmp_path / "runs" / "new", privacy_unit="example", dataset_size=10)
    assert "does not exist" in one_line(err)
    assert not (tmp_path / "runs").exists()


def test_group_unit_requires_group_by(tmp_path, one_line):
    with pytest.raises(UserError) as err:
        Ledger.create(tmp_path, privacy_unit="group", dataset_size=10)
    one_line(err)
    ledger = Ledger.create(tmp_path, privacy_unit="group", group_by="user_id", dataset_size=10)
    assert ledger.group_by == "user_id"


def test_create_refuses_to_overwrite_and_open_checks_header(tmp_path, one_line):
    _new(tmp_path)
    with pytest.raises(UserError) as err:
        _new(tmp_path)
    one_line(err)
    assert Ledger.open(tmp_path, privacy_unit="example", dataset_size=10_000).dataset_size == 10_000
    with pytest.raises(UserError) as err:
        Ledger.open(tmp_path, privacy_unit="group", group_by="user", dataset_size=10_000)
    assert "privacy_unit" in one_line(err)
    with pytest.raises(UserError) as err:
        Ledger.open(tmp_path, privacy_unit="example", dataset_size=5)
    assert "dataset_size" in one_line(err)


def test_interrupted_training_resumes_without_double_or_lost_steps(tmp_path):
    """Train 50 steps with a checkpoint every 10; crash at 37; resume from the step-30 checkpoint."""
    total, every, crash_at = 50, 10, 37
    run = new_run_id()
    ledger = _new(tmp_path)
    checkpoints: dict[int, dict] = {}
    step = 0
    while step < crash_at:
        step += 1
        ledger.record_training(_dp(step), stage="train", run_id=run)  # the trainer may update every step
        if step % every == 0:
            checkpoints[step] = {
                "step": step,
                "run_id": run,
                "ledger": json.loads(json.dumps(ledger.state_dict())),
            }
    del ledger  # crash: the model state after step 30 is lost, ledger.json says 37

    on_disk = Ledger.load(tmp_path)
    assert on_disk.find(stage="train", run_id=run).event.steps == crash_at
    resume = checkpoints[max(checkpoints)]
    entry = on_disk.rewind(resume["ledger"], stage="train", run_id=resume["run_id"])
    assert entry.event.steps == 30  # steps 31..37 were lost with the model: not counted
    optimizer_steps = resume["step"]
    while optimizer_steps < total:
        optimizer_steps += 1
        on_disk.set_steps(stage="train", run_id=run, steps=optimizer_steps)
    on_disk.close_training(stage="train", run_id=run)

    final = Ledger.load(tmp_path)
    assert final.events() == [_dp(total)]  # exactly the optimizer steps of the released model
    assert final.entries[0].status == "closed"
    acc = PLDAccountant()
    acc.extend(final.events())
    reference = PLDAccountant()
    reference.record(_dp(total))
    assert acc.epsilon(1e-6) == reference.epsilon(1e-6)


def test_rewind_forward_when_the_ledger_write_was_lost(tmp_path):
    """Crash after the checkpoint at 40 was written but before the ledger was saved (disk says 30)."""
    run = new_run_id()
    ledger = _new(tmp_path)
    ledger.record_training(_dp(30), stage="train", run_id=run)
    stale = (tmp_path / LEDGER_FILENAME).read_bytes()
    ledger.record_training(_dp(40), stage="train", run_id=run)
    checkpoint_state = json.loads(json.dumps(ledger.state_dict()))
    (tmp_path / LEDGER_FILENAME).write_bytes(stale)  # the ledger write of step 40 never reached the disk
    on_disk = Ledger.load(tmp_path)
    assert on_disk.events() == [_dp(30)]
    on_disk.rewind(checkpoint_state, stage="train", run_id=run)
    assert Ledger.load(tmp_path).events() == [_dp(40)]


def test_rewind_to_a_checkpoint_before_the_first_step_removes_the_entry(tmp_path):
    ledger = _new(tmp_path)
    ledger.record(GaussianEvent(noise_multiplier=10.0), stage="histogram")
    before_training = ledger.state_dict()
    run = new_run_id()
    ledger.record_training(_dp(3), stage="train", run_id=run)
    assert ledger.rewind(before_training, stage="train", run_id=run) is None
    assert Ledger.load(tmp_path).events() == [GaussianEvent(noise_multiplier=10.0)]


def test_rewind_keeps_other_releases_and_refuses_what_it_cannot_prove(tmp_path, one_line, rehash):
    run = new_run_id()
    ledger = _new(tmp_path)
    ledger.record(GaussianEvent(noise_multiplier=10.0), stage="histogram")
    ledger.record_training(_dp(10), stage="train", run_id=run)
    checkpoint = ledger.state_dict()
    ledger.set_steps(stage="train", run_id=run, steps=15)
    ledger.record(
        GaussianEvent(noise_multiplier=20.0), stage="later-release"
    )  # happened: must survive a rewind
    ledger.rewind(checkpoint, stage="train", run_id=run)
    assert ledger.events() == [
        GaussianEvent(noise_multiplier=10.0),
        _dp(10),
        GaussianEvent(noise_multiplier=20.0),
    ]

    other = Ledger.create(tmp_path / "other.json", privacy_unit="example", dataset_size=10_000)
    with pytest.raises(UserError) as err:  # a checkpoint of another run directory
        other.rewind(checkpoint, stage="train", run_id=run)
    one_line(err)

    changed = json.loads(json.dumps(checkpoint))
    changed["entries"][1]["event"]["noise_multiplier"] = 0.5
    with pytest.raises(UserError) as err:  # edited by hand: the checkpoint's own chain does not verify
        ledger.rewind(changed, stage="train", run_id=run)
    assert "checkpoint's ledger state: entry 2's hash does not match" in one_line(err)
    with pytest.raises(UserError) as err:  # same run id, different mechanism (hashes consistent)
        ledger.rewind(rehash(changed), stage="train", run_id=run)
    assert "update is" in one_line(err)

    lost = json.loads(json.dumps(checkpoint))
    lost["entries"][0]["event"].update(noise_multiplier=9.0, std=9.0)
    with pytest.raises(UserError) as err:  # the checkpoint knows a release the file does not
        ledger.rewind(rehash(lost), stage="train", run_id=run)
    assert "lacks or changed entry 1" in one_line(err)

    ledger.close_training(stage="train", run_id=run)
    with pytest.raises(UserError) as err:  # a finished run may have been released: its steps are final
        ledger.rewind(checkpoint, stage="train", run_id=run)
    assert "closed" in one_line(err)
    with pytest.raises(UserError) as err:
        ledger.set_steps(stage="train", run_id=run, steps=16)
    one_line(err)


def test_steps_only_grow_and_mechanism_is_fixed(tmp_path, one_line):
    run = new_run_id()
    ledger = _new(tmp_path)
    ledger.record_training(_dp(10), stage="train", run_id=run)
    with pytest.raises(UserError) as err:
        ledger.set_steps(stage="train", run_id=run, steps=9)
    assert "rewind" in one_line(err)
    with pytest.raises(UserError) as err:
        ledger.record_training(
            PoissonGaussianEvent(sample_rate=Q, noise_multiplier=2 * SIGMA, steps=11),
            stage="train",
            run_id=run,
        )
    one_line(err)
    with pytest.raises(UserError) as err:
        ledger.set_steps(stage="train", run_id="no-such-run", steps=3)
    one_line(err)
    # A second run of the same stage is a second release and a second entry.
    ledger.record_training(_dp(4), stage="train", run_id=new_run_id())
    assert [e.event.steps for e in ledger.entries] == [10, 4]


def test_record_routes_training_and_one_shot_releases(tmp_path, one_line):
    ledger = _new(tmp_path)
    with pytest.raises(UserError) as err:
        ledger.record(_dp(3), stage="train")
    one_line(err)
    with pytest.raises(UserError) as err:
        ledger.record_training(GaussianEvent(noise_multiplier=1.0), stage="hist", run_id="r")
    one_line(err)
    with pytest.raises(UserError) as err:
        ledger.record(GaussianEvent(noise_multiplier=1.0), stage="two\nlines")
    one_line(err)
    debug = ledger.record(NonPrivateEvent(reason="sigma=0 debug run", steps=5), stage="debug")
    assert debug.sampler == "n/a" and debug.status == "closed"


def test_shuffled_runs_are_recorded_as_what_ran(tmp_path, one_line):
    ledger = _new(tmp_path)
    shuffled = ShuffledGaussianEvent(batch_size=64, dataset_size=10_000, noise_multiplier=1.0, steps=100)
    entry = ledger.record_training(shuffled, stage="train", run_id=new_run_id())
    assert entry.sampler == "shuffle"
    assert Ledger.load(tmp_path).entries[0].event == shuffled
    with pytest.raises(UserError) as err:
        ledger.record_training(
            ShuffledGaussianEvent(batch_size=64, dataset_size=999, noise_multiplier=1.0, steps=1),
            stage="train",
            run_id=new_run_id(),
        )
    one_line(err)


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    ledger = _new(tmp_path)
    run = new_run_id()
    for step in range(1, 21):
        ledger.record_training(_dp(step), stage="train", run_id=run)
    assert _leftovers(tmp_path) == []
    before = (tmp_path / LEDGER_FILENAME).read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        ledger.set_steps(stage="train", run_id=run, steps=21)
    monkeypatch.undo()
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == before  # old file intact
    assert _leftovers(tmp_path) == []  # temp file removed
    assert ledger.find(stage="train", run_id=run).event.steps == 20  # memory rolled back with the disk
    ledger.set_steps(stage="train", run_id=run, steps=21)
    assert Ledger.load(tmp_path).events() == [_dp(21)]


def _corrupt(text: str):
    def apply(data: dict) -> str:
        return text

    return apply


def _edit(fn):
    def apply(data: dict) -> str:
        fn(data)
        return json.dumps(data)

    return apply


CORRUPTIONS = {
    "empty file": _corrupt(""),
    "truncated": _corrupt('{"header": {"format_version": 2, "ledger_'),
    "not an object": _corrupt("[1, 2, 3]"),
    "future version": _edit(lambda d: d["header"].update(format_version=3)),
    "hash missing": _edit(lambda d: d["entries"][1].pop("hash")),
    "hash changed": _edit(lambda d: d["entries"][0].update(hash="0" * 64)),
    "entries swapped": _edit(lambda d: d["entries"].reverse()),
    "entry dropped": _edit(lambda d: d["entries"].pop(0)),
    "header key missing": _edit(lambda d: d["header"].pop("dataset_size")),
    "header extra key": _edit(lambda d: d["header"].update(epsilon=1.0)),
    "unknown unit": _edit(lambda d: d["header"].update(privacy_unit="token")),
    "unknown relation": _edit(lambda d: d["header"].update(neighbouring="swap")),
    "dataset size zero": _edit(lambda d: d["header"].update(dataset_size=0)),
    "bad q": _edit(lambda d: d["entries"][0]["event"].update(sample_rate=2.0)),
    "sigma zero": _edit(lambda d: d["entries"][0]["event"].update(noise_multiplier=0.0)),
    "sampler lies": _edit(lambda d: d["entries"][1].update(sampler="poisson")),
    "unknown event": _edit(lambda d: d["entries"][1]["event"].update(type="laplace")),
    "seq out of order": _edit(lambda d: d["entries"][1].update(seq=1)),
    "entry key missing": _edit(lambda d: d["entries"][0].pop("stage")),
    "open one-shot entry": _edit(lambda d: d["entries"][1].update(status="open")),
    "bad status": _edit(lambda d: d["entries"][0].update(status="done")),
    "duplicate run": _edit(lambda d: d["entries"].append({**d["entries"][0], "seq": 3})),
    "entries not a list": _edit(lambda d: d.update(entries={})),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_ledger_is_a_user_error(tmp_path, name, one_line):
    ledger = _new(tmp_path)
    ledger.record_training(_dp(5), stage="train", run_id=new_run_id())
    ledger.record(GaussianEvent(noise_multiplier=10.0), stage="histogram")
    path = tmp_path / LEDGER_FILENAME
    path.write_text(CORRUPTIONS[name](json.loads(path.read_text())))
    with pytest.raises(UserError) as err:
        Ledger.load(tmp_path)
    one_line(err)


def test_missing_ledger_is_a_user_error(tmp_path, one_line):
    with pytest.raises(UserError) as err:
        Ledger.load(tmp_path / "nowhere")
    one_line(err)
