"""Prepared data on disk: the run directory's ``data/`` folder, written once and read by training and evaluation.

Owns: ``save_prepared`` / ``load_prepared`` and the file format. One folder holds

- ``records.train.jsonl``, ``records.test.jsonl``: ``{"id", "text", "spans": [[start, end, label], ...], "group",
  "canary_id"}`` per line;
- ``tokens.train.jsonl``, ``tokens.test.jsonl``: ``{"example_id", "input_ids", "sensitive", "group", "canary_id",
  "truncated"}`` per line, ``sensitive`` written compactly as a string of ``0``/``1`` (one character per token);
- ``canaries.json`` (secrets, patterns, candidate-space sizes) and ``meta.json`` (source, spans origin, per-split
  counts, whatever the caller adds).

Bytes are deterministic (sorted keys, no timestamps, fixed separators), so the same config and seed give
byte-identical files. The folder is written to a temporary sibling and renamed when complete: it is either whole
or absent.

Privacy unit: as in the records. Sensitive: everything here. ``records.*`` and ``canaries.json`` hold the raw
PII and the canary secrets in clear — the run directory must be kept as private as the input data, and nothing
in it may be released except through a DP mechanism.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from privtune.atomic import staged_dir
from privtune.corpora.records import Canary, Record, Span
from privtune.corpora.tokenization import TokenizedExample, TokenizedSplit
from privtune.errors import UserError

SPLITS = ("train", "test")
FILES = (*(f"records.{s}.jsonl" for s in SPLITS), *(f"tokens.{s}.jsonl" for s in SPLITS), "canaries.json", "meta.json")


@dataclass
class PreparedData:
    train: TokenizedSplit
    test: TokenizedSplit
    train_records: list[Record]
    test_records: list[Record]
    canaries: list[Canary]
    meta: dict[str, Any]


def _line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def _record_row(r: Record) -> dict:
    return {"id": r.id, "text": r.text, "spans": [[s.start, s.end, s.label] for s in r.spans],
            "group": r.group, "canary_id": r.canary_id}


def _token_row(e: TokenizedExample) -> dict:
    return {"example_id": e.example_id, "input_ids": e.input_ids, "sensitive": "".join("01"[b] for b in e.sensitive),
            "group": e.group, "canary_id": e.canary_id, "truncated": e.truncated}


def _write_lines(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(_line(row) for row in rows)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def split_counts(records: Sequence[Record], tokens: TokenizedSplit) -> dict[str, int]:
    return {
        "examples": len(tokens),
        "tokens": tokens.num_tokens,
        "sensitive_tokens": tokens.num_sensitive,
        "canary_examples": sum(r.canary_id is not None for r in records),
        "truncated_examples": tokens.num_truncated,
    }


def save_prepared(
    data_dir: str | Path,
    train_records: Sequence[Record],
    test_records: Sequence[Record],
    train_tok: TokenizedSplit,
    test_tok: TokenizedSplit,
    canaries: Sequence[Canary],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write the prepared data to ``data_dir`` atomically; return the meta written (caller's keys + counts)."""
    pairs = {"train": (train_records, train_tok), "test": (test_records, test_tok)}
    for name, (records, tokens) in pairs.items():
        if [r.id for r in records] != [e.example_id for e in tokens]:
            raise ValueError(f"{name}: records and tokenized examples are not in the same order")
    if any(r.canary_id is not None for r in test_records):
        raise ValueError("canary copies must only be in the training split")
    full_meta = {**meta, "splits": {name: split_counts(*pair) for name, pair in pairs.items()},
                 "num_canaries": len(canaries)}
    with staged_dir(Path(data_dir)) as tmp:
        for name, (records, tokens) in pairs.items():
            _write_lines(tmp / f"records.{name}.jsonl", (_record_row(r) for r in records))
            _write_lines(tmp / f"tokens.{name}.jsonl", (_token_row(e) for e in tokens))
        _write_json(tmp / "canaries.json", [{**asdict(c), "candidates_size": c.candidates_size()} for c in canaries])
        _write_json(tmp / "meta.json", full_meta)
    return full_meta


def _read_lines(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _record(row: dict) -> Record:
    spans = tuple(Span(s, e, label) for s, e, label in row["spans"])
    return Record(id=row["id"], text=row["text"], spans=spans, group=row["group"], canary_id=row["canary_id"])


def _example(row: dict) -> TokenizedExample:
    return TokenizedExample(example_id=row["example_id"], input_ids=row["input_ids"],
                            sensitive=[c == "1" for c in row["sensitive"]], group=row["group"],
                            canary_id=row["canary_id"], truncated=row["truncated"])


def load_prepared(data_dir: str | Path) -> PreparedData:
    data_dir = Path(data_dir)
    missing = [name for name in FILES if not (data_dir / name).is_file()]
    if missing:
        raise UserError(f"prepared data in {data_dir} is missing {', '.join(missing)}",
                        "delete the run directory and run again to prepare the data")
    try:
        records = {s: [_record(row) for row in _read_lines(data_dir / f"records.{s}.jsonl")] for s in SPLITS}
        tokens = {s: TokenizedSplit([_example(row) for row in _read_lines(data_dir / f"tokens.{s}.jsonl")])
                  for s in SPLITS}
        canary_rows = json.loads((data_dir / "canaries.json").read_text(encoding="utf-8"))
        canaries = [Canary(**{k: v for k, v in row.items() if k != "candidates_size"}) for row in canary_rows]
        meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise UserError(f"prepared data in {data_dir} is corrupt",
                        "delete the run directory and run again to prepare the data") from None
    return PreparedData(train=tokens["train"], test=tokens["test"], train_records=records["train"],
                        test_records=records["test"], canaries=canaries, meta=meta)
