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
