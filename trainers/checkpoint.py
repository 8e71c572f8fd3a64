"""Checkpoints: everything needed to continue a run exactly where it stopped.

Owns: ``checkpoints/step-N/`` folders holding the trainable weights (the adapter only for LoRA), optimizer and
scheduler state, the RNG state of every rank, the step counter (which is also the sampler position: the
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

from privtune.atomic import staged_dir

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


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, extra: dict, rank_rng: list[dict],
                    secret: dict | None = None) -> Path:
    """Write ``checkpoints/step-{step}`` atomically; ``extra`` holds JSON-able state (accountant, ledger, counters),
    ``secret`` what must never leave the checkpoint (the DP run's randomness key), stored in ``state.pt`` only."""
    final = run_dir / "checkpoints" / f"step-{step}"
    with staged_dir(final) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rank_rng, "secret": secret or {}}, tmp / "state.pt")
        (tmp / "extra.json").write_text(json.dumps({"step": step, **extra}, indent=2, sort_keys=True))
        (tmp / MARKER).write_text(f"{step}\n")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("step-*") if (p / MARKER).exists() and p.name[5:].isdigit()]
    return max(complete, key=lambda p: int(p.name[5:]), default=None)


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
    """Restore weights, optimizer and scheduler in place; return (extra, per-rank RNG states)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
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
