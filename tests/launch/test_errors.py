"""Every error a user can cause, through the CLI: exit 2, one line on stderr, no traceback, nothing on disk.

Each case writes its inputs, snapshots the working dir, runs the command(s) and checks that not one file or
folder appeared (no run dir, no empty ``runs/``, no temporary folder, no report folder). A config case runs under
``privtune validate`` and under the command that would do the work (``run``, ``data`` or ``sweep``): validate
refuses exactly what the run refuses, and the run refuses it before any work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from privtune.launch.cli import main

BASE = "name: t\nmodel: {name: tiny-llama}\ndata: {source: customersim, num_examples: 24, max_length: 64}\n"
NO_CANARIES = "data.canaries=null"
GRID_SECOND_RUN_BAD = BASE + "train: {epochs: 1}\ngrid:\n  train.method: [full, dp]\n"  # dp: no ε and no σ


def rows(n: int, **extra) -> list[dict]:
    return [{"text": f"Example number {i} says hello to Ana.", **extra} for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_model_dir(path: Path, *, weights: bool, tokenizer: bool) -> Path:
    from privtune.trainers.models import byte_tokenizer, tiny_config

    tiny_config("tiny-llama", vocab_size=259).save_pretrained(path)
    if weights:
        (path / "model.safetensors").write_bytes(b"only the file name is checked")
    if tokenizer:
        byte_tokenizer().save_pretrained(path)
    return path


def fake_run_dir(path: Path, method: str) -> Path:
    """A folder with the resolved config of a run whose training never finished."""
    path.mkdir()
    (path / "config.resolved.yaml").write_text(BASE + f"train: {{method: {method}}}\n")
    return path


@dataclass
class Case:
    needle: str
    overrides: list[str] = field(default_factory=list)
    body: str = BASE
    commands: tuple[str, ...] = ("validate", "run")
    data: list[dict] | None = None  # written to d.jsonl and passed as data.source (canaries off)
    argv: Callable[[Path], list[str]] | None = None  # a command that takes no config


CASES: dict[str, Case] = {
    # config and overrides
    "malformed yaml": Case("not valid YAML", body=BASE + "train: {method: [lora\n"),
    "unknown field": Case("unknown field 'trian'", body=BASE + "trian: {}\n"),
    "wrong type": Case("field 'data.num_examples'", ["data.num_examples=lots"]),
    "bad override": Case("not key=value", ["data.num_examples"]),
    "missing config file": Case("does not exist", argv=lambda tmp: ["validate", "nope.yaml"]),
    "unknown command flag": Case("unrecognized arguments: --bogus", argv=lambda tmp: ["run", "--bogus", "c.yaml"]),
    "negative learning rate": Case("field 'train.learning_rate'", ["train.learning_rate=-0.001"]),
    "unknown train.method": Case("field 'train.method'", ["train.method=sgd"]),
    "group unit without group_by": Case("data.group_by is not set", ["privacy.unit=group"]),
    "epsilon and sigma both set": Case("not both", ["train.method=dp", "privacy.target_epsilon=8",
                                                    "privacy.noise_multiplier=1"]),
    # model
    "unknown model": Case("acme/never-seen", ["model.name=acme/never-seen"]),
    "model dir without weights": Case("no weights", ["model.name=m"]),
    "model dir without tokenizer": Case("no tokenizer files", ["model.name=m"]),
    "max_length beyond context": Case("beyond the context of model tiny-llama (256 tokens",
                                      ["data.max_length=512"]),
    "lora target matches nothing": Case("matches no module", ["train.method=lora",
                                                              "train.lora.target_modules=[no_such_proj]"]),
    # DP plan
    "sigma 0 without debug": Case("noise_multiplier=0 gives no privacy",
                                  ["train.method=dp", "privacy.noise_multiplier=0"]),
    "dp without epsilon or sigma": Case("needs privacy.target_epsilon or privacy.noise_multiplier",
                                        ["train.method=dp-lora"]),
    "target epsilon on a debug run": Case("target_epsilon is set on a non-private debug run",
                                          ["train.method=dp", "privacy.target_epsilon=8",
                                           "privacy.non_private_debug=true"]),
    "unreachable target epsilon": Case("unreachable", ["train.method=dp", "privacy.target_epsilon=1e-6", "privacy.delta=1e-9"]),
    "batch above N, generated": Case("train.batch_size=40 exceeds the 29 training units",  # 19 + 10 canary copies
                                     ["train.method=full", "train.batch_size=40"]),
    "batch above N, user file": Case("train.batch_size=8 exceeds the 5 training units",
                                     ["train.method=lora"], data=rows(6)),
    "batch above N, users under dp": Case("exceeds the 2 training units",  # 3 users, 1 of them in test
                                          ["train.method=dp", "privacy.noise_multiplier=1", "privacy.unit=group",
                                           "data.group_by=user", "train.batch_size=3"],
                                          data=[{**r, "user": f"u{i % 3}"} for i, r in enumerate(rows(6))]),
    "sweep with a bad later run": Case("needs privacy.target_epsilon", body=GRID_SECOND_RUN_BAD,
                                       commands=("validate", "sweep", "run", "data")),
    "too few canary secrets": Case("possible 1-digit canary secrets",
                                   ["data.canaries.secret_digits=1", "data.canaries.count=11"]),
    # data
    "missing data file": Case("nowhere.jsonl", ["data.source=nowhere.jsonl"], commands=("validate", "data")),
    "span out of range": Case("outside the text of length 14", commands=("validate", "data"),
                              data=[{"text": "call me at 555", "sensitive_spans": [[11, 40, "phone"]]}] * 4),
    "overlapping spans": Case("overlaps", commands=("validate", "data"),
                              data=[{"text": "Ann Lee lives here",
                                     "sensitive_spans": [[0, 7, "name"], [4, 9, "name"]]}] * 4),
    "empty dataset": Case("holds no records", commands=("validate", "data"), data=[]),
    "missing text field": Case("no text field 'text' (fields: body)", commands=("validate", "data"),
                               data=[{"body": "hello"}] * 4),
    "empty split": Case("split would be empty", commands=("validate", "data"), data=rows(1)),
    "group_by missing in a record": Case("no value for the group_by field 'user'", ["data.group_by=user"],
                                         commands=("validate", "data"),
                                         data=[{**r, "user": "u1"} for r in rows(3)] + rows(1)),
    "misspelled spans_field": Case("has the spans field 'spans_feild'", ["data.spans_field=spans_feild"], commands=("validate", "data"),
                                   data=[{**r, "sensitive_spans": []} for r in rows(4)]),
    "spans under another field name": Case("set data.spans_field=pii", commands=("validate", "data"),
                                           data=[{"text": "Ana Lima is here", "pii": [[0, 8, "name"]]},
                                                 *[{**r, "pii": []} for r in rows(3)]]),
    # commands on existing folders
    "report without eval": Case("has no eval/metrics.json",
                                argv=lambda tmp: ["report", str(_mkdir(tmp / "r")), "--out", "rep"]),
    "budget without --delta": Case("needs --delta", argv=lambda tmp: ["budget", str(_mkdir(tmp / "r"))]),
    "budget without ledger": Case("no ledger at",
                                  argv=lambda tmp: ["budget", str(_mkdir(tmp / "r")), "--delta", "1e-5"]),
    "budget calibrate impossible target": Case("unreachable", argv=lambda tmp: [
        "budget", "calibrate", "--epsilon", "0.0001", "--delta", "1e-9", "--sample-rate", "0.9", "--steps", "1000"]),
    "eval on a folder that is not a run dir": Case("is not a privtune run dir",
                                                   argv=lambda tmp: ["eval", str(_mkdir(tmp / "r"))]),
    "eval with a non-eval override": Case("takes only eval.* and performance.* overrides", argv=lambda tmp: [
        "eval", str(fake_run_dir(tmp / "r", "none")), "train.method=lora"]),
    "eval before training": Case("has no trained model yet: run `privtune run CONFIG` first",
                                 argv=lambda tmp: ["eval", str(fake_run_dir(tmp / "r", "lora"))]),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("privtune: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # progress lines may precede it, nothing follows
    assert needle in errors[0], errors[0]
    assert "Traceback" not in err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _argvs(case: Case, tmp: Path) -> list[list[str]]:
    if case.argv is not None:
        return [case.argv(tmp)]
    (tmp / "c.yaml").write_text(case.body)
    overrides = list(case.overrides)
    if case.data is not None:
        overrides += [f"data.source={write_jsonl(tmp / 'd.jsonl', case.data)}", NO_CANARIES]
    return [[command, "c.yaml", *overrides] for command in case.commands]


def test_at_least_25_error_classes():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_exits_2_with_one_line_and_leaves_nothing(workdir, capsys, name):
    case = CASES[name]
    if name.startswith("model dir without"):
        tiny_model_dir(workdir / "m", weights=name.endswith("tokenizer"), tokenizer=False)
    argvs = _argvs(case, workdir)
    before = snapshot(workdir)
    for argv in argvs:
        code = main(argv)
        _, err = capsys.readouterr()
        assert_one_line_error(code, err, case.needle)
        assert snapshot(workdir) == before, f"{argv[0]} left {sorted(snapshot(workdir) - before)}"


def test_version(capsys):
    import privtune

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"privtune {privtune.__version__}\n"


def test_spans_field_left_at_its_default_falls_back_to_regex(workdir, capsys):
    data = write_jsonl(workdir / "d.jsonl", [{"text": "Mail me at ana@example.org", "note": "[1, 2]"}] * 6)
    (workdir / "c.yaml").write_text(BASE)
    code = main(["data", "c.yaml", f"data.source={data}", NO_CANARIES, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["spans_origin"] == "regex"


def test_corrected_rerun_after_a_refused_run(workdir, capsys):
    (workdir / "c.yaml").write_text(BASE)
    fast = ["train.method=dp", "train.max_steps=1", "eval.max_examples=2", "eval.mia=false", "eval.exposure=false",
            "eval.extraction_max_spans=0", "eval.base_model=false"]
    code = main(["run", "c.yaml", *fast, "privacy.noise_multiplier=0"])
    assert_one_line_error(code, capsys.readouterr().err, "gives no privacy")
    assert not (workdir / "runs").exists()
    code = main(["run", "c.yaml", *fast, "privacy.noise_multiplier=1.0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (workdir / "runs" / "t" / "model" / "COMPLETED").exists()
    assert json.loads(out)["run_dir"] == str(Path("runs") / "t")


def test_sweep_runs_over_user_data_without_spans_keep_regex_detection(workdir, capsys):
    # A sweep builds its runs from a full dump of the base config: the default spans_field must not count as set.
    data = write_jsonl(workdir / "d.jsonl", rows(8))
    (workdir / "c.yaml").write_text(BASE + f"grid:\n  data.source: [{data}]\n  data.seed: [0, 1]\n")
    code = main(["validate", "c.yaml", NO_CANARIES, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(json.loads(out)["runs"]) == 2
