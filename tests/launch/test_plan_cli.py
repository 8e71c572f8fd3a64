"""`privtune plan`: the table, the documented --json keys, the refusal (exit 2, one line, a change that fits when
re-planned), bad input, and the one-line plan `privtune run` prints before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from privtune.launch.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "configs" / "cluster" / "llama-2-7b-dp.yaml")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("privtune: error: ") and "Traceback" not in err, err
    return lines[0]


def test_plan_prints_the_table(capsys):
    code, out, err = run_cli(capsys, "plan", RECIPE, "--nodes", "2", "--gpus-per-node", "8")
    assert code == 0 and not err
    for needle in ("Resource plan: meta-llama/Llama-2-7b-hf, dp, fsdp2 on 2 × 8 GPU(s), bf16",
                   "6,738,415,616", "dp clipped sum", "65,536 tokens", "fits"):
        assert needle in out


def test_plan_json_has_exactly_the_documented_keys(capsys):
    code, out, _ = run_cli(capsys, "plan", RECIPE, "--nodes", "2", "--gpus-per-node", "8", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["fits"] is True and doc["fix"] is None
    table = (REPO / "docs" / "cluster-planning.md").read_text().split("## `--json`", 1)[1]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    documented = {key for first, _ in rows for key in re.findall(r"`(\w+)`", first)}
    assert set(doc) == documented
    memory_row = next(meaning for first, meaning in rows if first.strip() == "`memory`")
    assert set(doc["memory"]) == set(re.findall(r"`(\w+)`", memory_row))
    assert doc["memory"]["total"] == doc["memory"]["parameters"] + doc["memory"]["gradients"] + \
        doc["memory"]["optimizer_state"] + doc["memory"]["gathered_parameters"] + doc["memory"]["dp_clipped_sum"] + \
        doc["memory"]["dp_noise_buffers"] + max(doc["phases"].values())
    assert doc["steps"] == -(-3 * doc["training_units"] // 256)  # 3 epochs of the recipe's units, batch 256


def test_refusal_is_one_line_naming_a_change_that_fits(capsys):
    argv = ["plan", RECIPE, "--nodes", "1", "--gpus-per-node", "8", "performance.parallel=ddp"]
    code, out, err = run_cli(capsys, *argv)
    line = one_error_line(err)
    assert code == 2 and "does not fit in 90% of 80 GiB" in line and "Resource plan" in out  # the table first
    fix = re.search(r"try (.*)\.$", line).group(1)
    overrides = re.findall(r"\S+\.\S+=\S+", fix)
    nodes = re.findall(r"--nodes (\d+)", fix)
    assert overrides or nodes
    again = [*argv[:3], nodes[0] if nodes else "1", *argv[4:], *overrides]
    code, out, err = run_cli(capsys, *again)
    assert code == 0 and "fits" in out and not err


def test_refusal_with_json_prints_the_document_then_the_line(capsys):
    code, out, err = run_cli(capsys, "plan", RECIPE, "--nodes", "1", "--gpus-per-node", "8",
                             "performance.micro_batch_size=64", "--json")
    doc = json.loads(out)
    assert code == 2 and doc["fits"] is False and re.fullmatch(r"performance\.micro_batch_size=\d+", doc["fix"])
    assert f"try {doc['fix']}." in one_error_line(err)


@pytest.mark.parametrize("argv, needle", [
    (["--nodes", "0"], "--nodes 0 is not a positive integer"),
    (["--gpu-memory", "-1"], "--gpu-memory -1 is not a positive number"),
    (["model.name=acme/never-seen"], "acme/never-seen' has no shapes known offline"),
    (["performance.parallel=single", "--gpus-per-node", "2"], "single runs one process"),
    (["train.method=none"], "nothing to plan"),
    (["--nodes", "two"], "invalid int value"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, "plan", RECIPE, *argv)
    assert code == 2 and needle in one_error_line(err)


def test_run_prints_the_plan_summary_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nmodel: {name: tiny-llama}\ndata: {source: customersim, num_examples: 24, max_length: 64}\n"
                   "train: {method: lora, batch_size: 4, max_steps: 1}\neval: {max_examples: 4}\n")
    code, _, err = run_cli(capsys, "run", str(cfg))
    assert code == 0
    lines = [line for line in err.splitlines() if line.lstrip().startswith("plan ")]
    assert len(lines) == 1, err
    assert "GiB per GPU of 80 GiB: fits; lora ddp on 1 GPU(s), micro-batch 8 × 64 tokens, fp32" in lines[0]
    assert "GPU-memory plan for this run's world size 1; it runs on CPU" in lines[0]
    assert err.index(lines[0]) < err.index("train lora")  # before the training itself
