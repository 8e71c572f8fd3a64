"""Model registry: every tiny family builds and runs forward; the embedded model loads offline; bad names refuse."""

import pytest
import torch

from privtune.errors import UserError
from privtune.trainers.models import TINY_FAMILIES, byte_tokenizer, load_model, load_tokenizer


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_forward_and_loss(family):
    model, tokenizer = load_model(family)
    batch = tokenizer(["User: where is my parcel?", "Agent: hi"], padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(out.loss)
    # A fresh random model predicts close to uniform: loss ≈ log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(tokenizer)))).item()) < 1.0


def test_tied_embeddings_where_the_family_ties_them():
    for family, tied in [("tiny-llama", True), ("tiny-qwen", True), ("tiny-gemma", True), ("tiny-pythia", False)]:
        model, _ = load_model(family)
        same = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert same == tied, family
    gemma, _ = load_model("tiny-gemma")
    assert hasattr(gemma.get_input_embeddings(), "embed_scale"), "Gemma keeps its scaled embedding"


def test_tiny_models_are_seeded():
    a, _ = load_model("tiny-llama", seed=1)
    b, _ = load_model("tiny-llama", seed=1)
    c, _ = load_model("tiny-llama", seed=2)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_byte_tokenizer_offsets_are_characters():
    tok = byte_tokenizer()
    text = "Call 555-0100 now"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    assert [text[a:b] for a, b in enc["offset_mapping"]] == list(text)


def test_embedded_model_loads_offline():
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.model_type == "llama"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("User: my order number is 4412.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert loss.item() < 8.0, "a trained model, not random weights"
    assert load_tokenizer("smollm2-135m").pad_token is not None


@pytest.mark.parametrize("name", ["org/not-in-cache", "/no/such/dir", "./missing-model"])
def test_unknown_model_is_refused_with_the_fix(name):
    with pytest.raises(UserError) as err:
        load_model(name)
    assert "\n" not in str(err.value)
    assert "download" in str(err.value) or "path" in str(err.value)


def test_a_hub_id_resolves_from_the_local_cache_without_any_download(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from privtune.trainers.models import build_tiny, resolve_model_source

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "0123abcd"
    model, tokenizer = build_tiny("tiny-llama")
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_source("acme/tiny") == str(snapshot)
