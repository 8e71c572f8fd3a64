"""The win-rate command: check its inputs, answer, judge, and write ``winrate.json``.

    privtune winrate --models runs/dp3 smollm2-135m --instructions prompts.jsonl --judge lm:smollm2-135m
    torchrun --nproc_per_node 2 -m privtune winrate --models A B --instructions FILE   # answers and verdicts sharded

Owns: the order of the work (stale part files dropped on rank 0; both models' answers; every verdict; rank 0
aggregates), what an excluded instruction is listed with, ``<out>/winrate.json`` (every number, the per-instruction
verdicts and lengths, the failures with reasons, and the provenance: models, instructions digest, judge, settings)
and the short summary. A rerun of the same command reuses every answer and verdict already written; a changed
model, instruction set, judge or setting gets new keys and its old part files are dropped.

Sensitive: see the package docstring; ``winrate.json`` holds no answer or instruction text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from privtune.atomic import atomic_write_json
from privtune.errors import UserError
from privtune.eval.winrate import stats
from privtune.eval.winrate.answers import answers_key, generate_answers, read_answers
from privtune.eval.winrate.inputs import Instruction, ModelRef, instructions_digest
from privtune.eval.winrate.judges import OpenAIJudge
from privtune.eval.winrate.judging import ORDERS, judge_pending, judgments_key, read_judgments
from privtune.eval.winrate.parts import drop_stale
from privtune.process import ProcessState, current
from privtune.progress import info


@dataclass(frozen=True, kw_only=True)
class WinrateSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    dtype: str = "float32"
    seed: int = 0  # the tiny test models' weights
    resamples: int = stats.DEFAULT_RESAMPLES
    level: float = stats.DEFAULT_LEVEL
    bootstrap_seed: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "resamples"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}",
                                f"pass --{name.replace('_', '-')} 1 or more")
        if not 0 < self.level < 1:
            raise UserError(f"the interval level must lie in (0, 1), got {self.level}", "use e.g. 0.95")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"unknown dtype {self.dtype}", "use float32 or bfloat16")


def check_judge_inputs(judge, instructions: list[Instruction], path: Path) -> None:
    if judge.needs_reference():
        missing = [row.id for row in instructions if row.reference is None]
        if missing:
            raise UserError(f"the {judge.name} judge needs a reference for every instruction; {path} has none for "
                            f"{len(missing)} (first id: {missing[0]})",
                            "add \"reference\" to those lines, or choose --judge lm:MODEL")


def run_winrate(models: tuple[ModelRef, ModelRef], instructions: list[Instruction], judge, out_dir: Path, *,
                settings: WinrateSettings, instructions_path: Path | None = None,
                proc: ProcessState | None = None) -> dict:
    """Answer and judge on every rank; return the result on rank 0 (written to ``out_dir/winrate.json``), {}
    elsewhere."""
    proc = proc or current()
    out_dir = Path(out_dir)
    digest_of_instructions = instructions_digest(instructions)
    keys = {label: answers_key(ref, digest_of_instructions, max_new_tokens=settings.max_new_tokens,
                               dtype=settings.dtype, seed=settings.seed) for label, ref in zip("AB", models, strict=True)}
    jkey = judgments_key((keys["A"], keys["B"]), judge)
    if proc.is_main:
        drop_stale(out_dir, [keys["A"], keys["B"], jkey])
    proc.barrier()
    for label, ref in zip("AB", models, strict=True):
        generate_answers(ref, instructions, out_dir, keys[label], proc, max_new_tokens=settings.max_new_tokens,
                         batch_size=settings.batch_size, dtype=settings.dtype, seed=settings.seed,
                         label=f"{label} ({ref.spec})")
        proc.barrier()
    answers = {label: read_answers(out_dir, keys[label]) for label in "AB"}
    announce(judge)
    judge_pending(judge, instructions, answers, out_dir, jkey, proc)
    proc.barrier()
    if not proc.is_main:
        return {}
    result = aggregate(instructions, answers, read_judgments(out_dir, jkey), settings=settings)
    result.update(models={"A": models[0].spec, "B": models[1].spec}, judge=judge.name, out=str(out_dir),
                  provenance={"models": {label: asdict(ref) for label, ref in zip("AB", models, strict=True)},
                              "instructions": {"path": str(instructions_path) if instructions_path else None,
                                               "digest": digest_of_instructions},
                              "judge": judge.identity(), "settings": asdict(settings),
                              "keys": {"answers": keys, "judgments": jkey}, "world_size": proc.world_size})
    atomic_write_json(out_dir / "winrate.json", result)
    return result


def aggregate(instructions: list[Instruction], answers: dict[str, dict[int, dict]],
              judgments: dict[tuple[int, str], dict], *, settings: WinrateSettings) -> dict:
    """Every instruction is either scored (both verdicts) or listed among the failures with its reasons."""
    scored, per_instruction, failures = [], [], []
    for i, row in enumerate(instructions):
        reasons = _failures_of(i, answers, judgments)
        if reasons:
            failures.extend({"id": row.id, "stage": stage, "reason": reason} for stage, reason in reasons)
            continue
        ab, ba = judgments[(i, "AB")]["verdict"], judgments[(i, "BA")]["verdict"]
        lengths = {"len_a": len(answers["A"][i]["answer"]), "len_b": len(answers["B"][i]["answer"])}
        scored.append({"AB": ab, "BA": ba, **lengths})
        per_instruction.append({"id": row.id, "AB": ab, "BA": ba, "score": stats.instruction_score(ab, ba),
                                "margins": [judgments[(i, o)]["margin"] for o in ORDERS], **lengths})
    summary = stats.summarize(scored, resamples=settings.resamples, level=settings.level,
                              seed=settings.bootstrap_seed)
    by_reason: dict[str, int] = {}
    for failure in failures:
        reason = f"{failure['stage']}: {failure['reason']}"
        by_reason[reason] = by_reason.get(reason, 0) + 1
    verdicts = [row for row in judgments.values() if row["verdict"] is not None]
    masses = [row["mass"] for row in verdicts if row.get("mass") is not None]
    return {**summary, "instructions": len(instructions), "judged": len(verdicts),
            "excluded": len(instructions) - summary["over"],
            "failures": {"count": len(failures), "by_reason": by_reason, "items": failures},
            "answers": {label: _answer_stats(answers[label]) for label in "AB"},
            "judge_choice_mass": sum(masses) / len(masses) if masses else None,
            "per_instruction": per_instruction}


def _failures_of(i: int, answers: dict, judgments: dict) -> list[tuple[str, str]]:
    reasons = []
    for label in "AB":
        row = answers[label].get(i)
        if row is None:
            reasons.append((f"answer {label}", "never answered"))
        elif row["answer"] is None:
            reasons.append((f"answer {label}", row["failure"]))
    if reasons:
        return reasons
    for order in ORDERS:
        row = judgments.get((i, order))
        if row is None:
            reasons.append((f"judge {order}", "never judged"))
        elif row["verdict"] is None:
            reasons.append((f"judge {order}", row["failure"]))
    return reasons


def _answer_stats(rows: dict[int, dict]) -> dict:
    texts = [row for row in rows.values() if row["answer"] is not None]
    return {"answered": len(texts), "cut_at_max_new_tokens": sum(row["stop"] == "length" for row in texts),
            "mean_chars": sum(len(row["answer"]) for row in texts) / len(texts) if texts else None}


def describe(result: dict) -> str:
    """The few lines a person reads; winrate.json has the rest."""
    a, b = result["models"]["A"], result["models"]["B"]
    over, total = result["over"], result["instructions"]
    if over == 0:
        head = f"win rate of A ({a}) over B ({b}): no instruction was judged in both orders ({total} instructions)"
    else:
        low, high = result["ci"]
        head = (f"win rate of A ({a}) over B ({b}): {result['win_rate']:.1%} "
                f"[{result['provenance']['settings']['level']:.0%} CI {low:.1%}–{high:.1%}] over {over} of {total} "
                f"instructions (judge {result['judge']})")
    lines = [head]
    if over:
        o = result["outcomes"]
        lines.append(f"  length-controlled {result['length_controlled_win_rate']:.1%}; position-consistent "
                     f"{result['position_consistency']:.0%}; A won {o['A']}, B won {o['B']}, split {o['split']}; "
                     f"tie verdicts {result['tie_verdicts']}")
    if result["failures"]["count"]:
        reasons = "; ".join(f"{reason} ×{n}" for reason, n in sorted(result["failures"]["by_reason"].items()))
        lines.append(f"  excluded {result['excluded']} instruction(s), failures: {reasons}")
    lines.append(f"  written: {result['out']}/winrate.json")
    return "\n".join(lines)


def announce(judge) -> None:
    """Say where private text goes before it goes there."""
    if isinstance(judge, OpenAIJudge):
        info(f"[bold]winrate[/]  the judge sends instructions and both answers to {judge.url}")
