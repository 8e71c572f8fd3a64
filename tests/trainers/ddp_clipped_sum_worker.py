"""Worker of test_dp_ddp.py, launched with torchrun: each rank clips its share of a Poisson sample.

    torchrun --nproc_per_node 2 tests/trainers/ddp_clipped_sum_worker.py SPEC.json

For every case in SPEC, every rank loads the same weights and dataset, draws the same Poisson sample with
``PoissonBatchSampler(world_size=2, rank=r)``, runs the DP engine on its own micro-batches, all-reduces the clipped
sums (gloo) and rank 0 saves them. The test compares them with a single-process brute-force reference.
"""

import json
import sys

import torch
import torch.distributed as dist


def main(spec_path: str) -> None:
    from peft import LoraConfig, get_peft_model

    from privtune.trainers.batches import collate
    from privtune.trainers.dp import DPEngine, PoissonBatchSampler, per_example_loss
    from privtune.trainers.models import build_tiny

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = json.loads(open(spec_path).read())
    for case in spec["cases"]:
        model, _ = build_tiny(case["family"], seed=0, dtype=torch.float64)
        if case["mode"] == "lora":
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        model = model.to(torch.float64)
        state = torch.load(case["weights"], weights_only=True)
        model.load_state_dict(state)
        model.eval()
        rows = spec["rows"]
        sampler = PoissonBatchSampler(len(rows), sample_rate=spec["sample_rate"], steps=1, seed=spec["seed"],
                                      micro_batch_size=spec["micro_batch_size"], world_size=world, rank=rank)
        engine = DPEngine(model, trainable=[p for p in model.parameters() if p.requires_grad],
                          clip_norm=spec["clip_norm"])
        for micro in sampler.batch(0).micro_batches:
            inputs = collate(micro.rows.tolist(), rows, pad_id=256)
            with engine.micro_batch(micro.unit_ids):
                logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
                engine.backward(per_example_loss(logits, inputs.labels))
        sums = engine.pop_clipped_sum().grads
        for tensor in sums.values():
            dist.all_reduce(tensor)
        if rank == 0:
            torch.save(sums, case["out"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
