"""DeepSpeed ZeRO-1/2/3 with 2 processes against single-process references, and the presets' refusals.

One torchrun launch (zero_worker.py) runs every case. The grid: {zero1, zero2, zero3} × {dp (full model), dp-lora}
× {tiny-llama, tiny-gemma (tied, scaled embedding)}, ZeRO-3 with every parameter partitioned, and the same grid
without privacy; then ZeRO-3 at DeepSpeed's default persistence threshold (tiny parameters kept whole on every
rank), zero3-offload, bf16, and two traps. fp32 throughout: DeepSpeed keeps fp32 master weights and partitions
even for an fp64 model, so fp64 would not be more exact. Per DP case:

- step 0, sigma = 0, rank 1's second micro-batch all padding: the update the optimizer applied (SGD lr 1) equals
  the brute-force clipped sum / expected batch size (each unit forwarded alone in fp64, plain autograd), 1e-5;
- step 1, sigma > 0, rank 1 holding no unit at all: the update equals a single-process DPStep +
  ReplicatedReduction's with the same key and step (the noise is the one 1 process adds), and moves each weight
  by about its noise's std;
- the gathered weights (``full_trainable_state``) equal the single-process run's after step 0;
- ``save_state`` after step 0; a fresh model and preset (initial weights) ``load_state`` it and take step 1
  again: bit-identical weights (weights, momentum buffer and learning-rate schedule restored).

Per plain case: one non-private step (2 micro-batches per rank, one of them padding only on rank 1) equals the
single-process gradient of the batch-mean loss (gradients summed over ranks, as under ddp). bf16 cases are a smoke
test (5e-2 against the fp64 brute force). Traps: DeepSpeed's gradient clipping switched back on, and a ZeRO-3
partition write that does nothing: ``Zero.step`` raises DPInvariantError in both.
"""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("zero_worker.py")
FAMILIES = ("tiny-llama", "tiny-gemma")
PRESETS = ("zero1", "zero2", "zero3")
MODES = ("full", "lora")
CLIP, EXPECTED_BATCH, SIGMA, KEY = 0.5, 4.0, 1.0, 1234
# rows dealt to ranks per step; -1 is a padding row (unit ids are the row numbers)
DP_MICRO = {"0": {"0": [[0, 1], [2]], "1": [[3, 4], [-1]]},  # rank 1: a micro-batch of padding only
            "1": {"0": [[0, 5]], "1": [[-1]]}}  # rank 1: no unit at all this step
PLAIN_MICRO = {"0": [[0, 1], [2, -1]], "1": [[3, 4], [-1, -1]]}
PLAIN_BATCH = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows():
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(4, 20, (6,), generator=g).tolist()
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _batch(dpref, rows, ids):
    """The dpref Batch of rows ``ids`` (unit id = row number) with exactly these tokens."""
    width = max(len(rows[i]) for i in ids)
    batch = dpref.make_batch(seed=0, lengths=[len(rows[i]) for i in ids], width=width, unit_ids=list(ids),
                             prompt=[0] * len(ids))
    for r, i in enumerate(ids):
        batch.input_ids[r, : len(rows[i])] = torch.tensor(rows[i])
        batch.labels[r, : len(rows[i])] = torch.tensor(rows[i])
    return batch


def _units(micro: dict) -> list[int]:
    return sorted(i for rank in micro.values() for mb in rank for i in mb if i >= 0)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([state[n].double().flatten() for n in sorted(state)])


def _close(actual: dict, expected: dict, *, rtol: float, what: str) -> None:
    assert set(actual) == set(expected), (what, sorted(set(actual) ^ set(expected))[:4])
    a, e = _flat(actual), _flat(expected)
    err = float((a - e).norm()) / max(float(e.norm()), 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3e}"


def _single_process_dp(model, rows):
    """The same two DP steps in one process (DPStep + ReplicatedReduction), same optimizer and schedule."""
    from privtune.trainers.batches import collate
    from privtune.trainers.checkpoint import trainable_state
    from privtune.trainers.dp import DPEngine, per_example_loss
    from privtune.trainers.dp.step import DPStep, MicroBatchInputs

    model = copy.deepcopy(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    engine = DPEngine(model, trainable=trainable, clip_norm=CLIP)
    states = []
    for step, sigma in ((0, 0.0), (1, SIGMA)):
        ids = _units(DP_MICRO[str(step)])
        inputs = collate(ids, rows, pad_id=256)

        def loss_fn(x):
            return per_example_loss(model(input_ids=x.input_ids, attention_mask=x.attention_mask).logits, x.labels)

        DPStep(engine, noise_multiplier=sigma, expected_batch_size=EXPECTED_BATCH, randomness_key=KEY).run(
            [MicroBatchInputs(torch.tensor(ids), inputs, sequence_length=inputs.input_ids.shape[1])], loss_fn,
            step=step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        states.append({n: t.clone() for n, t in trainable_state(model).items()})  # not views of the weights
    return states


def _plain_gradient(dpref, model, rows):
    """The gradient of sum_rows(row loss) / PLAIN_BATCH over the whole logical batch, in fp64, one process."""
    from privtune.trainers.batches import collate
    from privtune.trainers.dp import per_example_loss

    model = copy.deepcopy(model).to(torch.float64)
    ids = sorted(i for rank in PLAIN_MICRO.values() for mb in rank for i in mb)
    x = collate(ids, rows, pad_id=256)
    loss = per_example_loss(model(input_ids=x.input_ids, attention_mask=x.attention_mask).logits, x.labels)
    (loss.sum() / PLAIN_BATCH).backward()
    return {n: p.grad.detach().clone() for n, p in dpref.trainable_named(model).items()}


def _brute_force_update(dpref, model, rows):
    """Step 0's released update with sigma = 0: the clipped sum over its units / the expected batch size."""
    _, unit_grads = dpref.reference_unit_grads(copy.deepcopy(model).to(torch.float64),
                                               _batch(dpref, rows, _units(DP_MICRO["0"])))
    assert any(dpref.unit_norm(u) > CLIP for u in unit_grads), "some units must be clipped"
    clipped = dpref.reference_clipped_sum(unit_grads, clip_norm=CLIP)
    return {n: t / EXPECTED_BATCH for n, t in clipped.items()}


def _cases() -> list[dict]:
    cases = [dict(preset=preset, family=family, mode=mode, kind=kind, partition_everything=preset == "zero3")
             for family in FAMILIES for mode in MODES for preset in PRESETS for kind in ("dp", "plain")]
    cases += [dict(preset="zero3", family="tiny-gemma", mode="lora", kind="dp", label="persistent"),
              dict(preset="zero3-offload", family="tiny-gemma", mode="full", kind="dp", partition_everything=True),
              dict(preset="zero3-offload", family="tiny-llama", mode="lora", kind="plain", partition_everything=True),
              dict(preset="zero2", family="tiny-gemma", mode="full", kind="dp", precision="bf16"),
              dict(preset="zero3", family="tiny-gemma", mode="full", kind="dp", precision="bf16",
                   partition_everything=True)]
    cases += [dict(preset=preset, family="tiny-llama", mode="lora", kind="trap", trap=trap, partition_everything=True)
              for preset, trap in (("zero1", "clipping"), ("zero3", "clipping"), ("zero3", "dropped"))]
    for case in cases:
        case["name"] = "-".join(str(case[k]) for k in ("preset", "family", "mode", "kind", "precision", "trap",
                                                        "label") if k in case)
    return cases


@pytest.mark.distributed
@pytest.mark.slow
def test_zero_presets_match_single_process(tmp_path, dpref, one_thread):
    from privtune.trainers.checkpoint import trainable_state

    rows = _rows()
    only = os.environ.get("PRIVTUNE_ZERO_CASES")  # comma-separated case names, while debugging
    cases = [c for c in _cases() if not only or c["name"] in only.split(",")]
    models = {}
    for case in cases:
        key = (case["family"], case["mode"])
        if key not in models:
            models[key] = dpref.tiny_model(*key, dtype=torch.float32)
            torch.save(models[key].state_dict(), tmp_path / f"{key[0]}-{key[1]}.pt")
        case.update(weights=str(tmp_path / f"{key[0]}-{key[1]}.pt"), out=str(tmp_path / f"{case['name']}.pt"),
                    checkpoint=str(tmp_path / f"ckpt-{case['name']}"))
    spec = {"rows": rows, "dtype": "float32", "clip_norm": CLIP, "expected_batch_size": EXPECTED_BATCH,
            "sigma": SIGMA, "key": KEY, "dp_micro": DP_MICRO, "plain_micro": PLAIN_MICRO, "plain_batch": PLAIN_BATCH,
            "cases": cases}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(WORKER), str(spec_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    references = {}

    def reference(kind, model_key, make):
        if (kind, model_key) not in references:
            references[(kind, model_key)] = make()
        return references[(kind, model_key)]

    for case in cases:
        model_key, what = (case["family"], case["mode"]), case["name"]
        model = models[model_key]
        w0 = trainable_state(model)
        got = torch.load(case["out"], weights_only=True)
        if case["kind"] == "trap":
            assert got["raised"] and "DeepSpeed applied an update of squared norm" in got["raised"], (what, got)
            continue
        applied = {n: w0[n].double() - got["w1"][n].double() for n in w0}
        if case["kind"] == "plain":
            grad = reference("plain", model_key, lambda m=model: _plain_gradient(dpref, m, rows))
            _close(applied, grad, rtol=1e-5, what=f"{what}: applied update vs gradient")
            continue
        brute_force = reference("brute", model_key, lambda m=model: _brute_force_update(dpref, m, rows))
        bf16 = case.get("precision") == "bf16"
        _close(applied, brute_force, rtol=5e-2 if bf16 else 1e-5, what=f"{what}: step 0 update vs brute force")
        if not bf16:
            s1, s2 = reference("single", model_key, lambda m=model: _single_process_dp(m, rows))
            _close(got["w1"], s1, rtol=1e-6, what=f"{what}: weights after step 0 vs one process")
            update = {n: got["w2"][n].double() - got["w1"][n].double() for n in w0}
            _close(update, {n: s2[n].double() - s1[n].double() for n in w0}, rtol=1e-5,
                   what=f"{what}: noisy step 1 vs one process")
            flat = _flat(update)  # lr 1/2 times (momentum 0.5 * U_0 + U_1), U_1's noise of std sigma C / qN
            rms, noise_std = float(flat.norm()) / flat.numel() ** 0.5, 0.5 * SIGMA * CLIP / EXPECTED_BATCH
            assert 0.8 < rms / noise_std < 1.25, f"{what}: step 1 moved {rms:.4g} per weight, not ~{noise_std}"
        for n in w0:
            assert torch.equal(got["w1_loaded"][n], got["w1"][n]), f"{what}: {n} not restored by load_state"
            assert torch.equal(got["w2_again"][n], got["w2"][n]), f"{what}: {n} differs after the resume"


# ----------------------------------------------------------------------------------------------------------------
# The generated configs and the refusals (one process, no DeepSpeed engine)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", ["zero1", "zero2", "zero3", "zero3-offload"])
def test_deepspeed_config_leaves_every_update_to_privtune(preset, precision):
    from privtune.trainers.parallel.zero import _check_config, deepspeed_config

    config = deepspeed_config(preset, precision=precision)
    assert json.loads(json.dumps(config)) == config  # written into the run dir as JSON
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3-offload": 3}[preset]
    assert config["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in config["zero_optimization"]) == (preset == "zero3-offload")
    assert config["gradient_clipping"] == 0
    assert config["gradient_accumulation_steps"] == 1 and config["train_micro_batch_size_per_gpu"] == 1
    assert config["zero_allow_untested_optimizer"] is True
    assert config["fp16"] == {"enabled": False} and config["bf16"] == {"enabled": precision == "bf16"}
    assert config["managed_gradient_accumulation"] == (stage == 3)  # ZeRO-1/2: the caller owns the boundary
    assert config.get("data_types") == ({"grad_accum_dtype": "fp32"} if precision == "bf16" else None)
    _check_config(config)


def test_update_check_reads_the_squared_norm_of_a_large_partition_exactly():
    """A 67M-value partition (rank 0's half of SmolLM2-135M): float32-lane kernels (vector_norm, dot) read 0.989 of
    |t|^2 there; the check must agree with a float64 sum to 1e-9, else it refuses correct updates."""
    from privtune.trainers.parallel.zero import _squared_norm

    t = torch.randn(67_000_000, generator=torch.Generator().manual_seed(0)) * 0.08
    exact = float(t.double().square().sum())
    assert abs(_squared_norm(t) - exact) <= 1e-9 * exact
    assert abs(_squared_norm(t.bfloat16()) - float(t.bfloat16().double().square().sum())) <= 1e-9 * exact


def test_zero_refusals_are_one_line():
    from privtune.errors import UserError
    from privtune.trainers.dp.errors import DPRefusal
    from privtune.trainers.parallel.zero import Zero, _check_config, deepspeed_config

    with pytest.raises(DPRefusal, match="fp16 under DeepSpeed ZeRO") as err:
        deepspeed_config("zero3", precision="fp16")
    assert "\n" not in str(err.value) and "bf16" in str(err.value)
    with pytest.raises(UserError, match="not a DeepSpeed preset"):
        deepspeed_config("zero4")
    for change in ({"gradient_clipping": 1.0}, {"gradient_accumulation_steps": 4}, {"fp16": {"enabled": True}},
                   {"gradient_predivide_factor": 2.0}):
        with pytest.raises(DPRefusal, match="would change updates on its own"):
            _check_config({**deepspeed_config("zero2"), **change})
    hpz = deepspeed_config("zero3")
    hpz["zero_optimization"]["zero_hpz_partition_size"] = 2
    with pytest.raises(DPRefusal, match="hpZ"):
        _check_config(hpz)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(UserError, match="needs a process group") as err:
        Zero(model, list(model.parameters()), optimizer, None, preset="zero2", rank=0, world_size=1, is_dp=True)
    assert "torchrun" in str(err.value)
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)  # bf16 weights without DeepSpeed's bf16: no fp32 master
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(UserError, match="performance.precision: bf16"):
        Zero(model, list(model.parameters()), optimizer, None, preset="zero3", rank=0, world_size=1, is_dp=True)


def test_zero_resume_on_another_world_size_is_refused(tmp_path):
    from privtune.errors import UserError
    from privtune.trainers.parallel.zero import Zero

    (tmp_path / "zero.json").write_text(json.dumps({"preset": "zero3", "stage": 3, "world_size": 2,
                                                    "precision": "fp32"}))
    zero = Zero.__new__(Zero)  # only what load_state reads before DeepSpeed is asked
    zero.stage, zero.world_size = 3, 4
    with pytest.raises(UserError, match="resume with 2 processes and performance.parallel=zero3") as err:
        zero.load_state(tmp_path)
    assert "\n" not in str(err.value)
