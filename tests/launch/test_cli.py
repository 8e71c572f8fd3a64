"""CLI exit codes: every bad input exits 2 with one line naming the problem, and leaves no run dir behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from privtune.launch.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


BASE = "name: t\nmodel: {name: tiny-llama}\ndata: {source: customersim, num_examples: 24, max_length: 64}\n"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("privtune: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # progress lines may precede it, nothing follows
    assert needle in errors[0]
    assert "Traceback" not in err


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD_INPUTS = {
    "malformed yaml": (BASE + "train: {method: [lora\n", [], "not valid YAML"),
    "unknown field": (BASE + "trian: {}\n", [], "unknown field 'trian'"),
    "wrong type": (BASE, ["data.num_examples=lots"], "field 'data.num_examples'"),
    "unknown model": (BASE, ["model.name=acme/never-seen"], "acme/never-seen"),
    "missing data file": (BASE, ["data.source=nowhere.jsonl"], "nowhere.jsonl"),
    "bad override": (BASE, ["data.num_examples"], "not key=value"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(workdir, capsys, case):
    body, overrides, needle = BAD_INPUTS[case]
    cfg = write_config(workdir / "c.yaml", body)
    code, out, err = run_cli(capsys, "run", str(cfg), *overrides)
    assert_one_line_error(code, err, needle)
    assert not (workdir / "runs").exists() or not any((workdir / "runs").iterdir())


def test_missing_config_file(workdir, capsys):
    code, _, err = run_cli(capsys, "validate", "nope.yaml")
    assert_one_line_error(code, err, "does not exist")


SPAN_CASES = {
    "span out of range": ([{"text": "call me at 555", "sensitive_spans": [[11, 40, "phone"]]}] * 4, "length 14"),
    "overlapping spans": ([{"text": "Ann Lee lives here", "sensitive_spans": [[0, 7, "name"], [4, 9, "name"]]}] * 4,
                          "overlap"),
    "empty dataset": ([], "holds no records"),
    "missing text field": ([{"body": "hello"}] * 4, "text"),
}


@pytest.mark.parametrize("case", sorted(SPAN_CASES))
def test_bad_user_data_exits_2(workdir, capsys, case):
    rows, needle = SPAN_CASES[case]
    data = write_jsonl(workdir / "d.jsonl", rows)
    cfg = write_config(workdir / "c.yaml", BASE)
    code, _, err = run_cli(capsys, "data", str(cfg), f"data.source={data}", "data.canaries=null")
    assert_one_line_error(code, err, needle)
    assert not (workdir / "runs" / "t").exists(), "nothing half written"


def test_split_that_leaves_a_side_empty(workdir, capsys):
    data = write_jsonl(workdir / "d.jsonl", [{"text": "only one example here"}])
    cfg = write_config(workdir / "c.yaml", BASE)
    code, _, err = run_cli(capsys, "data", str(cfg), f"data.source={data}", "data.canaries=null")
    assert_one_line_error(code, err, "empty")
    assert not (workdir / "runs" / "t").exists()


def test_data_command_json_and_reuse(workdir, capsys):
    cfg = write_config(workdir / "c.yaml", BASE)
    code, out, _ = run_cli(capsys, "data", str(cfg), "--json")
    assert code == 0
    first = json.loads(out)
    assert first["reused"] is False and first["spans_origin"] == "gold"
    code, out, _ = run_cli(capsys, "data", str(cfg), "--json")
    assert json.loads(out)["reused"] is True
    # Other data settings: the data is prepared again (nothing was trained on it) and the command says why.
    code, out, err = run_cli(capsys, "data", str(cfg), "data.seed=7", "--json")
    assert code == 0 and json.loads(out)["reused"] is False and "data.seed: 0 → 7" in err


def test_run_end_to_end_on_a_tiny_model(workdir, capsys):
    cfg = write_config(workdir / "c.yaml", BASE)
    code, out, _ = run_cli(capsys, "run", str(cfg), "--json")
    assert code == 0
    metrics = json.loads(out)
    grid = metrics["base"]["grid"]
    assert set(grid) == {"train_sensitive", "train_nonsensitive", "test_sensitive", "test_nonsensitive"}
    assert all(cell["tokens"] > 0 for cell in grid.values())
    run_dir = workdir / "runs" / "t"
    for path in ("config.resolved.yaml", "data/meta.json", "eval/metrics.json", "eval/COMPLETED"):
        assert (run_dir / path).exists(), path
    assert not list(run_dir.glob(".*tmp-*")), "no temporary folders left"
    # Token counts in the grid equal the sensitive-mask counts of the data (first token of each example has no
    # prediction, and special tokens are non-sensitive).
    tokens = [json.loads(line) for line in (run_dir / "data" / "tokens.train.jsonl").read_text().splitlines()]
    sensitive_predicted = sum(row["sensitive"][1:].count("1") for row in tokens)
    assert grid["train_sensitive"]["tokens"] == sensitive_predicted
    # Running again skips every finished stage.
    code, out, err = run_cli(capsys, "run", str(cfg))
    assert code == 0 and "data  reused" in err and "eval  reused" in err


def test_validate_json(capsys):
    code, out, _ = run_cli(capsys, "validate", str(REPO / "configs" / "quickstart.yaml"), "--json")
    runs = json.loads(out)["runs"]
    assert code == 0 and [r["train"]["method"] for r in runs] == ["full", "lora", "dp", "dp-lora"]
    assert all(r["model"]["name"] == "smollm2-135m" for r in runs)


def test_not_yet_implemented_commands_say_so(capsys):
    code, _, err = run_cli(capsys, "train")
    assert_one_line_error(code, err, "not implemented yet")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", BASE + "trian: {}\n")
    proc = subprocess.run([sys.executable, "-m", "privtune", "validate", str(cfg)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown field 'trian'" in proc.stderr
    assert "Traceback" not in proc.stderr
