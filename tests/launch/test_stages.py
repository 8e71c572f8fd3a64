"""Stage records: a result is reused only while what it was computed from is unchanged (issue: runs that never lie).

Each test first reproduces a way the run machinery used to hand out wrong numbers, then checks the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from privtune.fingerprint import read_record
from privtune.launch.cli import main

BASE = {
    "name": "g1",
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "num_examples": 24, "max_length": 48, "canaries": {"count": 1, "repetitions": 2}},
    "train": {"method": "lora", "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
    "eval": {"max_examples": 4, "exposure_sample_size": 20, "extraction_max_spans": 2, "mia_bootstrap": 10},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def cli(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else None), err


def test_eval_before_training_is_refused_and_run_then_scores_the_trained_model(workdir, capsys):
    cfg = write(workdir / "c.yaml", BASE)
    assert cli(capsys, "data", str(cfg))[0] == 0
    code, _, err = cli(capsys, "eval", "runs/g1")
    assert code == 2 and "no trained model" in err  # it used to mark eval done with base-model scores only
    code, metrics, err = cli(capsys, "run", str(cfg), "--json")
    assert code == 0 and "trained" in metrics
    run = workdir / "runs" / "g1"
    assert read_record(run / "eval").inputs["model"] == read_record(run / "model").output


def test_a_method_change_on_a_base_only_eval_rescores_with_the_trained_model(workdir, capsys):
    base_only = write(workdir / "b.yaml", {**BASE, "train": {**BASE["train"], "method": "none"}})
    code, metrics, _ = cli(capsys, "run", str(base_only), "--json")
    assert code == 0 and "trained" not in metrics
    code, metrics, err = cli(capsys, "run", str(write(workdir / "c.yaml", BASE)), "--json")
    assert code == 0 and "train.method: 'none' → 'lora'" in err and "trained" in metrics
    assert metrics["trained"]["grid"] != metrics["base"]["grid"]


def test_a_changed_model_invalidates_its_scores(workdir, capsys):
    cfg = write(workdir / "c.yaml", BASE)
    assert cli(capsys, "run", str(cfg))[0] == 0
    run = workdir / "runs" / "g1"
    # Stand-in for a model that was retrained with secret noise: same settings, other weights, other digest.
    record = json.loads((run / "model" / "COMPLETED").read_text())
    record["output"] = "0" * 64
    (run / "model" / "COMPLETED").write_text(json.dumps(record))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0 and "the trained model changed: scoring again" in err
    assert read_record(run / "eval").inputs["model"] == "0" * 64


def test_eval_with_changed_settings_rescores_and_records_them(workdir, capsys):
    cfg = write(workdir / "c.yaml", BASE)
    assert cli(capsys, "run", str(cfg))[0] == 0
    run = workdir / "runs" / "g1"
    code, metrics, err = cli(capsys, "eval", str(run), "eval.max_examples=6", "--json")
    assert code == 0 and "eval.max_examples: 4 → 6" in err
    assert metrics["examples"]["train"] == 6  # it used to keep the 4-example scores and write 6 into the config
    assert metrics["provenance"]["eval"]["max_examples"] == 6
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["eval"]["max_examples"] == 6
    assert read_record(run / "eval").config["eval.max_examples"] == 6
    code, _, err = cli(capsys, "eval", str(run), "eval.max_examples=6")
    assert code == 0 and "eval  reused" in err


def test_speed_settings_reuse_the_model_and_the_config_keeps_what_trained_it(workdir, capsys):
    cfg = write(workdir / "c.yaml", BASE)
    assert cli(capsys, "run", str(cfg))[0] == 0
    run = workdir / "runs" / "g1"
    code, _, err = cli(capsys, "run", str(cfg), "performance.micro_batch_size=2", "eval.batch_size=2")
    assert code == 0 and "train  reused" in err and "eval  reused" in err
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert resolved["performance"]["micro_batch_size"] == 8  # what model/ was trained with
    assert resolved["eval"]["batch_size"] == 8  # what eval/ was scored with


def test_settings_that_change_the_model_are_refused_before_any_work(workdir, capsys):
    cfg = write(workdir / "c.yaml", BASE)
    assert cli(capsys, "run", str(cfg))[0] == 0
    run = workdir / "runs" / "g1"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for override in ("performance.precision=bf16", "train.learning_rate=0.5", "data.seed=3"):
        code, _, err = cli(capsys, "run", str(cfg), override)
        assert code == 2 and "give this run another name" in err, override
        assert err.strip().count("\n") == 0
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched


def test_a_changed_data_file_is_prepared_again_unless_a_model_was_trained_on_it(workdir, capsys):
    data = workdir / "d.jsonl"
    rows = [{"text": f"Customer {i} called from 555-01{i:02d} about order {1000 + i}."} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tree = {**BASE, "data": {"source": str(data), "max_length": 48, "canaries": None}}
    cfg = write(workdir / "c.yaml", {**tree, "train": {**BASE["train"], "method": "none"}})
    assert cli(capsys, "run", str(cfg))[0] == 0
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
    code, metrics, err = cli(capsys, "run", str(cfg), "--json")
    assert code == 0 and "the data source file changed: preparing again" in err
    assert "the prepared data changed: scoring again" in err
    trained = write(workdir / "t.yaml", {**tree, "name": "g2"})
    assert cli(capsys, "run", str(trained))[0] == 0
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "run", str(trained))
    assert code == 2 and "the data source file changed" in err and "give this run another name" in err


def test_report_refuses_a_run_whose_scores_predate_its_model(workdir, capsys):
    cfg = write(workdir / "c.yaml", BASE)
    assert cli(capsys, "run", str(cfg))[0] == 0
    run = workdir / "runs" / "g1"
    record = json.loads((run / "eval" / "COMPLETED").read_text())
    record["inputs"]["model"] = "f" * 64  # scores of another model than model/ holds
    (run / "eval" / "COMPLETED").write_text(json.dumps(record))
    code, _, err = cli(capsys, "report", str(run), "--out", str(workdir / "rep"))
    assert code == 2 and "privtune eval" in err
    assert not (workdir / "rep").exists()
