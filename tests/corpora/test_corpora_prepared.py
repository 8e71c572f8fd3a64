"""Prepared data on disk: byte-identical for the same config and seed, round-trips, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privtune.corpora import build_corpus, load_prepared, save_prepared, split_corpus, tokenize
from privtune.corpora import prepared as prepared_module
from privtune.errors import UserError
from privtune.launch.config import CanaryConfig, DataConfig


def _prepare(cfg: DataConfig, tokenizer, data_dir: Path) -> dict:
    """What the data stage does (privtune.launch.pipeline.prepare_data), minus the model config."""
    corpus = build_corpus(cfg)
    train, test = split_corpus(corpus, test_fraction=cfg.test_fraction, seed=cfg.seed)
    return save_prepared(
        data_dir, train, test,
        tokenize(train, tokenizer, max_length=cfg.max_length), tokenize(test, tokenizer, max_length=cfg.max_length),
        corpus.canaries, {"source": corpus.source, "spans_origin": corpus.spans_origin, "tokenizer": "test"},
    )


def _bytes(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir())}


CFG = DataConfig(source="customersim", num_examples=80, max_length=96, canaries=CanaryConfig(count=2, repetitions=3))


@pytest.mark.parametrize("tokenizer_name", ["byte_tok", "smollm2"])
def test_same_config_same_bytes(tmp_path, request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    _prepare(CFG, tokenizer, tmp_path / "a")
    _prepare(CFG, tokenizer, tmp_path / "b")
    first = _bytes(tmp_path / "a")
    assert set(first) == set(prepared_module.FILES)
    assert first == _bytes(tmp_path / "b")
    _prepare(CFG.model_copy(update={"seed": 1}), tokenizer, tmp_path / "c")
    other = _bytes(tmp_path / "c")
    assert all(first[name] != other[name] for name in first if name != "meta.json")


def test_synbio_and_grouped_data_are_deterministic_too(tmp_path, byte_tok):
    cfg = DataConfig(source="synbio", num_examples=40, group_by="person")
    _prepare(cfg, byte_tok, tmp_path / "a")
    _prepare(cfg, byte_tok, tmp_path / "b")
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")


def test_round_trip_and_meta(tmp_path, smollm2):
    meta = _prepare(CFG, smollm2, tmp_path / "data")
    loaded = load_prepared(tmp_path / "data")
    assert loaded.meta == meta == json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["source"] == "customersim" and meta["spans_origin"] == "gold" and meta["num_canaries"] == 2
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    assert train["examples"] == len(loaded.train) == len(loaded.train_records) == 64 + 6
    assert test["examples"] == len(loaded.test) == 16
    assert train["canary_examples"] == 6 and test["canary_examples"] == 0
    assert train["tokens"] == loaded.train.num_tokens and test["sensitive_tokens"] == loaded.test.num_sensitive
    assert 0 < train["sensitive_tokens"] < train["tokens"]
    # Tokens and records line up, and the masks survive the compact 0/1 encoding.
    corpus = build_corpus(CFG)
    fresh_train, _ = split_corpus(corpus, test_fraction=CFG.test_fraction, seed=CFG.seed)
    assert loaded.train_records == fresh_train
    assert loaded.train.examples == tokenize(fresh_train, smollm2, max_length=96).examples
    assert loaded.canaries == corpus.canaries
    canaries_json = json.loads((tmp_path / "data" / "canaries.json").read_text())
    assert canaries_json[0]["candidates_size"] == 10**6


def test_missing_or_corrupt_prepared_data_is_a_user_error(tmp_path, byte_tok):
    _prepare(CFG, byte_tok, tmp_path / "data")
    (tmp_path / "data" / "tokens.test.jsonl").unlink()
    with pytest.raises(UserError, match="missing tokens.test.jsonl"):
        load_prepared(tmp_path / "data")
    with pytest.raises(UserError, match="missing"):
        load_prepared(tmp_path / "nowhere")
    _prepare(CFG, byte_tok, tmp_path / "data")
    (tmp_path / "data" / "meta.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        load_prepared(tmp_path / "data")


def test_failed_write_leaves_nothing_behind(tmp_path, byte_tok, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepared_module, "_write_json", explode)
    with pytest.raises(OSError):
        _prepare(CFG, byte_tok, tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_canary_copies_in_test_are_refused(tmp_path, byte_tok):
    corpus = build_corpus(CFG)
    train, test = split_corpus(corpus, test_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="training split"):
        save_prepared(tmp_path / "d", test, train, tokenize(test, byte_tok, max_length=32),
                      tokenize(train, byte_tok, max_length=32), corpus.canaries, {})
