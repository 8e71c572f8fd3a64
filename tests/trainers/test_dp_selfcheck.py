"""The DP engine's self-check: plain autograd on a few sampled units against the engine's clipped contributions.

First: no false alarm on the four tiny families, full and LoRA. Then the three ways a model can make the engine's
update wrong without breaking its norm bound — each must stop the step with an error before anything is released.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privtune.trainers.dp import DPEngine, DPInvariantError, DPRefusal, per_example_loss
from privtune.trainers.dp.selfcheck import self_check

FAMILIES = ("tiny-llama", "tiny-pythia", "tiny-gemma", "tiny-qwen")


def _batch(rows: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        mask[r, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _inputs(ids, mask, labels):
    def inputs(rows: list[int]):
        return ids[rows], mask[rows], labels[rows]
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_no_false_alarm_on_the_tiny_families(dpref, family, mode):
    model = dpref.tiny_model(family, mode, dtype=torch.float32)
    engine = DPEngine(model, clip_norm=0.5)
    ids, mask, labels = _batch(4, 12)
    worst = self_check(engine, _inputs(ids, mask, labels), [[0], [2, 3]])  # one unit of 1 row, one of 2 rows
    assert worst < 1e-4


class FunctionalTiedHead(nn.Module):
    """A head computed as F.linear(h, embed.weight), as some remote-code models do: no module call of the weight."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]  # not a child module: the weight is used outside its own module

    def forward(self, h):
        return F.linear(h, self._embedding[0].weight)


def test_a_weight_used_outside_its_module_is_caught(dpref):
    model = dpref.tiny_model("tiny-llama", "full", dtype=torch.float32)
    model.lm_head = FunctionalTiedHead(model.model.embed_tokens)
    engine = DPEngine(model, clip_norm=0.5)
    ids, mask, labels = _batch(4, 12)
    with pytest.raises(DPInvariantError, match="self-check failed.*embed_tokens"):
        self_check(engine, _inputs(ids, mask, labels), [[1]])


def test_an_instance_patched_forward_is_caught(dpref):
    model = dpref.tiny_model("tiny-llama", "full", dtype=torch.float32)
    norm, embedding = model.model.norm, model.model.embed_tokens
    original = norm.forward

    def patched(h):  # also reads the embedding weight: a use no hook of the embedding sees
        return original(h) + 0.5 * F.linear(h, embedding.weight)[..., : h.shape[-1]]

    norm.forward = patched
    engine = DPEngine(model, clip_norm=0.5)
    ids, mask, labels = _batch(4, 12)
    with pytest.raises(DPInvariantError, match="self-check failed"):
        self_check(engine, _inputs(ids, mask, labels), [[0]])


def test_a_patched_linear_forward_is_no_longer_trusted_as_plain(dpref):
    model = dpref.tiny_model("tiny-llama", "full", dtype=torch.float32)
    proj = model.model.layers[0].mlp.down_proj
    proj.forward = lambda x: F.linear(x, 2.0 * proj.weight, proj.bias)
    engine = DPEngine(model, clip_norm=0.5)
    ids, mask, labels = _batch(4, 12)
    with pytest.raises(DPRefusal, match="down_proj"):
        with engine.micro_batch(torch.arange(4)):
            logits = model(input_ids=ids, attention_mask=mask).logits
            engine.backward(per_example_loss(logits, labels))


class SequenceFirst(nn.Module):
    """Runs its linear on (T, B, d): with T == B, ``shape[0] == rows`` holds and positions look like units."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.transpose(0, 1)).transpose(0, 1)


def test_a_sequence_first_linear_with_t_equal_to_b_is_refused(dpref):
    model = dpref.tiny_model("tiny-llama", "full", dtype=torch.float32)
    layer = model.model.layers[0].mlp
    layer.down_proj = SequenceFirst(layer.down_proj)
    engine = DPEngine(model, clip_norm=0.5)
    ids, mask, labels = _batch(8, 8)  # B == T: no shape check on this batch can tell rows from positions ...
    with pytest.raises(DPRefusal, match="down_proj"):  # ... but the self-check's one-unit probe (B = 1) does
        self_check(engine, _inputs(ids, mask, labels), [[0]])
    ids, mask, labels = _batch(4, 8)  # and with B != T the micro-batch itself is refused
    with pytest.raises(DPRefusal, match="down_proj"):
        with engine.micro_batch(torch.arange(4), sequence_length=8):
            logits = model(input_ids=ids, attention_mask=mask).logits
            engine.backward(per_example_loss(logits, labels))


class RowsThenChannels(nn.Module):
    """Feeds its linear (B, d, T)-shaped activations transposed back as (B, T', d) with T' != T: shape[0] == rows
    holds, the sequence axis does not."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        b, t, d = x.shape
        return self.linear(x.reshape(b, t // 2, 2 * d)[..., :d]).repeat_interleave(2, dim=1)


def test_a_linear_whose_second_axis_is_not_the_sequence_is_refused(dpref):
    model = dpref.tiny_model("tiny-llama", "full", dtype=torch.float32)
    layer = model.model.layers[0].mlp
    layer.down_proj = RowsThenChannels(layer.down_proj)
    engine = DPEngine(model, clip_norm=0.5)
    ids, mask, labels = _batch(4, 8)
    with pytest.raises(DPRefusal, match=r"down_proj.*\(rows, sequence\) = \(4, 8\)"):
        with engine.micro_batch(torch.arange(4), sequence_length=8):
            logits = model(input_ids=ids, attention_mask=mask).logits
            engine.backward(per_example_loss(logits, labels))


def test_the_recipe_stops_before_releasing_anything(tmp_path, monkeypatch, capsys):
    from privtune.launch.cli import main
    from privtune.trainers import models

    real = models.load_model

    def load_with_functional_head(name, **kwargs):
        model, tokenizer = real(name, **kwargs)
        model.lm_head = FunctionalTiedHead(model.model.embed_tokens)
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", load_with_functional_head)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "name": "bad", "output_dir": str(tmp_path / "runs"), "model": {"name": "tiny-llama"},
        "data": {"source": "customersim", "num_examples": 24, "max_length": 40, "canaries": None},
        "train": {"method": "dp", "max_steps": 2, "batch_size": 6}, "privacy": {"noise_multiplier": 1.0},
    }))
    assert main(["run", str(cfg)]) == 2
    _, err = capsys.readouterr()
    assert "self-check failed" in err and "Traceback" not in err
    run = tmp_path / "runs" / "bad"
    assert not (run / "model").exists() and not (run / "checkpoints").exists()
    ledger = json.loads((run / "ledger.json").read_text())
    assert all(e["event"].get("steps", 0) == 0 for e in ledger["entries"])  # no step was counted or released
