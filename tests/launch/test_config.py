"""The typed config: every shipped YAML validates; bad configs are refused with a line naming the field."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from privtune.errors import UserError
from privtune.launch.config import PrivacyConfig, RunConfig, apply_overrides, load_config
from privtune.launch.sweep import load_sweep

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path):
    _, runs = load_sweep(path)  # a plain config is a sweep of one run
    assert runs and all(isinstance(cfg, RunConfig) for cfg in runs)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# privtune "), "a shipped config's header shows the exact command that runs it"
    assert path.name in first_line or str(path.relative_to(REPO)) in first_line


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: x\nmodle: {name: tiny-llama}\n", "unknown field 'modle'"),
        ("name: x\ntrain: {methd: lora}\n", "unknown field 'train.methd'"),
        ("name: x\ntrain: {batch_size: many}\n", "field 'train.batch_size'"),
        ("name: x\ntrain: {method: sgd-magic}\n", "field 'train.method'"),
        ("name: x\nprivacy: {target_epsilon: 3, noise_multiplier: 1}\n", "not both"),
        ("name: x\nprivacy: {unit: group}\n", "data.group_by"),
        ("name: x\ndata: {canaries: {pattern: no placeholder}}\n", "{secret}"),
        ("train: {method: lora}\n", "missing required field 'name'"),
        ("name: x\ntrain: [1, 2\n", "not valid YAML at line 3"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, needle):
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, text))
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        load_config("no/such/config.yaml")


def test_overrides_are_typed_and_checked(tmp_path):
    p = _write(tmp_path, "name: x\n")
    cfg = load_config(p, ["train.method=lora", "train.lora.r=4", "data.num_examples=12", "privacy.clip_norm=0.5"])
    assert (cfg.train.method, cfg.train.lora.r, cfg.data.num_examples, cfg.privacy.clip_norm) == ("lora", 4, 12, 0.5)
    with pytest.raises(UserError, match="unknown field 'train.lr'"):
        load_config(p, ["train.lr=3"])
    with pytest.raises(UserError, match="not key=value"):
        load_config(p, ["train.method"])


def test_override_into_scalar_is_refused():
    with pytest.raises(UserError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_privacy_config_is_frozen():
    privacy = PrivacyConfig(target_epsilon=3.0)
    with pytest.raises(ValidationError, match="frozen"):
        privacy.clip_norm = 5.0  # type: ignore[misc]
    assert privacy.clip_norm == 1.0


CLUSTER = sorted((REPO / "configs" / "cluster").glob("*.yaml"))


def test_cluster_recipes_cover_the_methods_and_models():
    names = {p.stem for p in CLUSTER}
    assert {f"llama-2-{size}-{m}" for size in ("7b", "13b") for m in ("dp-lora", "dp", "lora", "full")} <= names
    assert {"pythia-6.9b-dp-lora", "gemma-7b-dp-lora", "qwen2.5-7b-dp-lora"} <= names


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_cluster_header_states_the_commands_and_the_plan_memory_now(path, capsys):
    """Line 1: the plan command; line 2: its memory per GPU, as `privtune plan --json` computes it now; line 3:
    the torchrun command for the same nodes (regenerate line 2 with `python docs/cluster_planning.py --write`)."""
    import json
    import re

    from privtune.launch.cli import main

    rel = str(path.relative_to(REPO))
    plan_line, memory_line, torchrun_line = path.read_text().splitlines()[:3]
    nodes = int(re.fullmatch(rf"# privtune plan {re.escape(rel)} --nodes (\d+) --gpus-per-node 8", plan_line).group(1))
    assert torchrun_line.startswith(f"# torchrun --nnodes {nodes} --nproc_per_node 8 ")
    assert torchrun_line.endswith(f" -m privtune run {rel}")
    assert main(["plan", str(path), "--nodes", str(nodes), "--gpus-per-node", "8", "--json"]) == 0  # it fits
    plan = json.loads(capsys.readouterr().out)
    figure = re.fullmatch(r"# memory per GPU \(privtune plan\): ([\d.]+) GiB of 80 GiB \(.*\)", memory_line)
    assert figure and float(figure.group(1)) == round(plan["memory"]["total"] / 2**30, 1)
    assert f"({plan['parallel']}, {8 * nodes} GPUs, micro-batch {plan['micro_batch_size']} × 256, bf16)" in memory_line
