"""Smoke test of benchmarks/dp_overhead.py on tiny-llama: every configuration runs one step on the CPU and returns
finite numbers (no timing assertions), and privtune's DP update equals Opacus's on the same batch with noise off.

The cross-check compares what each hands to the optimizer in the first step (sigma = 0): privtune ``dp`` against
Opacus hooks mode (per-sample gradients instantiated, tied embedding / LM head included), ``dp-untied`` against
Opacus ghost clipping (which refuses tied parameters), and ``dp-lora`` against both Opacus modes on LoRA.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dp_overhead.py"
TINY = dict(model_name="tiny-llama", batch=4, seq=16, steps=1, warmup=0, device="cpu", threads=1)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dp_overhead_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(bench, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bench.run_config(name, **{**TINY, **kw})


@pytest.mark.usefixtures("one_thread")
def test_every_configuration_runs_and_returns_finite_numbers(bench):
    for name in bench.CONFIGS:
        r = _run(bench, name)
        if name == "opacus-ghost":  # tied embedding / LM head: Opacus ghost clipping refuses, and we record why
            assert r["status"] == "error" and "tying" in r["error"], r
            continue
        assert r["status"] == "ok", (name, r.get("traceback"))
        assert r["finite"], (name, r["losses"])
        assert math.isfinite(r["step_s"]) and r["step_s"] > 0
        assert r["peak_mem_bytes"] >= 0 and r["trainable_params"] > 0
        assert r["phases"] and all(math.isfinite(v) and v >= 0 for v in r["phases"].values())


def _relative_error(actual: dict, expected: dict) -> float:
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    a = torch.cat([actual[n].double().flatten() for n in sorted(expected)])
    e = torch.cat([expected[n].double().flatten() for n in sorted(expected)])
    assert float(e.norm()) > 0
    return float((a - e).norm() / e.norm())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("clip_norm", [1e-3, 1e3])  # every example clipped / none clipped
@pytest.mark.parametrize("ours, theirs", [("dp", "opacus-hooks"), ("dp-untied", "opacus-ghost-untied"),
                                          ("dp-lora", "opacus-hooks-lora"), ("dp-lora", "opacus-ghost-lora")])
def test_privtune_update_equals_opacus_update_without_noise(bench, ours, theirs, clip_norm):
    got = _run(bench, ours, sigma=0.0, clip_norm=clip_norm, capture_update=True)
    ref = _run(bench, theirs, sigma=0.0, clip_norm=clip_norm, capture_update=True)
    assert got["status"] == "ok" and ref["status"] == "ok", (got.get("error"), ref.get("error"))
    assert _relative_error(got["update"], ref["update"]) < 1e-4


def test_section_replacement_keeps_other_sections(bench, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n<!-- other:start -->\nother section\n<!-- other:end -->\n")
    bench.write_section(out, "first body\n")
    bench.write_section(out, "second body\n")
    text = out.read_text()
    assert "other section" in text and "second body" in text and "first body" not in text
    assert text.count(bench.MARK_START) == 1 and text.count(bench.MARK_END) == 1
    assert text.count("## DP overhead (issue 5)") == 1


def test_markdown_renders_groups_ratios_and_failures(bench):
    ok = {"name": "full", "status": "ok", "impl": "plain", "trainable_params": 10, "step_s": 2.0, "cpu_s": 3.0,
          "tokens_per_s": 5.0, "peak_mem_bytes": 2**20, "phases": {"forward": 1.0, "backward": 0.8, "optimizer": 0.2},
          "phase_peak_mem_bytes": {"forward": 2**20}}
    dp = dict(ok, name="dp", impl="privtune", step_s=2.4, phases={"forward": 1.0, "backward": 1.1,
              "backward/autograd": 0.8, "backward/engine._consume": 0.3, "dp post": 0.1, "optimizer": 0.2})
    failed = {"name": "opacus-ghost", "status": "error", "error": "NotImplementedError: Parameter tying"}
    groups = [{"configs": ["full", "dp"], "results": {"full": ok, "dp": dp}, "load_start": 0.1, "load_end": 0.2},
              {"configs": ["opacus-ghost"], "results": {"opacus-ghost": failed}, "load_start": 0.2, "load_end": 0.2}]
    ratios = bench.compute_ratios(groups)
    assert ratios[0]["label"] == "dp / full" and abs(ratios[0]["time"] - 1.2) < 1e-12 and ratios[0]["meets"]
    meta = dict(date="d", command="c", wall_min=1.0, machine=bench.machine_info("cpu"), threads=2, load_before=0.1,
                waited_s=0, max_load=2.5, omp_wait_policy="PASSIVE", model="m", batch=8, seq=128, bf16=False,
                clip_norm=1.0, sigma=1.0, steps=3, warmup=1)
    text = bench.results_markdown(groups, ratios, meta)
    assert "| dp / full | 1 | 1.200x" in text and "Parameter tying" in text and "engine._consume 0.30" in text
