"""privtune report: rows (run column, one base row per group, stable order, one ε notation), rows.json = rows.csv,
every plot written, and the training-log reader.

The fake run dirs start from one real tiny run's config.resolved.yaml and eval/metrics.json, so their structure is
the pipeline's; the numbers that a 4-example run leaves empty (sensitive-token attack, memorization) are filled in.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from privtune.errors import UserError
from privtune.eval.plots import place_labels
from privtune.eval.report import load_run, read_train_log, row_of, write_report
from privtune.eval.stats import roc_curve, roc_metrics

# (name, dataset, method, lora r, ε (None: no formal guarantee), train-sensitive NLL drop, test non-sens NLL)
RUNS = [
    ("cs-lora-r16", "customersim", "lora", 16, None, 0.68, 1.85),
    ("cs-dp-eps2", "customersim", "dp", None, 2.0, 0.02, 3.19),
    ("cs-full", "customersim", "full", None, None, 1.29, 1.10),
    ("cs-dp-lora-debug", "customersim", "dp-lora", 8, None, 0.30, 2.90),
    ("cs-dp-eps8", "customersim", "dp", None, 8.0, 0.05, 3.14),
    ("sb-lora-r4", "synbio", "lora", 4, None, 0.97, 2.19),
]
ORDER = [("base model", "customersim", "base"), ("cs-full", "customersim", "full"),
         ("cs-lora-r16", "customersim", "lora"), ("cs-dp-eps8", "customersim", "dp"),
         ("cs-dp-eps2", "customersim", "dp"), ("cs-dp-lora-debug", "customersim", "dp-lora"),
         ("base model", "synbio", "base"), ("sb-lora-r4", "synbio", "lora")]
EPS_CELLS = ["0", "∞", "∞", "8.00", "2.00", "∞", "0", "∞"]
PLOTS = ["privacy_utility.png", "roc.png", "exposure.png", "training_curves.png"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, one_torch_thread):
    from privtune.launch.cli import main

    tmp = tmp_path_factory.mktemp("real")
    cfg = {"name": "t", "model": {"name": "tiny-llama"},
           "data": {"source": "customersim", "num_examples": 24, "max_length": 64},
           "train": {"method": "lora", "max_steps": 2, "batch_size": 4}, "eval": {"max_examples": 4},
           "output_dir": str(tmp / "runs")}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "cfg.yaml"), "--json"]) == 0
    return tmp / "runs" / "t"


def _attack(auc_shift: float, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    members, nonmembers = rng.normal(auc_shift, 1.0, 12), rng.normal(0.0, 1.0, 12)
    curve = roc_curve(members, nonmembers)
    return (roc_metrics(members, nonmembers, n_bootstrap=50, seed=0),
            {"fpr": curve["fpr"].tolist(), "tpr": curve["tpr"].tolist()})


def _fake_run(real: Path, root: Path, i: int, spec: tuple) -> Path:
    name, dataset, method, r, eps, drop, test_ns = spec
    cfg = yaml.safe_load((real / "config.resolved.yaml").read_text())
    metrics = json.loads((real / "eval" / "metrics.json").read_text())
    cfg.update(name=name)
    cfg["data"]["source"], cfg["train"]["method"] = dataset, method
    if r:
        cfg["train"]["lora"]["r"] = r
    cfg["privacy"]["non_private_debug"] = method.startswith("dp") and eps is None
    m = copy.deepcopy(metrics)
    base_train_sens = 4.0 if dataset == "customersim" else 5.5
    for label, train_sens, test_nll in (("base", base_train_sens, 3.2), ("trained", base_train_sens - drop, test_ns)):
        m[label]["grid"]["train_sensitive"]["nll_mean"] = train_sens
        m[label]["grid"]["test_sensitive"]["nll_mean"] = base_train_sens - 0.1
        m[label]["grid"]["test_nonsensitive"]["nll_mean"] = test_nll
        readings = m[label]["readings"]
        readings.update(privacy_train_sensitive_nll=train_sens, utility_test_nonsensitive_nll=test_nll,
                        privacy_train_test_gap=base_train_sens - 0.1 - train_sens)
        if label == "trained":
            readings["privacy_gain_over_base"] = drop
        stats, curve = _attack(2.0 * drop if label == "trained" else 0.0, seed=i if label == "trained" else 99)
        m["mia"][label]["sensitive"]["loss"] = stats
        m["mia"][label]["roc"]["sensitive/loss"] = curve
        m["exposure"][label][0]["exposure"] = 10.0 * drop if label == "trained" else 1.0
    m["method"] = method
    m["guarantee"] = {"accountant": "pld" if eps else None, "delta": 1e-3 if method.startswith("dp") else None,
                      "epsilon": eps, "note": "", "unit": "example"}
    m["cost"]["wall_seconds"] = 10.0 + 5 * i
    run_dir = root / name
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(m, indent=2))
    for stage in ("data", "model", "eval"):  # the stage records: the report checks scores are of this model
        (run_dir / stage).mkdir(exist_ok=True)
        shutil.copy(real / stage / "COMPLETED", run_dir / stage / "COMPLETED")
    if method.startswith("dp") or method == "full":
        lines = []
        for step in range(1, 5):
            entry = {"step": step, "loss": 3.0 - 0.1 * step, "learning_rate": 1e-3, "tokens": 100, "seconds": 0.5,
                     "tokens_per_second": 200.0}
            if method.startswith("dp"):
                entry.update(clipped_fraction=1.0 - 0.1 * step, epsilon=None if eps is None else eps * step / 4,
                             delta=1e-3, unit_norm_quantiles={"p10": 1.0, "p50": 2.0, "p90": 3.0, "max": 4.0})
            lines.append(json.dumps(entry))
        torn = '{"step": 5, "loss": 2.' if method == "full" else ""
        (run_dir / "logs").mkdir()
        (run_dir / "logs" / "train.jsonl").write_text("\n".join(lines) + "\n" + torn)
    return run_dir


@pytest.fixture(scope="module")
def report(real_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    dirs = [_fake_run(real_run, root / "runs", i, spec) for i, spec in enumerate(RUNS)]
    out = root / "report"
    return write_report(dirs, out, command="privtune report ..."), out


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_report_md_has_a_run_column_one_base_row_per_group_and_the_stable_order(report):
    _, out = report
    head, body = _table((out / "report.md").read_text())
    assert head[:4] == ["run", "model", "dataset", "method"]
    assert [(row[0], row[2], row[3]) for row in body] == ORDER
    ranks = [row[head.index("r")] for row in body]
    assert ranks == ["—", "—", "16", "—", "—", "8", "—", "4"]


def test_epsilon_has_one_notation_in_table_json_and_csv(report):
    result, out = report
    md = (out / "report.md").read_text()
    head, body = _table(md)
    assert [row[head.index("ε")] for row in body] == EPS_CELLS
    assert "ε = ∞: no formal privacy guarantee (non-DP method or non-private debug run)" in md
    rows = json.loads((out / "rows.json").read_text())
    assert rows == json.loads(json.dumps(result["rows"]))
    assert [r["epsilon"] for r in rows] == [0.0, None, None, 8.0, 2.0, None, 0.0, None]
    assert [r["guarantee"] for r in rows] == ["dp", "none", "none", "dp", "dp", "none", "dp", "none"]
    assert rows[0]["run"] is None and rows[0]["base_from"] in {name for name, *_ in RUNS}
    assert rows[0]["memorized"] == 0.0 and rows[1]["memorized"] == pytest.approx(1.29)


def test_rows_csv_parses_and_equals_rows_json(report):
    _, out = report
    rows = json.loads((out / "rows.json").read_text())
    with open(out / "rows.csv", newline="") as f:
        parsed = list(csv.DictReader(f))
    assert len(parsed) == len(rows)
    for want, got in zip(rows, parsed, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if value is None:
                assert got[key] == "", key
            elif isinstance(value, (int, float)):
                assert float(got[key]) == value, key
            else:
                assert got[key] == str(value), key


def test_every_plot_is_written_and_listed(report):
    result, out = report
    assert result["plots"] == PLOTS
    assert sorted(p.name for p in out.glob("*.png")) == sorted(PLOTS)
    md = (out / "report.md").read_text()
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name})" in md
    assert "not differentially private" in md


def test_report_of_the_real_run_as_the_pipeline_wrote_it(real_run, tmp_path):
    result = write_report([real_run], tmp_path / "out", command="privtune report t")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(result["plots"])
    assert "privacy_utility.png" in result["plots"] and "exposure.png" in result["plots"]
    assert [r["method"] for r in result["rows"]] == ["base", "lora"]
    assert result["rows"][1]["run"] == "t" and result["rows"][1]["guarantee"] == "none"
    assert result["rows"][1]["exposure_limit"] == pytest.approx(np.log2(10**6))
    assert row_of(load_run(real_run))["lora_r"] == 8


def test_read_train_log_drops_a_torn_last_line_keeps_the_last_record_of_a_step(tmp_path):
    assert read_train_log(tmp_path) == []
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "train.jsonl"
    log.write_text('{"step": 2, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert read_train_log(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.5}]
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(UserError, match="line 2"):
        read_train_log(tmp_path)


def test_placed_labels_do_not_overlap_each_other(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    points = [(3.0 + 0.02 * i, 0.05 - 0.005 * i) for i in range(8)]
    ax.scatter(*zip(*points, strict=True), s=200)
    ax.set_xlim(0, 4)
    ax.set_ylim(-0.5, 1.5)
    fig.tight_layout()
    texts = place_labels(ax, points, [f"dp-lora r=16 ε={i}" for i in range(8)], [7.0] * 8)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text, without its leader line
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    plt.close(fig)


def test_sweep_comparison_uses_the_report_order_and_epsilon_notation():
    from rich.console import Console

    from privtune.launch.sweep import render_comparison

    def row(method, eps=None, r=None):
        return {"run": f"x-{method}-{eps}", "model": "m", "dataset": "d", "method": method, "lora_r": r,
                "train_sensitive_nll": 1.0, "train_nonsensitive_nll": 1.0, "test_sensitive_nll": 1.0,
                "test_nonsensitive_nll": 1.0, "memorized": 0.1, "epsilon": eps,
                "guarantee": "dp" if eps is not None else "none", "train_seconds": 1.0, "tokens_per_second": 1.0,
                "peak_memory_mb": 1, "trainable_parameters": 1}

    grid = {c: {"nll_mean": 3.0} for c in ("train_sensitive", "train_nonsensitive", "test_sensitive",
                                           "test_nonsensitive")}
    rows = [row("dp", 2.0), row("lora", r=4), row("dp", 8.0), row("full")]
    console = Console(record=True, width=200)
    console.print(render_comparison("t", rows, {("m", "d"): grid}))
    text = console.export_text()
    lines = [line for line in text.splitlines()
             if "│" in line and line.split("│")[2].strip().replace(".", "").isdigit()]  # data rows only
    methods = [line.split("│")[1].strip() for line in lines]
    assert methods == ["base model", "full", "lora r=4", "dp", "dp"]
    eps = [line.split("│")[7].strip() for line in lines]
    assert eps == ["0", "∞", "∞", "8.00", "2.00"]
    assert "ε = ∞: no formal privacy guarantee" in text
