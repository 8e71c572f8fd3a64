"""Worker of test_parallel_zero.py, launched with torchrun: the ZeRO presets' DP and plain steps on 2 gloo ranks.

    torchrun --nproc_per_node 2 tests/trainers/zero_worker.py SPEC.json

For every case of SPEC every rank loads the same weights, builds ``Zero`` for the case's preset and runs, on the
micro-batches SPEC deals to its rank:

- ``dp``: step 0 with sigma = 0 (rank 1's second micro-batch is all padding), a checkpoint, step 1 with sigma > 0
  (rank 1 holds no unit at all); then a fresh model and preset load the checkpoint and take step 1 again. Rank 0
  saves the gathered trainable weights after each step and after the load.
- ``plain``: one non-private step; rank 0 saves the gathered weights.
- ``trap``: one noisy DP step with DeepSpeed's gradient clipping on, or with the ZeRO-3 partitions never written;
  rank 0 saves the DPInvariantError message ``Zero.step`` raised (None if it raised nothing).

The optimizer is SGD(lr=1, momentum=0.5) under LambdaLR(1 / (1 + step)) for ``dp`` (the first update is the
released one; the resume must restore the momentum and the schedule) and SGD(lr=1) for ``plain``. The test
compares with single-process references.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build(case, dtype):
    from peft import LoraConfig, get_peft_model

    from privtune.trainers.models import build_tiny

    model, _ = build_tiny(case["family"], seed=0, dtype=dtype)
    if case["mode"] == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model = model.to(dtype)
    model.load_state_dict(torch.load(case["weights"], weights_only=True))
    model.eval()
    return model


def zero_for(case, model, optimizer, scheduler, *, is_dp, rank, world, gradient_clipping=None):
    from privtune.trainers.parallel.zero import Zero, deepspeed_config

    trainable = [p for p in model.parameters() if p.requires_grad]
    precision = case.get("precision", "fp32")
    config = deepspeed_config(case["preset"], precision=precision)
    if case.get("partition_everything"):  # tiny models sit below ZeRO-3's persistence threshold: shard them all
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if gradient_clipping is not None:
        config["gradient_clipping"] = gradient_clipping
    return Zero.with_config(model, trainable, optimizer, scheduler, preset=case["preset"], rank=rank,
                            world_size=world, precision=precision, is_dp=is_dp, config=config)


def dp_step(zero, engine, spec, rank, step, sigma):
    """One DP step on this rank's micro-batches of SPEC, through the preset's reduction; then its step()."""
    from privtune.trainers.batches import collate
    from privtune.trainers.dp import per_example_loss
    from privtune.trainers.dp.step import DPStep, MicroBatchInputs

    dp = DPStep(engine, noise_multiplier=sigma, expected_batch_size=spec["expected_batch_size"],
                randomness_key=spec["key"], reduction=zero.reduction())
    micro = []
    for ids in spec["dp_micro"][str(step)][str(rank)]:
        inputs = collate(ids, spec["rows"], pad_id=256)
        micro.append(MicroBatchInputs(torch.tensor(ids), inputs, sequence_length=inputs.input_ids.shape[1]))

    def loss_fn(inputs):
        logits = zero.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
        return per_example_loss(logits, inputs.labels)

    dp.run(micro, loss_fn, step=step)
    zero.step()  # raises DPInvariantError unless the optimizer applied the released update


def dp_setup(case, spec, rank, world, dtype, **zero_options):
    from privtune.trainers.dp import DPEngine

    model = build(case, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    zero = zero_for(case, model, optimizer, scheduler, is_dp=True, rank=rank, world=world, **zero_options)
    return zero, DPEngine(zero.model, trainable=zero.trainable, clip_norm=spec["clip_norm"])


def run_dp(case, spec, rank, world, dtype):
    zero, engine = dp_setup(case, spec, rank, world, dtype)
    dp_step(zero, engine, spec, rank, 0, 0.0)
    out = {"w1": zero.full_trainable_state()}
    zero.save_state(_checkpoint_dir(case))
    dp_step(zero, engine, spec, rank, 1, spec["sigma"])
    out["w2"] = zero.full_trainable_state()
    # the resume, as the recipe does it: a fresh model (the initial weights), a fresh preset, then load_state
    zero, engine = dp_setup(case, spec, rank, world, dtype)
    zero.load_state(_checkpoint_dir(case))
    out["w1_loaded"] = zero.full_trainable_state()
    dp_step(zero, engine, spec, rank, 1, spec["sigma"])
    out["w2_again"] = zero.full_trainable_state()
    return out


def run_trap(case, spec, rank, world, dtype):
    """Two traps DeepSpeed sets (notes/sharded-dp.md): its default gradient clipping, which rescales a DP update,
    and a ZeRO-3 partition write that silently does nothing, which leaves a zero update. Neither may pass
    silently: ``Zero.step`` must raise DPInvariantError."""
    from unittest import mock

    import deepspeed.utils

    import privtune.trainers.parallel.zero as zero_module
    from privtune.trainers.dp.errors import DPInvariantError

    if case["trap"] == "clipping":  # a hand-edited config; the preset's own check would refuse it up front
        with mock.patch.object(zero_module, "_check_config", lambda config: None):
            zero, engine = dp_setup(case, spec, rank, world, dtype, gradient_clipping=1.0)
    else:
        zero, engine = dp_setup(case, spec, rank, world, dtype)
    # "dropped": the update never reaches DeepSpeed's partitions (safe_set_local_grad returning without a word,
    # as it does while requires_grad is off), so the optimizer steps on zero gradients
    dropped = mock.patch.object(deepspeed.utils, "safe_set_local_grad", lambda param, value: None)
    try:
        with dropped if case["trap"] == "dropped" else mock.MagicMock():
            dp_step(zero, engine, spec, rank, 1, spec["sigma"])  # noisy: its norm is far above 1
    except DPInvariantError as err:
        return {"raised": str(err)}
    return {"raised": None}


def _checkpoint_dir(case):
    path = case["checkpoint"]
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    return path


def run_plain(case, spec, rank, world, dtype):
    from privtune.trainers.batches import collate
    from privtune.trainers.dp import per_example_loss

    model = build(case, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    zero = zero_for(case, model, optimizer, scheduler, is_dp=False, rank=rank, world=world)
    for ids in spec["plain_micro"][str(rank)]:
        inputs = collate(ids, spec["rows"], pad_id=256)
        logits = zero.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
        zero.plain_backward(per_example_loss(logits, inputs.labels).sum() / spec["plain_batch"])
    zero.finish_plain_step()
    zero.step()
    return {"w1": zero.full_trainable_state()}


def main(spec_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = json.loads(open(spec_path).read())
    dtype = getattr(torch, spec["dtype"])
    for case in spec["cases"]:
        run = {"dp": run_dp, "plain": run_plain, "trap": run_trap}[case["kind"]]
        result = run(case, spec, rank, world, dtype)
        if rank == 0:
            torch.save(result, case["out"])
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
