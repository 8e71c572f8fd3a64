"""DDP with 2 processes gives the same clipped sum as the single-process brute-force reference.

Every family × {full, LoRA}: a real Poisson sample over ragged rows, dealt to 2 gloo ranks by the sampler, each
rank clips its own micro-batches, the sums are all-reduced; the reference forwards each sampled unit alone.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privtune.trainers.dp import PoissonBatchSampler

WORKER = Path(__file__).with_name("ddp_clipped_sum_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_processes_match_brute_force(tmp_path, dpref):
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 24, (10,), generator=g).tolist()
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    spec = {"rows": rows, "sample_rate": 0.7, "seed": 3, "micro_batch_size": 2, "clip_norm": 0.5, "cases": []}
    models = {}
    for family in dpref.FAMILIES:
        for mode in ("full", "lora"):
            model = dpref.tiny_model(family, mode)
            weights = tmp_path / f"{family}-{mode}.pt"
            torch.save(model.state_dict(), weights)
            models[(family, mode)] = model
            spec["cases"].append({"family": family, "mode": mode, "weights": str(weights),
                                  "out": str(tmp_path / f"{family}-{mode}.sum.pt")})
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(WORKER), str(spec_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sampled = PoissonBatchSampler(len(rows), sample_rate=0.7, steps=1, seed=3, micro_batch_size=2).sample_units(0)
    assert 2 <= len(sampled) < len(rows), "the sample should be a real subset"
    width = max(len(rows[i]) for i in sampled.tolist())
    unit_rows = [rows[i] for i in sampled.tolist()]
    batch = dpref.make_batch(seed=0, lengths=[len(r) for r in unit_rows], width=width,
                             unit_ids=list(range(len(unit_rows))), prompt=[0] * len(unit_rows))
    for r, row in enumerate(unit_rows):  # the reference sees the very same tokens
        batch.input_ids[r, : len(row)] = torch.tensor(row)
        batch.labels[r, : len(row)] = torch.tensor(row)
    for case in spec["cases"]:
        model = models[(case["family"], case["mode"])]
        _, unit_grads = dpref.reference_unit_grads(model, batch)
        expected = dpref.reference_clipped_sum(unit_grads, clip_norm=0.5)
        actual = torch.load(case["out"], weights_only=True)
        assert any(dpref.unit_norm(u) > 0.5 for u in unit_grads), "some units must be clipped"
        dpref.assert_sums_close(actual, expected, rtol=1e-5)
