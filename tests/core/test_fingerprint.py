"""Content fingerprints and stage records (privtune/fingerprint.py), against hashlib and by construction."""

from __future__ import annotations

import hashlib
import os

from privtune import fingerprint
from privtune.fingerprint import (
    StageRecord,
    file_digest,
    read_record,
    stale_reasons,
    tree_digest,
    write_record,
)


def test_small_files_are_hashed_by_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello")
    assert file_digest(path) == hashlib.sha256(b"hello").hexdigest()
    before = tree_digest(tmp_path)
    path.write_bytes(b"hellO")
    assert tree_digest(tmp_path) != before


def test_large_files_by_size_and_time_and_cache_blobs_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "CONTENT_LIMIT", 4)
    big = tmp_path / "w.bin"
    big.write_bytes(b"0123456789")
    stat = big.stat()
    assert file_digest(big) == f"stat:10:{stat.st_mtime_ns}"
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert file_digest(big) != f"stat:10:{stat.st_mtime_ns}"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc123").write_bytes(b"weights")
    (tmp_path / "model.safetensors").symlink_to(blobs / "abc123")
    assert file_digest(tmp_path / "model.safetensors") == "blob:abc123"


def test_tree_digest_skips_the_record_and_hidden_files(tmp_path):
    (tmp_path / "x").write_text("1")
    before = tree_digest(tmp_path)
    (tmp_path / "COMPLETED").write_text("{}")
    (tmp_path / ".tmp").write_text("junk")
    assert tree_digest(tmp_path) == before
    assert tree_digest(tmp_path, only=("y*",)) != before


def test_records_round_trip_and_key_on_config_and_inputs_only(tmp_path):
    rec = StageRecord(stage="eval", config={"eval.max_examples": 4}, inputs={"model": "m"}, free={"b": 1},
                      output="o", summary={"s": 1}, finished_at="t")
    write_record(tmp_path, rec)
    back = read_record(tmp_path)
    assert back == rec
    assert rec.key == StageRecord(stage="eval", config={"eval.max_examples": 4}, inputs={"model": "m"}).key
    assert rec.key != StageRecord(stage="eval", config={"eval.max_examples": 5}, inputs={"model": "m"}).key
    other = StageRecord(stage="eval", config={"eval.max_examples": 5}, inputs={"model": "n"})
    assert rec.differences(other) == ["eval.max_examples: 4 → 5", "the trained model changed"]


def test_a_marker_without_a_record_counts_as_stale(tmp_path):
    stage = tmp_path / "eval"
    stage.mkdir()
    (stage / "COMPLETED").write_text("{}\n")  # what an older privtune wrote
    assert "older privtune" in stale_reasons(tmp_path, "eval")[0]
    assert read_record(tmp_path / "model") is None
