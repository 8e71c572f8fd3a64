"""What a win-rate comparison reads: the instructions file and the two models, checked before any work.

Owns: parsing the instructions JSONL (one object a line: ``instruction``, optional ``reference`` and ``id``; a bad
line is a ``UserError`` naming it), their digest, and turning a model argument into something loadable with a
stable identity:

- a run dir with a finished ``model/`` (``RUN/model/COMPLETED``): its trained model, identified by the digest of
  the weights the training stage recorded;
- anything else: a model name or path as ``privtune.trainers.models`` resolves it (the embedded ``smollm2-135m``,
  the tiny test families, a local folder, a cached hub id), identified by the digest of its files. Never a
  download.

Sensitive: instructions may be private; only their digest goes into keys and ``winrate.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from privtune.errors import UserError
from privtune.fingerprint import RECORD, digest, read_record, tree_digest


@dataclass(frozen=True)
class Instruction:
    id: str
    instruction: str
    reference: str | None = None


def load_instructions(path: Path) -> list[Instruction]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instructions file {path} does not exist", "pass a JSONL file with one {\"instruction\": ...} a line")
    rows: list[Instruction] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rows.append(_parse_line(path, number, line, default_id=str(len(rows))))
    if not rows:
        raise UserError(f"instructions file {path} holds no instructions", "write one {\"instruction\": ...} a line")
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: the id {duplicate!r} appears more than once", "give every instruction its own id")
    return rows


def _parse_line(path: Path, number: int, line: str, *, default_id: str) -> Instruction:
    where = f"{path} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not valid JSON ({err.msg})", "write one JSON object a line") from None
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object", "write {\"instruction\": \"...\"} on each line")
    unknown = sorted(set(row) - {"id", "instruction", "reference"})
    if unknown:
        raise UserError(f"{where} has the unknown field {unknown[0]!r}", "use only id, instruction and reference")
    text = row.get("instruction")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where} has no instruction text", "give it a non-empty \"instruction\" string")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise UserError(f"{where}: reference must be a string", "write the expected answer as a string")
    ident = row.get("id", default_id)
    if not isinstance(ident, (str, int)):
        raise UserError(f"{where}: id must be a string or an integer", "write e.g. \"id\": \"q1\"")
    return Instruction(id=str(ident), instruction=text, reference=reference)


def instructions_digest(instructions: list[Instruction]) -> str:
    return digest([[row.id, row.instruction, row.reference] for row in instructions])


@dataclass(frozen=True)
class ModelRef:
    """One side of the comparison: the argument as given, what it is, and the digest of its files."""

    spec: str
    kind: str  # "run" (a run dir's trained model) or "model" (a name or path)
    identity: str

    def load(self, *, dtype: str, seed: int):
        from privtune.trainers.models import load_model, load_trained

        if self.kind == "run":
            return load_trained(Path(self.spec) / "model", dtype=dtype, seed=seed)
        return load_model(self.spec, dtype=dtype, seed=seed)

    def tokenizer(self):
        """The tokenizer ``load`` returns, without loading the weights."""
        from privtune.trainers.models import load_tokenizer

        if self.kind == "model":
            return load_tokenizer(self.spec)
        model_dir = Path(self.spec) / "model"
        if (model_dir / "adapter_config.json").exists():  # load_trained pairs an adapter with its base's tokenizer
            return load_tokenizer(self._base_model())
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    def context_length(self) -> int | None:
        from privtune.trainers.models import model_context_length

        return model_context_length(self._base_model() if self.kind == "run" else self.spec)

    def _base_model(self) -> str:
        return json.loads((Path(self.spec) / "model" / "privtune.json").read_text())["base_model"]


def resolve_model(spec: str) -> ModelRef:
    """The model behind ``spec``, checked without loading weights (the embedded model is not converted either)."""
    from privtune.trainers.model_ids import model_digest
    from privtune.trainers.models import check_model_source

    path = Path(spec).expanduser()
    if (path / "model").is_dir():
        if not (path / "model" / RECORD).exists():
            raise UserError(f"run dir {spec} has no finished trained model (no model/{RECORD})",
                            "finish the run with `privtune run CONFIG`, or pass a model name")
        record = read_record(path / "model")
        identity = record.output if record and record.output else tree_digest(path / "model")
        return ModelRef(spec=str(path), kind="run", identity=identity)
    check_model_source(spec)
    return ModelRef(spec=spec, kind="model", identity=model_digest(spec))
