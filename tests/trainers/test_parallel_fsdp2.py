"""FSDP2 (and ddp) with 2 processes: the DP step's released update equals the single-process brute force.

{dp (every parameter, tied and scaled embeddings), dp-lora} × {tiny Llama, tiny Gemma}: a real Poisson sample
dealt to 2 gloo ranks, each rank clips its own units over whole parameters, the sums are reduce-scattered into
FSDP2's dim-0 shards and each shard's owner adds its noise. σ = 0: the update equals Σ clipped / (q N) from the
brute force (each unit forwarded alone); one case gives rank 1 only an all-padding micro-batch. σ > 0: the noise
equals, coordinate by coordinate, what one process adds for the same key and step, and the two shards' noise has
std σ·C and is uncorrelated. The ddp preset's step (rank 0 noises, one all-reduce) is checked on the same cases
(σ = 0 with and without a padding rank on all four tiny families, σ > 0). bf16 mixed precision (FSDP2's MixedPrecisionPolicy) agrees to bf16's precision.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from privtune.trainers.dp import PoissonBatchSampler, noise_source, whole

WORKER = Path(__file__).with_name("parallel_step_worker.py")
SAMPLE_RATE, SEED, CLIP, KEY, STEP = 0.7, 3, 0.5, 2**100 + 7, 5
EXPECTED_BATCH = 7.0
SIGMA = 2.0
FAMILIES = ("tiny-llama", "tiny-gemma")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(dpref, model, rows, sampled):
    """Brute force: each sampled unit forwarded alone, autograd, clipped; summed (fp64)."""
    width = max(len(rows[i]) for i in sampled)
    unit_rows = [rows[i] for i in sampled]
    batch = dpref.make_batch(seed=0, lengths=[len(r) for r in unit_rows], width=width,
                             unit_ids=list(range(len(unit_rows))), prompt=[0] * len(unit_rows))
    for r, row in enumerate(unit_rows):
        batch.input_ids[r, : len(row)] = torch.tensor(row)
        batch.labels[r, : len(row)] = torch.tensor(row)
    _, unit_grads = dpref.reference_unit_grads(model, batch)
    assert any(dpref.unit_norm(u) > CLIP for u in unit_grads), "some units must be clipped"
    return dpref.reference_clipped_sum(unit_grads, clip_norm=CLIP)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_and_ddp_on_two_processes_release_the_brute_force_update_and_the_one_process_noise(tmp_path, dpref):
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in torch.randint(3, 20, (9,), generator=g)]
    spec = {"rows": rows, "sample_rate": SAMPLE_RATE, "seed": SEED, "clip_norm": CLIP, "key": KEY, "step": STEP,
            "expected_batch_size": EXPECTED_BATCH, "cases": []}
    models = {}
    for family in FAMILIES:
        for mode in ("full", "lora"):
            model = dpref.tiny_model(family, mode)
            weights = tmp_path / f"{family}-{mode}.pt"
            torch.save(model.state_dict(), weights)
            models[(family, mode)] = model
            for micro, sigma in ((2, 0.0), (16, 0.0), (2, SIGMA)):
                if sigma and mode == "lora" and family == "tiny-gemma":
                    continue  # the noise cases: three of the four models are enough
                spec["cases"].append({"family": family, "mode": mode, "weights": str(weights), "sigma": sigma,
                                      "micro_batch_size": micro,
                                      "out": str(tmp_path / f"{family}-{mode}-{micro}-{sigma}.pt")})
    # The ddp preset's DPStep (ReplicatedReduction) on the same sample: every tiny family, a padding rank too.
    for family in dpref.FAMILIES:
        for mode in ("full", "lora"):
            weights = tmp_path / f"{family}-{mode}.pt"
            if (family, mode) not in models:
                models[(family, mode)] = dpref.tiny_model(family, mode)
                torch.save(models[(family, mode)].state_dict(), weights)
            for micro, sigma in ((2, 0.0), (16, 0.0)) + (((2, SIGMA),) if family in FAMILIES else ()):
                spec["cases"].append({"family": family, "mode": mode, "weights": str(weights), "sigma": sigma,
                                      "micro_batch_size": micro, "preset": "ddp",
                                      "out": str(tmp_path / f"ddp-{family}-{mode}-{micro}-{sigma}.pt")})
    spec["cases"].append({"family": "tiny-llama", "mode": "lora", "weights": str(tmp_path / "tiny-llama-lora.pt"),
                          "sigma": 0.0, "micro_batch_size": 2, "precision": "bf16",
                          "out": str(tmp_path / "tiny-llama-lora-bf16.pt")})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(WORKER), str(tmp_path / "spec.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sampled = PoissonBatchSampler(len(rows), sample_rate=SAMPLE_RATE, steps=1, seed=SEED,
                                  micro_batch_size=2).sample_units(0).tolist()
    assert 2 <= len(sampled) < len(rows), "the sample should be a real subset"
    references = {key: _reference(dpref, model, rows, sampled) for key, model in models.items()}
    noise_pooled = {0: [], 1: []}
    for case in spec["cases"]:
        out = torch.load(case["out"], weights_only=True)
        update, counts = out["update"], out["real_rows"]
        expected_sum = references[(case["family"], case["mode"])]
        if case["micro_batch_size"] == 16:
            assert counts[1] == 0 and counts[0] == len(sampled), counts  # rank 1: one all-padding micro-batch
        else:
            assert min(counts) > 0, counts
        if case.get("precision") == "bf16":  # bf16 forward and backward, fp32 sums: 3.5% measured; a wrong
            # scale, a missing shard or a double reduction would be off by 50% or more
            flat_a = torch.cat([update[n].double().flatten() * EXPECTED_BATCH for n in sorted(expected_sum)])
            flat_e = torch.cat([expected_sum[n].flatten() for n in sorted(expected_sum)])
            assert float((flat_a - flat_e).norm() / flat_e.norm()) < 8e-2
            continue
        if case["sigma"] == 0.0:
            dpref.assert_sums_close({k: v * EXPECTED_BATCH for k, v in update.items()}, expected_sum, rtol=1e-5)
            continue
        # One process's release for the same key and step: the same noise on every coordinate.
        one_process = {k: v.clone() for k, v in expected_sum.items()}
        noise_source(seed=KEY, step=STEP, secure=False).fill_(whole(one_process.values()), std=SIGMA * CLIP,
                                                              scale=1.0)
        dpref.assert_sums_close({k: v * EXPECTED_BATCH for k, v in update.items()}, one_process, rtol=1e-5)
        if case.get("preset") == "ddp":
            continue  # rank 0 drew all of it: the shard statistics below are FSDP2's
        for name, u in update.items():  # the noise each rank added to its own dim-0 shard
            noise = (u * EXPECTED_BATCH - expected_sum[name]).flatten(start_dim=1) if u.dim() > 1 else \
                (u * EXPECTED_BATCH - expected_sum[name]).unsqueeze(1)
            half = -(-noise.shape[0] // 2)
            noise_pooled[0].append(noise[:half].flatten())
            noise_pooled[1].append(noise[half:].flatten())
    shard0 = torch.cat(noise_pooled[0]).double().numpy()
    shard1 = torch.cat(noise_pooled[1]).double().numpy()
    for shard in (shard0, shard1):
        assert shard.size > 5000
        assert stats.kstest(shard / (SIGMA * CLIP), "norm").pvalue > 1e-3
        assert stats.kstest(shard / (0.9 * SIGMA * CLIP), "norm").pvalue < 1e-3  # the test can tell 10% off
    n = min(shard0.size, shard1.size)
    assert abs(np.corrcoef(shard0[:n], shard1[:n])[0, 1]) < 4 / np.sqrt(n)
