"""Released outputs travel: a run's model/ copied elsewhere loads offline, and names its base by a stable id."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from privtune.launch.cli import main
from privtune.trainers.model_ids import EMBEDDED_HUB_ID, hub_id
from privtune.trainers.models import build_tiny, load_trained
from privtune.trainers.output import Guarantee, card_text

BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "num_examples": 24, "max_length": 48, "canaries": None},
    "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
    "eval": {"max_examples": 2, "exposure": False, "extraction_max_spans": 0, "mia": False},
}


def _train(tmp_path, method: str):
    tree = json.loads(json.dumps(BASE))
    tree.update(name=method, output_dir=str(tmp_path / "runs"))
    tree["train"]["method"] = method
    if method.startswith("dp"):
        tree["privacy"] = {"noise_multiplier": 1.0}
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(json.dumps(tree))
    assert main(["run", str(cfg)]) == 0
    return tmp_path / "runs" / method / "model"


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_moved_model_dir_loads_offline_and_equals_the_original(tmp_path, method, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = _train(tmp_path, method)
    original, _ = load_trained(model_dir)
    moved = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(model_dir, moved)
    shutil.rmtree(tmp_path / "runs")  # nothing of the run dir is left to lean on
    copy, tokenizer = load_trained(moved)
    torch.testing.assert_close(_logits(copy), _logits(original), rtol=0, atol=0)
    assert tokenizer("abc").input_ids
    meta = json.loads((moved / "privtune.json").read_text())
    assert meta["base_model"] == "tiny-llama"
    if method == "lora":  # plain peft, no privtune: the adapter on a base model built by the user
        from peft import PeftModel

        config = json.loads((moved / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tiny-llama"  # never a path into a local cache
        base, _ = build_tiny("tiny-llama", seed=0)
        plain = PeftModel.from_pretrained(base, str(moved), local_files_only=True)
        torch.testing.assert_close(_logits(plain), _logits(original), rtol=0, atol=0)
    else:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(moved), local_files_only=True)
        torch.testing.assert_close(_logits(plain), _logits(original), rtol=0, atol=0)


def test_the_embedded_base_is_named_by_its_hub_id_for_plain_users():
    assert hub_id("smollm2-135m") == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("tiny-llama") is None
    card = card_text(method="lora", base_model="smollm2-135m", base_hub_id=EMBEDDED_HUB_ID, data_source="x",
                     guarantee=Guarantee(None, None, None, "example", "none"), steps=1)
    front = card.split("---")[1]
    assert f"base_model: {EMBEDDED_HUB_ID}" in front  # what the hub and transformers read
    assert "`smollm2-135m`" in card  # what privtune resolves offline
