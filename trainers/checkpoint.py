"""Checkpoints: everything needed to continue a run exactly where it stopped.

Owns: ``checkpoints/step-N/`` folders holding the trainable weights (the adapter only for LoRA), optimizer and
scheduler state (written by the parallel preset: gathered ``trainable.safetensors`` + ``optimizer.pt``, or the
engine's own sharded format), the RNG state of every rank, the step counter (which is also the sampler position: the
Poisson sampler is counter-based), and the accountant/ledger state as of step N. A folder counts only with its
``COMPLETED`` marker; it is written to a temporary folder and renamed, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.

Sensitive: the ledger state saved here is what makes a resumed run count every optimizer step exactly once; the
secret randomness key of a DP run (``secret`` in ``state.pt``) is what keeps its sample and noise unpredictable,
and is written nowhere else.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETED"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name; a tied weight is stored once (under its first name)."""
    seen: set[int] = set()
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out[name] = param.detach().cpu().contiguous()
    return out


def save_weights_and_optimizer(directory: Path, weights: dict[str, torch.Tensor], *, optimizer: dict,
                               scheduler: dict | None) -> None:
    """The gathered form of a checkpoint's weights and optimizer state (any world size can load it)."""
    save_file(weights, str(directory / "trainable.safetensors"))
    torch.save({"optimizer": optimizer, "scheduler": scheduler}, directory / "optimizer.pt")


def load_weights_and_optimizer(directory: Path) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    state = torch.load(directory / "optimizer.pt", weights_only=False)
    return load_file(str(directory / "trainable.safetensors")), state["optimizer"], state["scheduler"]


def save_checkpoint(run_dir: Path, step: int, *, parallel, extra: dict, rank_rng: list[dict],
                    secret: dict | None = None) -> Path:
    """Collective: write ``checkpoints/step-{step}`` atomically. ``parallel.save_state`` writes the weights and
    optimizer state (every rank, for sharded formats) into a staging folder; rank 0 adds ``extra`` (JSON-able:
    ledger, counters), the RNG state of every rank and ``secret`` (the DP run's randomness key, in ``state.pt``
    only), then the marker, and renames the folder into place."""
    import torch.distributed as dist

    final = run_dir / "checkpoints" / f"step-{step}"
    staging = final.parent / f".{final.name}.partial"  # one name every rank can find (a shared file system)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if distributed:
        dist.barrier()
    parallel.save_state(staging)
    if distributed:
        dist.barrier()
    if rank == 0:
        torch.save({"rng": rank_rng, "secret": secret or {}}, staging / "state.pt")
        (staging / "extra.json").write_text(json.dumps({"step": step, **extra}, indent=2, sort_keys=True))
        (staging / MARKER).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    if distributed:
        dist.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("step-*") if (p / MARKER).exists() and p.name[5:].isdigit()]
    return max(complete, key=lambda p: int(p.name[5:]), default=None)


def load_checkpoint(path: Path, *, parallel) -> tuple[dict, list[dict]]:
    """Collective: restore weights, optimizer and scheduler in place; return (extra, per-rank RNG states)."""
    parallel.load_state(path)
    state = torch.load(path / "state.pt", weights_only=False)
    extra = json.loads((path / "extra.json").read_text())
    return extra, state["rng"]


def load_secret(path: Path) -> dict:
    """The secret part of a checkpoint (``save_checkpoint(secret=...)``): {} when it has none."""
    return torch.load(path / "state.pt", weights_only=False).get("secret", {})


def prune_checkpoints(run_dir: Path, keep: int = 2) -> None:
    root = run_dir / "checkpoints"
    complete = sorted((p for p in root.glob("step-*") if (p / MARKER).exists()), key=lambda p: int(p.name[5:]))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
