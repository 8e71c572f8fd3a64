"""DP-SFT through TRL's SFTTrainer (trainers/sft/): the released step against brute force, the accountant's step
count under gradient accumulation, the refusals, and a dp-lora run end to end.

The brute-force reference is the one of tests/trainers/conftest.py (``dpref``): each sampled example forwarded
alone in fp64 with plain autograd, its loss the mean NLL over its completion tokens, clipped to C, summed. It never
touches the DP engine, TRL or the trainer under test.
"""

from __future__ import annotations

import copy
import json
import random
import types

import pytest
import torch
from run_configs import config_with
from transformers import TrainerCallback

from privtune.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8
BASE = {
    "name": "sft",
    "model": {"name": "tiny-llama"},
    "data": {"source": "customersim", "max_length": 128},
    "train": {"method": "dp", "max_steps": 1, "batch_size": 6, "learning_rate": 1e-2, "self_check_every": None},
    "privacy": {"noise_multiplier": 0.0, "non_private_debug": True, "clip_norm": 1.0, "reproducible": True},
    "performance": {"micro_batch_size": 2, "parallel": "single"},
}


def make_cfg(tmp_path, **sections):
    return config_with(BASE, tmp_path, **sections)


def records(n: int = N, seed: int = 0):
    """Prompt/completion pairs of different lengths (byte-level tokens: one per character)."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = ["order", "refund", "late", "parcel", "account", "card", "help", "thanks", "where", "is", "my"]
    rows = [{"prompt": "Q: " + " ".join(rng.choices(words, k=rng.randint(2, 5))) + "\nA:",
             "completion": " " + " ".join(rng.choices(words, k=rng.randint(1, 4)))} for _ in range(n)]
    return Dataset.from_list(rows)


class GradsBeforeStep(TrainerCallback):
    """What the optimizer is about to apply: the trainable parameters' .grad at each optimizer step."""

    def __init__(self, params: dict):
        self.params, self.seen, self.optimizer_steps = params, [], 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append({n: p.grad.detach().clone() for n, p in self.params.items()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1


def dp_trainer(cfg, run_dir, model, tokenizer, *, callbacks=None, **overrides):
    from privtune.trainers.sft.run import sft_args
    from privtune.trainers.sft.trainer import DPSFTTrainer

    run_dir.mkdir(parents=True, exist_ok=True)
    args = sft_args(cfg, run_dir / "trl", use_cpu=True, **overrides)
    return DPSFTTrainer(model, args, records(), tokenizer, run=cfg, run_dir=run_dir, callbacks=callbacks)


def no_trl_backward(trainer):
    """TRL's loss and accelerate's backward must never run under DP: make them fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("TRL's compute_loss / accelerator.backward ran under DP")

    trainer.accelerator.backward = refuse
    trainer.compute_loss = refuse


def reference_batch(dpref, dataset, units: list[int], *, with_prompt: bool = False):
    """The sampled rows as the reference's Batch (unit id = row); ``with_prompt``: the prompt counted as targets."""
    width = max(len(dataset[u]["input_ids"]) for u in units)
    ids = torch.full((len(units), width), 256, dtype=torch.long)
    mask = torch.zeros((len(units), width), dtype=torch.long)
    labels = torch.full((len(units), width), -100, dtype=torch.long)
    for i, u in enumerate(units):
        row_ids, row_labels = dataset[u]["input_ids"], dataset[u]["labels"]
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_ids)] = torch.tensor(row_ids if with_prompt else row_labels)
    return types.SimpleNamespace(input_ids=ids, attention_mask=mask, labels=labels, lengths=mask.sum(dim=1),
                                 unit_ids=torch.tensor(units))


def relative_difference(a: dict, b: dict) -> float:
    fa = torch.cat([a[n].double().flatten() for n in sorted(a)])
    fb = torch.cat([b[n].double().flatten() for n in sorted(a)])
    return float((fa - fb).norm() / fb.norm())


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma"])
def test_one_step_releases_the_brute_force_clipped_sum_on_completion_tokens(tmp_path, dpref, family, mode):
    from privtune.trainers.models import byte_tokenizer

    method = "dp" if mode == "full" else "dp-lora"
    model = dpref.tiny_model(family, mode, torch.float64)
    reference_model = copy.deepcopy(model)  # before TRL patches the forward: the reference sees a plain model

    # A first trainer only to read TRL's prepared rows, so C can sit among the per-example norms (some clipped).
    probe = dp_trainer(make_cfg(tmp_path / "probe", model__name=family, train__method=method), tmp_path / "probe",
                       copy.deepcopy(model), byte_tokenizer())
    data = probe.train_dataset
    for row in data:  # TRL masked each prompt: labels -100 on a prefix, then the completion's tokens
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert first > 3 and row["labels"][first:] == row["input_ids"][first:]
    _, all_grads = dpref.reference_unit_grads(reference_model, reference_batch(dpref, data, list(range(N))))
    clip = sorted(dpref.unit_norm(g) for g in all_grads)[N // 2]

    cfg = make_cfg(tmp_path, model__name=family, train__method=method, privacy__clip_norm=clip)
    run_dir = tmp_path / "run"
    tokenizer = byte_tokenizer()
    grab = GradsBeforeStep({n: p for n, p in model.named_parameters() if p.requires_grad})
    trainer = dp_trainer(cfg, run_dir, model, tokenizer, callbacks=[grab])
    no_trl_backward(trainer)
    units = sorted(trainer.sampler.sample_units(0).tolist())
    assert len(units) >= 3
    trainer.train()
    assert trainer.state.global_step == trainer.dp_steps_run == grab.optimizer_steps == 1
    released = grab.seen[0]
    clipped_sum = {n: g * trainer.plan.expected_batch_size for n, g in released.items()}  # σ = 0: no noise

    ref_units, grads = dpref.reference_unit_grads(reference_model, reference_batch(dpref, data, units))
    assert ref_units == units
    norms = [dpref.unit_norm(g) for g in grads]
    assert min(norms) < clip < max(norms)  # both sides of the clip are exercised
    expected = dpref.reference_clipped_sum(grads, clip_norm=clip)
    dpref.assert_sums_close(clipped_sum, expected, rtol=1e-5)

    # The prompt's tokens must not count: a reference that trains on them releases something else.
    _, with_prompt = dpref.reference_unit_grads(reference_model,
                                                reference_batch(dpref, data, units, with_prompt=True))
    assert relative_difference(clipped_sum, dpref.reference_clipped_sum(with_prompt, clip_norm=clip)) > 1e-2


@pytest.mark.parametrize("accumulation", [1, 4])
def test_the_ledger_counts_one_step_per_optimizer_step_whatever_the_accumulation(tmp_path, accumulation):
    from privtune.accounting.ledger import Ledger
    from privtune.trainers.sft.run import build_sft_trainer, sft_args

    cfg = make_cfg(tmp_path, train__method="dp-lora", train__max_steps=3, train__batch_size=4,
                   privacy={"noise_multiplier": 1.0, "clip_norm": 1.0, "reproducible": True},
                   performance__micro_batch_size=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = sft_args(cfg, run_dir / "trl", use_cpu=True, gradient_accumulation_steps=accumulation)
    trainer, _ = build_sft_trainer(cfg, run_dir, records(), args=args)
    no_trl_backward(trainer)
    calls = []
    step = trainer.training_step
    trainer.training_step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    grab = GradsBeforeStep({})
    trainer.add_callback(grab)
    trainer.train()

    assert len(calls) == 3 * accumulation  # the loop's accumulation calls ...
    assert trainer.state.global_step == grab.optimizer_steps == trainer.dp_steps_run == 3  # ... one DP step each 3
    (entry,) = Ledger.load(run_dir).entries
    assert entry.event.steps == 3 and entry.status == "open"
    assert entry.event.sample_rate == pytest.approx(4 / N) and entry.event.noise_multiplier == 1.0


def test_accumulation_does_not_change_the_trained_weights(tmp_path):
    """The same Poisson micro-batches, one DP step per optimizer step: G = 1 and G = 4 train the same weights."""
    from privtune.trainers.sft.run import build_sft_trainer, sft_args

    weights = []
    for g in (1, 4):
        cfg = make_cfg(tmp_path / str(g), train__method="dp-lora", train__max_steps=2, train__batch_size=4,
                       privacy={"noise_multiplier": 0.5, "clip_norm": 1.0, "reproducible": True},
                       performance__micro_batch_size=1)
        run_dir = tmp_path / str(g) / "run"
        run_dir.mkdir(parents=True)
        trainer, _ = build_sft_trainer(cfg, run_dir, records(),
                                       args=sft_args(cfg, run_dir / "trl", use_cpu=True, gradient_accumulation_steps=g))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
        assert all(not torch.equal(before[n], w) for n, w in weights[-1].items())  # every tensor trained
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0)


@pytest.mark.parametrize("setting", [{"packing": True}, {"padding_free": True}, {"max_grad_norm": 1.0},
                                     {"activation_checkpointing": True}])
def test_dp_refuses_settings_that_couple_examples_in_one_line(tmp_path, setting):
    from privtune.trainers.dp.errors import DPRefusal
    from privtune.trainers.sft.run import build_sft_trainer, sft_args

    cfg = make_cfg(tmp_path, train__method="dp-lora", privacy={"noise_multiplier": 1.0, "clip_norm": 1.0})
    with pytest.raises(DPRefusal) as err:
        build_sft_trainer(cfg, tmp_path, records(), args=sft_args(cfg, tmp_path / "trl", use_cpu=True, **setting))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert next(iter(setting)) in str(err.value) or "checkpointing" in str(err.value)
    assert not (tmp_path / "ledger.json").exists()  # refused before anything was recorded


def test_a_dp_lora_sft_run_writes_its_ledger_and_the_trained_adapter(tmp_path):
    from safetensors.torch import load_file

    from privtune.accounting.budget import compose_ledgers
    from privtune.trainers.models import load_trained
    from privtune.trainers.sft.run import run_sft, sft_args

    cfg = make_cfg(tmp_path, train__method="dp-lora", train__max_steps=3, train__batch_size=4,
                   train__self_check_every=2, privacy={"noise_multiplier": 1.0, "clip_norm": 1.0})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stats = run_sft(cfg, run_dir, run_dir / "model", records(),
                    args=sft_args(cfg, run_dir / "trl", use_cpu=True))
    assert stats["steps"] == 3
    out = run_dir / "model"
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(float(t.abs().sum()) > 0 for n, t in adapter.items() if "lora_B" in n)  # B moved off its zero init
    meta = json.loads((out / "privtune.json").read_text())
    assert meta["method"] == "dp-lora" and meta["steps"] == 3 and meta["guarantee"]["epsilon"] > 0
    assert "differentially private" in (out / "README.md").read_text()
    efficiency = json.loads((out / "efficiency.json").read_text())
    assert efficiency["dp_plan"]["steps"] == 3

    ledger = json.loads((run_dir / "ledger.json").read_text())
    (entry,) = ledger["entries"]
    assert entry["status"] == "closed" and entry["event"]["steps"] == 3
    composed = compose_ledgers([run_dir], delta=meta["guarantee"]["delta"], accountants=("pld",))
    assert composed["epsilon"] == pytest.approx(meta["guarantee"]["epsilon"], rel=1e-6)
    assert "matches the model card" in composed["ledgers"][0]["verified"]
    model, _ = load_trained(out)  # loads back the privtune way: base model + adapter
    assert sum(1 for n, _ in model.named_parameters() if "lora_" in n) == len(adapter)


def test_a_non_private_lora_sft_run_is_recorded_as_non_private(tmp_path):
    from privtune.trainers.sft.run import run_sft, sft_args

    cfg = make_cfg(tmp_path, train__method="lora", train__max_steps=2, train__batch_size=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_sft(cfg, run_dir, run_dir / "model", records(), args=sft_args(cfg, run_dir / "trl", use_cpu=True))
    (entry,) = json.loads((run_dir / "ledger.json").read_text())["entries"]
    assert entry["event"]["type"] == "non_private" and entry["event"]["steps"] == 2
    assert "No formal privacy guarantee" in (run_dir / "model" / "README.md").read_text()
