"""The resource plan (trainers/resources.py) against independent references: parameter counts of built models and
published counts, the arithmetic of each sharding preset, the refusal's suggestion re-planned, the generated
tables of docs/cluster-planning.md, and the measured peak of a real step on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privtune.launch.config import config_from_dict
from privtune.trainers.models import TINY_FAMILIES, build_tiny
from privtune.trainers.resources import (
    KNOWN,
    architecture,
    architecture_from_config,
    plan_resources,
    smallest_fix,
)

REPO = Path(__file__).resolve().parents[2]
LLAMA7, LLAMA13 = "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf"
# From the model cards / the models' safetensors index: total parameter counts.
PUBLISHED = {LLAMA7: 6_738_415_616, LLAMA13: 13_015_864_320, "EleutherAI/pythia-6.9b": 6_857_302_016,
             "google/gemma-7b": 8_537_680_896, "Qwen/Qwen2.5-7B": 7_615_616_512}


def cfg_of(model=LLAMA7, method="full", parallel="ddp", micro_batch=8, batch=256, length=256, precision="bf16",
           targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, **extra):
    return config_from_dict({
        "name": "t", "model": {"name": model, "dtype": "bfloat16" if precision == "bf16" else "float32"},
        "data": {"max_length": length}, "train": {"method": method, "batch_size": batch, "epochs": 3,
                                                  "lora": {"r": r, "target_modules": list(targets)}},
        "privacy": {"noise_multiplier": 1.0},
        "performance": {"micro_batch_size": micro_batch, "precision": precision, "parallel": parallel, **extra}})


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_parameter_count_from_shapes_equals_the_built_tiny_model(family):
    model, _ = build_tiny(family)
    assert architecture(family).parameters() == sum(p.numel() for p in model.parameters())  # tied: once


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_of_the_built_in_table_equals_the_published_count(name):
    assert KNOWN[name].parameters() == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_transformers_model_of_the_same_shapes(name):
    """The formula against the real model classes, built on the meta device from the table's shapes."""
    import transformers as tf

    a = KNOWN[name]
    common = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                  num_hidden_layers=a.layers, num_attention_heads=a.heads, tie_word_embeddings=a.tied)
    if name.startswith("EleutherAI"):
        config = tf.GPTNeoXConfig(**common)
    elif name.startswith("google"):
        config = tf.GemmaConfig(**common, num_key_value_heads=a.kv_heads, head_dim=a.head_dim)
    elif name.startswith("Qwen"):
        config = tf.Qwen2Config(**common, num_key_value_heads=a.kv_heads)
    else:
        config = tf.LlamaConfig(**common, num_key_value_heads=a.kv_heads)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == a.parameters()


@pytest.mark.parametrize("family, targets", [
    ("tiny-llama", "all-linear"), ("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gemma", ["o_proj", "down_proj"]),
    ("tiny-qwen", "all-linear"), ("tiny-pythia", "all-linear"), ("tiny-pythia", ["query_key_value"]),
])
def test_lora_trainable_count_equals_peft(family, targets):
    from privtune.trainers.config import LoraConfig
    from privtune.trainers.lora import prepare_trainable

    model, _ = build_tiny(family)
    _, trainable = prepare_trainable(model, "lora", LoraConfig(r=4, target_modules=targets))
    cfg = cfg_of(family, "dp-lora", r=4, targets=targets) if targets != "all-linear" else \
        config_from_dict({"name": "t", "model": {"name": family}, "train": {"method": "lora", "lora": {"r": 4}}})
    assert plan_resources(cfg).trainable_parameters == sum(p.numel() for p in trainable)


def test_shapes_from_a_local_config_json_need_no_weights(tmp_path):
    from privtune.trainers.models import byte_tokenizer, tiny_config

    tiny_config("tiny-qwen", vocab_size=len(byte_tokenizer())).save_pretrained(tmp_path)  # config.json only
    assert architecture(str(tmp_path)) == architecture_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert architecture(str(tmp_path)).parameters() == architecture("tiny-qwen").parameters()


# ---------------------------------------------------------------------------------------------------------------
# Sharding arithmetic (Llama-2-7B, bf16, 8 GPUs): closed forms written out here


def test_sharding_divisors_per_preset():
    psi, n = PUBLISHED[LLAMA7], 8
    plans = {p: plan_resources(cfg_of(parallel=p), gpus_per_node=n) for p in
             ("ddp", "zero1", "zero2", "zero3", "fsdp2", "zero3-offload")}
    mem = {p: plan.memory for p, plan in plans.items()}
    assert mem["ddp"]["parameters"] == 2 * psi and mem["ddp"]["gradients"] == 2 * psi
    assert mem["ddp"]["optimizer_state"] == 12 * psi  # fp32 m, v and master copy under bf16
    assert (mem["zero1"]["parameters"], mem["zero1"]["gradients"]) == (2 * psi, 2 * psi)
    assert mem["zero1"]["optimizer_state"] == 12 * psi // n
    assert (mem["zero2"]["parameters"], mem["zero2"]["gradients"]) == (2 * psi, 2 * psi // n)
    assert mem["zero3"]["parameters"] == 2 * psi // n and mem["zero3"]["gradients"] == 2 * psi // n
    assert mem["zero3"]["optimizer_state"] == 12 * psi // n
    assert mem["fsdp2"] == mem["zero3"]
    assert mem["zero3-offload"]["optimizer_state"] == 0 and plans["zero3-offload"].cpu_memory_per_rank_bytes == 12 * psi // n
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # one decoder layer: attention, MLP, two RMSNorms
    assert mem["zero3"]["gathered_parameters"] == 2 * max(layer, 32000 * 4096)
    assert mem["ddp"]["gathered_parameters"] == mem["zero2"]["gathered_parameters"] == 0
    # Activations are per micro-batch: no preset and no world size changes them.
    assert len({m["activations"] for m in mem.values()}) == 1


def test_dp_clipped_sum_is_full_size_on_every_rank_of_every_preset():
    sums = {plan_resources(cfg_of(method="dp", parallel=p), nodes=k, gpus_per_node=8).memory["dp_clipped_sum"]
            for p in ("ddp", "zero2", "zero3", "fsdp2") for k in (1, 4)}
    assert sums == {4 * PUBLISHED[LLAMA7]}
    lora = plan_resources(cfg_of(method="dp-lora", parallel="fsdp2"), gpus_per_node=8)
    assert lora.memory["dp_clipped_sum"] == 4 * 32 * 4 * 8 * (4096 + 4096)  # 32 layers × 4 targets × r (d_in + d_out)


def test_dp_fp32_under_ddp_hands_the_clipped_sum_over_as_the_gradient():
    fp32 = plan_resources(cfg_of("tiny-llama", "dp", precision="fp32"))
    assert fp32.memory["gradients"] == 0 and fp32.memory["dp_clipped_sum"] == 4 * fp32.trainable_parameters
    sharded = plan_resources(cfg_of(method="dp", parallel="fsdp2"), gpus_per_node=8)
    assert sharded.memory["gradients"] == 4 * PUBLISHED[LLAMA7] // 8  # fp32 shards of the reduce-scatter


def test_per_micro_batch_terms_scale_with_tokens_and_non_dp_has_no_dp_terms():
    small, large = (plan_resources(cfg_of(micro_batch=b), gpus_per_node=8) for b in (2, 4))
    assert 2 * small.memory["activations"] == large.memory["activations"]
    assert 2 * small.memory["logits"] == large.memory["logits"] == 4 * 256 * 32000 * (12 + 2)  # b·T·V·(3 fp32 + bf16)
    assert all(v == 0 for k, v in large.memory.items() if k.startswith("dp_")) and large.phases["dp_clipping"] == 0


def test_tokens_per_step_and_steps():
    plan = plan_resources(cfg_of(method="dp"), nodes=1, gpus_per_node=8, num_units=9010)
    assert plan.tokens_per_step == 256 * 256
    assert plan.steps == math.ceil(3 * 9010 / 256)  # epochs × units / batch
    assert plan.micro_batches_per_step == 256 // (8 * 8)


def test_bad_launches_are_refused():
    from privtune.errors import UserError

    for kwargs in ({"nodes": 0}, {"gpus_per_node": -1}, {"gpu_memory_gib": 0}):
        with pytest.raises(UserError, match="not a positive"):
            plan_resources(cfg_of(), **kwargs)
    with pytest.raises(UserError, match="single runs one process"):
        plan_resources(cfg_of(parallel="single"), gpus_per_node=2)
    with pytest.raises(UserError, match="matches no module"):
        plan_resources(cfg_of(method="lora", targets=("nope",)))


# ---------------------------------------------------------------------------------------------------------------
# The refusal's suggestion: re-planned, it fits; every change earlier in the order of preference does not


def _apply(cfg, fix: str, nodes: int):
    overrides = dict(pair.split("=", 1) for pair in re.findall(r"(\S+\.\S+=\S+)", fix))
    found = re.search(r"--nodes (\d+)", fix)
    tree = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        section, field = key.split(".")
        tree[section][field] = int(value) if value.isdigit() else value
    return config_from_dict(tree), int(found.group(1)) if found else nodes


@pytest.mark.parametrize("case, expected", [
    ((LLAMA13, "dp", "fsdp2", 8, 2, 8), "performance.micro_batch_size="),
    ((LLAMA7, "full", "ddp", 8, 1, 8), "performance.parallel=fsdp2"),
    ((LLAMA13, "dp", "fsdp2", 1, 1, 8), "--nodes "),
    ((LLAMA13, "dp", "single", 1, 1, 1), "train.method=dp-lora"),
])
def test_refusal_names_the_first_change_that_fits(case, expected):
    model, method, parallel, micro, nodes, gpus = case
    cfg = cfg_of(model, method, parallel, micro)
    where = dict(gpus_per_node=gpus, gpu_memory_gib=80.0)
    assert not plan_resources(cfg, nodes=nodes, **where).fits
    fix = smallest_fix(cfg, nodes=nodes, **where)
    assert fix is not None and fix.startswith(expected)
    fixed, fixed_nodes = _apply(cfg, fix, nodes)
    assert plan_resources(fixed, nodes=fixed_nodes, **where).fits
    if expected != "performance.micro_batch_size=":  # a smaller micro-batch was tried first: none fits
        assert not plan_resources(_apply(cfg, "performance.micro_batch_size=1", nodes)[0], nodes=nodes, **where).fits
    else:  # the largest micro-batch that fits
        m = fixed.performance.micro_batch_size
        assert not plan_resources(_apply(cfg, f"performance.micro_batch_size={m + 1}", nodes)[0], nodes=nodes,
                                  **where).fits


# ---------------------------------------------------------------------------------------------------------------
# docs/cluster-planning.md: its generated tables are the code's output now


def _planning_script():
    spec = importlib.util.spec_from_file_location("cluster_planning", REPO / "docs" / "cluster_planning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_tables_equal_the_planner_output():
    script, doc = _planning_script(), (REPO / "docs" / "cluster-planning.md").read_text()
    for name, body in script.blocks().items():
        block = doc.split(f"<!-- {name}: generated by docs/cluster_planning.py -->\n", 1)[1].split(f"\n<!-- /{name} -->")[0]
        assert block == body, f"docs/cluster-planning.md {name} is stale: run python docs/cluster_planning.py --write"


# ---------------------------------------------------------------------------------------------------------------
# The plan against a measured step


TOLERANCE = 0.35  # plan within ±35% of the measured peak


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "dp"])
def test_plan_matches_a_measured_cpu_step(method):
    """Two real steps (two micro-batches each, AdamW) of a random Llama on CPU, fp32: malloc's peak of live bytes
    (tests/trainers/peak_memory_worker.py, a fresh process) against the plan for one process."""
    worker = Path(__file__).with_name("peak_memory_worker.py")
    proc = subprocess.run([sys.executable, str(worker), method, "fp32", "sdpa"], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = config_from_dict({
        "name": "m", "model": {"name": "tiny-llama"}, "data": {"max_length": measured["sequence_length"]},
        "train": {"method": method, "batch_size": 2 * measured["micro_batch_size"]},
        "privacy": {"noise_multiplier": 1.0},
        "performance": {"micro_batch_size": measured["micro_batch_size"], "parallel": "single",
                        "num_threads": measured["threads"]}})
    plan = plan_resources(cfg, arch=architecture_from_config(measured["config"], attention="sdpa"))
    ratio = plan.total / measured["heap_bytes"]
    print(f"\n{method}: measured peak {measured['heap_bytes'] / 2**20:.0f} MiB (resident set "
          f"{measured['rss_bytes'] / 2**20:.0f} MiB), plan {plan.total / 2**20:.0f} MiB, plan/measured {ratio:.2f}")
    assert abs(ratio - 1) <= TOLERANCE
