"""Scoring throughput: the eval stage's per-token 2×2 scoring vs a plain batched forward pass, in one run.

    python benchmarks/scoring_throughput.py [--examples 64] [--batch 8] [--repeats 3] [--model smollm2-135m]

Both sides see the same model, the same CustomerSim examples, the same length-sorted batches; the plain side runs
``model(input_ids, attention_mask)`` and discards the logits, the scoring side runs ``eval.scoring.iter_scored``
(forward + per-token NLL + greedy hit, copied to numpy). Repeats alternate the two sides so that machine load
affects both alike; the median per side is reported. Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section  # noqa: E402

from privtune.corpora import build_corpus, tokenize  # noqa: E402
from privtune.eval.scoring import iter_scored, length_sorted_batches, pad_batch  # noqa: E402
from privtune.launch.config import DataConfig  # noqa: E402
from privtune.trainers.models import load_model  # noqa: E402


@torch.inference_mode()
def plain_forward(model, input_ids, *, batch_size: int, pad_id: int) -> None:
    for batch in length_sorted_batches([len(x) for x in input_ids], batch_size):
        ids, mask = pad_batch([input_ids[i] for i in batch], pad_id)
        model(input_ids=ids, attention_mask=mask)


def scoring(model, input_ids, *, batch_size: int, pad_id: int) -> None:
    for _ in iter_scored(model, input_ids, range(len(input_ids)), batch_size=batch_size, pad_id=pad_id):
        pass


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    records = build_corpus(DataConfig(source="customersim", num_examples=args.examples, canaries=None)).records
    input_ids = tokenize(records, tokenizer, max_length=128).input_ids
    tokens = sum(len(x) for x in input_ids)
    common = dict(batch_size=args.batch, pad_id=tokenizer.pad_token_id)
    plain_forward(model, input_ids[: args.batch], **common)  # warm-up
    times = {"plain": [], "scoring": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain_forward), ("scoring", scoring)):
            started = time.perf_counter()
            fn(model, input_ids, **common)
            times[name].append(time.perf_counter() - started)
    plain, score = statistics.median(times["plain"]), statistics.median(times["scoring"])
    result = {
        "model": args.model, "examples": args.examples, "tokens": tokens, "batch": args.batch,
        "plain_tokens_per_second": tokens / plain, "scoring_tokens_per_second": tokens / score,
        "ratio": plain / score, "repeats": args.repeats, "times": times,
        "machine": f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}",
        "load_average": os.getloadavg()[0],
    }
    command = "python benchmarks/scoring_throughput.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {result['machine']}; 1-minute load average at the end {result['load_average']:.1f}  ",
        f"Data: {args.examples} CustomerSim examples, {tokens} tokens, batch {args.batch}, model {args.model}",
        "",
        "| side | tokens/s (median of repeats) |",
        "|---|---|",
        f"| plain batched forward | {result['plain_tokens_per_second']:.0f} |",
        f"| 2×2 scoring (NLL + greedy hit per token) | {result['scoring_tokens_per_second']:.0f} |",
        "",
        f"**Scoring reaches {result['ratio']:.2f}× the plain forward's tokens/s** (target ≥ 0.9×).",
    ])
    replace_section(Path(args.out), "scoring_throughput", "Scoring throughput (issue 6)", body)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
