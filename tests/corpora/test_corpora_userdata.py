"""User data: .jsonl / .csv / datasets directories, given spans, group_by, and every bad input as a UserError."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from privtune.corpora import Span, build_corpus
from privtune.errors import UserError
from privtune.launch.config import DataConfig

ROWS = [
    {"text": "Hi, I am Ana Lima and I live in Porto.", "sensitive_spans": [[9, 17, "name"], [32, 37, "city"]],
     "user": "u1"},
    {"text": "Nothing private here.", "sensitive_spans": [], "user": "u2"},
    {"text": "Ana again, call 555-0100.", "sensitive_spans": [[0, 3, "name"]], "user": "u1"},
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def _build(source: Path, **kw):
    return build_corpus(DataConfig(source=str(source), canaries=None, **kw))


def _user_error(source: Path, **kw) -> str:
    with pytest.raises(UserError) as err:
        _build(source, **kw)
    message = str(err.value)
    assert "\n" not in message and ": " in message  # one line: the problem, then the fix
    return message


def _check_rows(corpus):
    assert corpus.spans_origin == "given"
    assert [r.text for r in corpus.records] == [r["text"] for r in ROWS]
    assert corpus.records[0].spans == (Span(9, 17, "name"), Span(32, 37, "city"))
    assert corpus.records[0].span_texts() == ["Ana Lima", "Porto"]
    assert corpus.records[1].spans == ()


def test_jsonl_with_spans_and_groups(tmp_path):
    corpus = _build(_jsonl(tmp_path / "d.jsonl", ROWS), group_by="user")
    _check_rows(corpus)
    assert [r.group for r in corpus.records] == ["u1", "u2", "u1"]
    assert corpus.source == str(tmp_path / "d.jsonl")


def test_csv_with_spans(tmp_path):
    _check_rows(_build(_csv(tmp_path / "d.csv", ROWS)))


def test_datasets_directory(tmp_path):
    from datasets import Dataset, DatasetDict

    # Arrow cannot hold [start, end, label] lists (mixed types): datasets store spans as structs.
    rows = [{**r, "sensitive_spans": [{"start": a, "end": b, "label": c} for a, b, c in r["sensitive_spans"]]}
            for r in ROWS]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    _check_rows(_build(tmp_path / "ds"))
    DatasetDict({"train": Dataset.from_list(rows[:2]), "validation": Dataset.from_list(rows[2:])}).save_to_disk(
        str(tmp_path / "dd"))
    _check_rows(_build(tmp_path / "dd"))


def test_custom_field_names_and_span_forms(tmp_path):
    rows = [{"body": "Mail bob@x.org now", "pii": [{"start": 5, "end": 14, "label": "email"}]},
            {"body": "Call me", "pii": [[0, 4]]}]
    corpus = _build(_jsonl(tmp_path / "d.jsonl", rows), text_field="body", spans_field="pii")
    assert corpus.records[0].spans == (Span(5, 14, "email"),)
    assert corpus.records[1].spans == (Span(0, 4, "sensitive"),)


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        ([[0, 99, "name"]], "outside the text"),
        ([[-1, 3, "name"]], "outside the text"),
        ([[0, 5, "a"], [3, 8, "b"]], "overlaps"),
        ([[5, 5, "name"]], "end <= start"),
        ([[6, 2, "name"]], "end <= start"),
        ([[0.5, 2, "name"]], "integer offsets"),
        ([[0, 2, 3, 4]], "not \\[start, end, label\\]"),
        ("[[0, 2", "not a JSON list"),
        ({"start": 0}, "not a list of spans"),
    ],
)
def test_bad_spans(tmp_path, spans, expected):
    rows = [{"text": "Hello world, friend.", "sensitive_spans": []}, {"text": "Hello world.", "sensitive_spans": spans}]
    message = _user_error(_jsonl(tmp_path / "d.jsonl", rows))
    assert "line 2" in message
    assert __import__("re").search(expected, message), message


def test_spans_missing_on_some_records(tmp_path):
    rows = [{"text": "a", "sensitive_spans": []}, {"text": "b"}]
    assert "has no 'sensitive_spans'" in _user_error(_jsonl(tmp_path / "d.jsonl", rows))


def test_empty_dataset(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n\n")
    assert "holds no records" in _user_error(tmp_path / "d.jsonl")
    (tmp_path / "d.csv").write_text("text\n")
    assert "holds no records" in _user_error(tmp_path / "d.csv")


def test_missing_text_field(tmp_path):
    message = _user_error(_jsonl(tmp_path / "d.jsonl", [{"body": "x"}]))
    assert "no text field 'text'" in message and "body" in message and "data.text_field" in message


def test_empty_text(tmp_path):
    assert "empty or not text" in _user_error(_jsonl(tmp_path / "d.jsonl", [{"text": ""}]))
    assert "empty or not text" in _user_error(_jsonl(tmp_path / "e.jsonl", [{"text": 5}]))


def test_missing_file(tmp_path):
    assert "does not exist" in _user_error(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "line 2 is not valid JSON"),
        ("list.jsonl", b'["text"]\n', "not a JSON object"),
        ("latin.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
        ("latin.csv", "text\ncaf\u00e9\n".encode("latin-1"), "not UTF-8"),
        ("data.parquet", b"PAR1", "unsupported type"),
    ],
)
def test_unreadable_files(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    assert expected in _user_error(tmp_path / name)


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notds").mkdir()
    assert "not a dataset saved with" in _user_error(tmp_path / "notds")


def test_group_by_missing(tmp_path):
    rows = [{"text": "a", "user": "u1"}, {"text": "b"}]
    message = _user_error(_jsonl(tmp_path / "d.jsonl", rows), group_by="user")
    assert "line 2" in message and "group_by field 'user'" in message
    message = _user_error(_csv(tmp_path / "d.csv", [{"text": "a", "user": "u1"}, {"text": "b", "user": ""}]),
                          group_by="user")
    assert "row 2" in message
