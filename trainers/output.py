"""What a training run releases: an HF-loadable model dir with a model card, and its cost record.

Owns: ``model/`` (full weights as safetensors, or a PEFT adapter that names its base model), its model card and
``privtune.json``. The cost record ``efficiency.json`` is written by the recipe; peak memory comes from
``trainers.memory``.

Sensitive: the model card states the method and the (ε, δ) guarantee — or, for non-DP methods and non-private
debug runs, says in words that there is no formal guarantee. It never claims an ε that the ledger does not back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Guarantee:
    epsilon: float | None
    delta: float | None
    accountant: str | None
    unit: str
    note: str

    @property
    def formal(self) -> bool:
        return self.epsilon is not None


def card_text(*, method: str, base_model: str, base_hub_id: str | None, data_source: str, guarantee: Guarantee,
              steps: int) -> str:
    if guarantee.formal:
        privacy = (f"({guarantee.epsilon:.4g}, {guarantee.delta:.3g})-differentially private with respect to one "
                   f"{guarantee.unit} of the training data (add/remove neighbours; accountant: "
                   f"{guarantee.accountant}). {guarantee.note}")
    else:
        privacy = f"**No formal privacy guarantee.** {guarantee.note}"
    loads_as = (f"`{base_hub_id}` (privtune: `{base_model}`)" if base_hub_id and base_hub_id != base_model
                else f"`{base_model}`")
    return f"""---
library_name: {"peft" if "lora" in method else "transformers"}
base_model: {base_hub_id or base_model}
tags: [privtune, {method}]
---
# {method} fine-tune of {base_model}

Trained by privtune with method `{method}` for {steps} optimizer steps on `{data_source}`. Base model: {loads_as}.

## Privacy
{privacy}

The privacy ledger (`ledger.json` in the run dir) lists every release this guarantee rests on; `privtune.json`
records its hash at release, and `privtune budget` refuses a ledger that changed since. Compose it with other
releases using `privtune budget`.
"""


def save_model_dir(out: Path, model, tokenizer, *, method: str, base_model: str, data_source: str,
                   guarantee: Guarantee, steps: int, ledger: dict | None = None, event: dict | None = None) -> None:
    """Write the releasable model into ``out`` (a temporary dir the caller renames).

    A PEFT adapter names its base by the hub id (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the embedded model), so
    plain peft users can load it anywhere; ``privtune.json`` keeps privtune's stable id, which privtune resolves
    locally (``trainers.models.load_trained``). Never a path into a local cache.
    """
    from privtune.trainers.model_ids import hub_id

    base_hub_id = hub_id(base_model)
    model.save_pretrained(out, safe_serialization=True)
    adapter_config = out / "adapter_config.json"
    if adapter_config.exists():
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base_hub_id or base_model
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card_text(method=method, base_model=base_model, base_hub_id=base_hub_id,
                                             data_source=data_source, guarantee=guarantee, steps=steps))
    meta = {"method": method, "base_model": base_model, "base_model_hub_id": base_hub_id, "steps": steps,
            "guarantee": asdict(guarantee), "ledger": ledger, "event": event}
    (out / "privtune.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def trainable_parameter_count(model) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
