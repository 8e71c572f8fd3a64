"""Judging every instruction in both orders, each verdict written as it is made, resumable and sharded.

Owns: the two orders (``AB``: A's answer shown first; ``BA``: B's first), un-swapping a positional verdict into
``A`` / ``B`` / ``tie``, and the judgment part files. Under torchrun rank r judges the pending (instruction, order)
items ``r::world``. A judgment is appended (flushed) as soon as the judge returns it, so an interrupted run
re-judges nothing already judged. A failed call is written too, so it is counted; a rerun tries failed calls
once more, and a success replaces the failure. Rows are keyed by ``judgments_key``: both answer keys and the
judge's identity.

Sensitive: judgment rows hold verdicts and margins only, no text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from privtune.eval.winrate.inputs import Instruction
from privtune.eval.winrate.judges import Pair
from privtune.eval.winrate.parts import PartWriter, part_path, read_parts
from privtune.fingerprint import digest
from privtune.process import ProcessState
from privtune.progress import progress

ORDERS = ("AB", "BA")


def judgments_key(answer_keys: tuple[str, str], judge) -> str:
    return digest({"answers": list(answer_keys), "judge": judge.identity()})


def unswap(order: str, position: str) -> str:
    """The model a positional verdict prefers: in order AB "first" is A, in BA it is B."""
    if position == "tie":
        return "tie"
    shown_first, shown_second = ("A", "B") if order == "AB" else ("B", "A")
    return shown_first if position == "first" else shown_second


def make_pair(instruction: Instruction, answer_a: str, answer_b: str, order: str) -> Pair:
    first, second = (answer_a, answer_b) if order == "AB" else (answer_b, answer_a)
    return Pair(instruction=instruction.instruction, first=first, second=second, reference=instruction.reference)


def read_judgments(out_dir: Path, key: str) -> dict[tuple[int, str], dict]:
    """(instruction index, order) -> its row; a success replaces any failure of the same item."""
    rows: dict[tuple[int, str], dict] = {}
    for row in read_parts(out_dir, "judgments", key):
        item = (row["i"], row["order"])
        if item not in rows or row["verdict"] is not None:
            rows[item] = row
    return rows


def judge_pending(judge, instructions: Sequence[Instruction], answers: dict[str, dict[int, dict]], out_dir: Path,
                  key: str, proc: ProcessState) -> None:
    """This rank's share of the (instruction, order) items with both answers and no successful verdict yet."""
    done = {item for item, row in read_judgments(out_dir, key).items() if row["verdict"] is not None}
    proc.barrier()  # every rank splits the same pending list: none may write before all have read
    answered = [i for i in range(len(instructions))
                if answers["A"].get(i, {}).get("answer") is not None and answers["B"].get(i, {}).get("answer") is not None]
    mine = [(i, order) for i in answered for order in ORDERS if (i, order) not in done][proc.rank :: proc.world_size]
    if not mine:
        return
    judge.load(proc.device)
    pairs = [make_pair(instructions[i], answers["A"][i]["answer"], answers["B"][i]["answer"], order)
             for i, order in mine]
    with PartWriter(part_path(out_dir, "judgments", key, proc.rank)) as writer, \
            progress(total=len(mine), desc=f"judging ({judge.name})", unit="verdict") as bar:
        for (i, order), verdict in zip(mine, judge.verdicts(pairs), strict=True):
            writer.write([{"i": i, "order": order, "position": verdict.choice,
                           "verdict": unswap(order, verdict.choice) if verdict.choice else None,
                           "failure": verdict.failure, "margin": verdict.margin, "mass": verdict.mass}])
            bar.update()
