"""LoRA adapters through peft, and which parameters each method trains.

Owns: turning ``train.method`` + ``train.lora`` into the set of trainable parameters. For ``lora`` and ``dp-lora``
only the adapter matrices train; for ``full`` and ``dp`` every parameter does (a tied embedding counts once).

Sensitive: the DP engine clips over exactly this set; a parameter left trainable but outside it would be updated
without clipping, so the engine refuses any trainable parameter it has no rule for.
"""

from __future__ import annotations

import torch

from privtune.errors import UserError
from privtune.trainers.config import LoraConfig


def apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules
    try:
        peft_model = get_peft_model(model, PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            bias="none", task_type="CAUSAL_LM"))
    except ValueError as err:
        raise UserError(f"train.lora.target_modules={targets!r} matches no module of this model ({err})",
                        "use all-linear or the model's module names (q_proj, v_proj, query_key_value, ...)") from None
    return peft_model


def unique_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def prepare_trainable(model, method: str, lora: LoraConfig):
    """Return (model, trainable parameters) for the method."""
    if method in ("lora", "dp-lora"):
        model = apply_lora(model, lora)
    elif method in ("full", "dp"):
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(f"no trainable parameters for method {method!r}")
    return model, unique_trainable(model)
