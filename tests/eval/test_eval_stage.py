"""The eval stage: resumes an interrupted eval without rescoring, and 2 sharded processes equal 1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import privtune.eval.stage as stage
from privtune.launch.config import config_from_dict
from privtune.launch.pipeline import ensure_data, run_eval_stage

BASE = {
    "name": "ev",
    "model": {"name": "tiny-qwen"},
    "data": {"source": "synbio", "num_examples": 30, "max_length": 64},
    "eval": {"batch_size": 2, "max_examples": 12},
}


def make_cfg(tmp_path: Path, name: str = "ev"):
    return config_from_dict({**BASE, "name": name, "output_dir": str(tmp_path / "runs")})


def read_scores(run_dir: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "eval").glob("scores.*.jsonl"))}


def assert_same_scores(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for ra, rb in zip(a[name], b[name], strict=True):
            assert (ra["i"], ra["tokens"], ra["hits"]) == (rb["i"], rb["tokens"], rb["hits"]), name
            assert ra["nll_mean"] == pytest.approx(rb["nll_mean"], rel=tol, abs=tol), name


def test_interrupted_eval_resumes_without_rescoring(tmp_path, monkeypatch):
    reference_cfg = make_cfg(tmp_path, "reference")
    ensure_data(reference_cfg)
    run_eval_stage(reference_cfg, reference_cfg.run_dir)

    cfg = make_cfg(tmp_path, "interrupted")
    ensure_data(cfg)
    real = stage.iter_scored
    scored: list[int] = []

    def dies_after_two_batches(*args, **kwargs):
        for n, rows in enumerate(real(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt  # as if the job were killed mid-eval
            scored.extend(i for i, _, _ in rows)
            yield rows

    monkeypatch.setattr(stage, "iter_scored", dies_after_two_batches)
    shutil.rmtree(tmp_path / "runs" / ".cache")  # base-model scores are cached across runs of the same data
    with pytest.raises(KeyboardInterrupt):
        run_eval_stage(cfg, cfg.run_dir)
    assert not (cfg.run_dir / "eval").exists(), "no half-published eval dir"
    assert len(scored) == 4

    rescored: list[int] = []

    def counting(*args, **kwargs):
        for rows in real(*args, **kwargs):
            rescored.extend(i for i, _, _ in rows)
            yield rows

    monkeypatch.setattr(stage, "iter_scored", counting)
    run_eval_stage(cfg, cfg.run_dir)
    examples = json.loads((reference_cfg.run_dir / "eval" / "metrics.json").read_text())["examples"]
    assert len(rescored) == examples["train"] + examples["test"] - len(scored), "no example is scored twice"
    assert_same_scores(read_scores(cfg.run_dir), read_scores(reference_cfg.run_dir))
    assert not (cfg.run_dir / ".eval_parts").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_sharded_eval_equals_one_process(tmp_path):
    one, two = make_cfg(tmp_path, "one"), make_cfg(tmp_path, "two")
    for cfg in (one, two):
        ensure_data(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r1 = subprocess.run([sys.executable, "-m", "privtune", "eval", str(one.run_dir), "--json"], env=env,
                        capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr[-2000:]
    shutil.rmtree(tmp_path / "runs" / ".cache")
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(free_port()), "-m", "privtune", "eval", str(two.run_dir), "--json"], env=env,
                        capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1 = json.loads((one.run_dir / "eval" / "metrics.json").read_text())
    m2 = json.loads((two.run_dir / "eval" / "metrics.json").read_text())
    assert m2["scoring"]["world_size"] == 2 and m1["scoring"]["world_size"] == 1
    for cell, values in m1["base"]["grid"].items():
        assert values["tokens"] == m2["base"]["grid"][cell]["tokens"]
        assert values["nll_mean"] == pytest.approx(m2["base"]["grid"][cell]["nll_mean"], rel=1e-5)
    assert_same_scores(read_scores(one.run_dir), read_scores(two.run_dir))


def test_base_model_measures_are_computed_once_per_data_and_settings(tmp_path, monkeypatch):
    first = make_cfg(tmp_path, "first")
    ensure_data(first)
    first_metrics = run_eval_stage(first, first.run_dir)
    assert first_metrics["exposure"]["base"] and first_metrics["extraction"]["base"]

    import privtune.eval.exposure as exposure
    import privtune.eval.extraction as extraction

    def must_not_run(*args, **kwargs):
        raise AssertionError("the base model's measures should come from the cache")

    monkeypatch.setattr(exposure, "canary_exposure", must_not_run)
    monkeypatch.setattr(extraction, "extract_spans", must_not_run)
    second = make_cfg(tmp_path, "second")  # same model, data and eval settings
    ensure_data(second)
    second_metrics = run_eval_stage(second, second.run_dir)
    assert second_metrics["exposure"] == first_metrics["exposure"]
    assert second_metrics["extraction"] == first_metrics["extraction"]

    changed = config_from_dict({**BASE, "name": "third", "output_dir": str(tmp_path / "runs"),
                                "eval": {**BASE["eval"], "exposure_sample_size": 64}})
    inputs = stage.stage_inputs(second, second.run_dir)
    assert stage._base_measures_path(changed, inputs) != stage._base_measures_path(second, inputs)
