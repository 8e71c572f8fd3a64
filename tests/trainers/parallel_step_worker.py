"""Worker of test_parallel_fsdp2.py, launched with torchrun: one DP step under the ddp or fsdp2 preset.

    torchrun --nproc_per_node 2 tests/trainers/parallel_step_worker.py SPEC.json

For every case in SPEC every rank loads the same weights, wraps the model (``Replicated`` or ``Fsdp2``), draws the same Poisson
sample with ``PoissonBatchSampler(world_size, rank)``, runs the real ``DPStep`` with the preset's reduction, and
gathers the update it wrote into ``.grad``; rank 0 saves {name: whole update}. The test compares it with the
single-process brute-force reference (σ = 0) or with the single-process noise of the same key and step (σ > 0).
"""

import json
import sys

import torch
import torch.distributed as dist


def main(spec_path: str) -> None:
    from peft import LoraConfig, get_peft_model

    from privtune.trainers.batches import collate
    from privtune.trainers.dp import DPEngine, PoissonBatchSampler, per_example_loss
    from privtune.trainers.dp.step import DPStep, MicroBatchInputs
    from privtune.trainers.models import build_tiny
    from privtune.trainers.parallel.base import Replicated
    from privtune.trainers.parallel.fsdp2 import Fsdp2

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = json.loads(open(spec_path).read())
    rows = spec["rows"]
    for case in spec["cases"]:
        model, _ = build_tiny(case["family"], seed=0, dtype=torch.float64)
        if case["mode"] == "lora":
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        model.load_state_dict(torch.load(case["weights"], weights_only=True))
        precision = case.get("precision", "fp64")  # bf16: fp32 parameters, FSDP2 computes in bf16
        model = model.to(torch.float32 if precision == "bf16" else torch.float64)
        model.eval()
        if case.get("preset", "fsdp2") == "fsdp2":
            parallel = Fsdp2(model, rank=rank, world_size=world, precision="bf16" if precision == "bf16" else "fp32")
        else:
            trainable = [p for p in model.parameters() if p.requires_grad]
            parallel = Replicated(model, trainable, None, None, preset="ddp", rank=rank, world_size=world)
        model = parallel.model
        sampler = PoissonBatchSampler(len(rows), sample_rate=spec["sample_rate"], steps=1, seed=spec["seed"],
                                      micro_batch_size=case["micro_batch_size"], world_size=world, rank=rank)
        engine = DPEngine(model, trainable=parallel.trainable, clip_norm=spec["clip_norm"])
        step = DPStep(engine, noise_multiplier=case["sigma"], expected_batch_size=spec["expected_batch_size"],
                      randomness_key=spec["key"], reduction=parallel.reduction())
        mine = sampler.batch(0).micro_batches
        real_rows = sum(m.num_real_rows for m in mine)

        def loss_fn(inputs, model=model):
            logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
            return per_example_loss(logits, inputs.labels)

        micro = [MicroBatchInputs(m.without_padding().unit_ids, collate(m.without_padding().rows.tolist(), rows,
                                                                         pad_id=256)) for m in mine]
        step.run(micro, loss_fn, step=spec["step"])
        names = {id(p): n for n, p in model.named_parameters()}
        assert all(p.grad.dtype == p.dtype for p in parallel.trainable)  # the update in the parameters' dtype
        update = {names[id(p)]: getattr(p.grad, "full_tensor", p.grad.clone)() for p in parallel.trainable}
        counts = [None] * world
        dist.all_gather_object(counts, real_rows)
        if rank == 0:
            torch.save({"update": update, "real_rows": counts}, case["out"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
