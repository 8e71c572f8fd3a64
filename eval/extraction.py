"""Extraction of sensitive spans: greedy-decode from the tokens before a span and compare with the span.

Owns: building one prompt per sensitive span of the (training) records, batched greedy decoding, the match
rules, and the per-label summary.

- **Prompt**: the record is tokenized exactly as training tokenizes it (``encode_with_offsets``: special tokens,
  unencodable characters removed, truncation at ``max_length``); the prompt is every token *before the first
  token that overlaps the span*. So the prompt is what the model saw in training, and the target starts where
  the prompt's last token ends: ``target = text[end of prompt : span.end]`` (usually " John Smith" with the
  leading space a tokenizer glues to the word). Spans with no token before them, or not wholly inside the first
  ``max_length`` tokens (the model never trained on them), are skipped and counted. Identical (text, span)
  pairs, such as the repeated copies of a canary, are scored once.
- **Decoding**: greedy (``do_sample=False``), left-padded batches of similar prompt length, ``max_new_tokens`` =
  the span's token count + ``margin`` (default 3); decoding stops at EOS.
- **Matching** on whitespace-normalized strings (runs of whitespace become one space, ends stripped):
  ``exact`` — the continuation starts with the target; ``partial`` — the character-level longest common prefix
  of continuation and target divided by the target's length (1.0 for an exact match; a greedy continuation that
  goes wrong once rarely recovers, so the common *prefix* is what was extracted).
- **Sampling**: at most ``max_spans`` spans, a seeded uniform sample over all eligible spans (all labels
  together), scored in record order.

Privacy unit: the record. Sensitive: the prompts and targets are training PII, and a successful continuation *is*
the PII; per-span results carry record ids, labels and scores only, and the continuation text only when asked
(``return_text=True``) — keep such results inside the run directory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from privtune.corpora.tokenization import encode_with_offsets
from privtune.eval.scoring import eval_mode, length_sorted_batches
from privtune.progress import progress

DEFAULT_MARGIN = 3
_NO_LIMIT = 1_000_000  # "max_length" when the caller gives none: longer than any text we tokenize


@dataclass(frozen=True)
class SpanPrompt:
    """One sensitive span to extract: the in-context tokens before it and the text a perfect model continues with."""

    record_id: str
    span_index: int  # position of the span in ``record.spans``
    label: str
    prompt_ids: tuple[int, ...]
    target: str
    span_tokens: int  # tokens overlapping the span


def normalize(text: str) -> str:
    """Runs of whitespace to one space, ends stripped."""
    return " ".join(text.split())


def match(continuation: str, target: str) -> tuple[bool, float]:
    """(exact, partial) for one continuation, with the rules of the module docstring."""
    cont, want = normalize(continuation), normalize(target)
    if not want:
        return False, 0.0
    common = 0
    for a, b in zip(cont, want, strict=False):
        if a != b:
            break
        common += 1
    return cont.startswith(want), common / len(want)


def span_prompts(records, tokenizer, *, max_length: int | None = None, max_spans: int | None = None,
                 seed: int = 0) -> tuple[list[SpanPrompt], dict[str, int]]:
    """Prompts for the sensitive spans of ``records`` and the counts of spans skipped, by reason."""
    encoded = encode_with_offsets(tokenizer, [r.text for r in records], max_length=max_length or _NO_LIMIT)
    prompts: list[SpanPrompt] = []
    skipped = {"no_prefix": 0, "beyond_max_length": 0, "duplicate": 0}
    seen: set[tuple[str, int, int]] = set()
    for record, (ids, offsets, _) in zip(records, encoded, strict=True):
        covered = max((b for a, b in offsets if b > a), default=0)
        for index, span in enumerate(record.spans):
            key = (record.text, span.start, span.end)
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            if span.end > covered:
                skipped["beyond_max_length"] += 1
                continue
            overlapping = [t for t, (a, b) in enumerate(offsets) if b > a and a < span.end and b > span.start]
            first = overlapping[0]
            if first == 0:
                skipped["no_prefix"] += 1
                continue
            start = max((b for a, b in offsets[:first] if b > a), default=0)
            prompts.append(SpanPrompt(record_id=record.id, span_index=index, label=span.label,
                                      prompt_ids=tuple(ids[:first]), target=record.text[start : span.end],
                                      span_tokens=len(overlapping)))
    if max_spans is not None and len(prompts) > max_spans:
        keep = sorted(random.Random(seed).sample(range(len(prompts)), max_spans))
        prompts = [prompts[i] for i in keep]
    return prompts, skipped


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                         batch_size: int, desc: str = "extraction") -> list[str]:
    """Greedy continuation of each prompt, at most ``max_new_tokens[i]`` tokens, decoded without special tokens."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    out: list[str] = [""] * len(prompts)
    with eval_mode(model), progress(total=len(prompts), desc=desc, unit="span") as bar:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends at the last column
                ids[row, width - len(prompts[i]) :] = torch.as_tensor(list(prompts[i]), dtype=torch.long)
                mask[row, width - len(prompts[i]) :] = 1
            budget = max(max_new_tokens[i] for i in batch)
            config = GenerationConfig(max_new_tokens=budget, min_new_tokens=0, do_sample=False, num_beams=1,
                                      pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config)
            for row, i in enumerate(batch):
                new = generated[row, width : width + max_new_tokens[i]].tolist()
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
            bar.update(len(batch))
    return out


def summarize(results: Sequence[dict]) -> dict:
    """``{"spans", "exact", "partial", "by_label": {label: {"spans", "exact", "partial"}}}`` (rates in [0, 1];
    ``None`` where there are no spans)."""

    def block(rows: Sequence[dict]) -> dict:
        n = len(rows)
        return {"spans": n,
                "exact": sum(r["exact"] for r in rows) / n if n else None,
                "partial": sum(r["partial"] for r in rows) / n if n else None}

    labels = sorted({r["label"] for r in results})
    return {**block(results), "by_label": {lab: block([r for r in results if r["label"] == lab]) for lab in labels}}


def extract_prompts(model, tokenizer, prompts: Sequence[SpanPrompt], *, batch_size: int = 16,
                    margin: int = DEFAULT_MARGIN, return_text: bool = False) -> list[dict]:
    """Greedy-decode every prompt and match it: one row per prompt, ``{"record_id", "span_index", "label",
    "exact", "partial", "prompt_tokens", "span_tokens"}`` (+ ``"continuation"`` with ``return_text``).

    Rows of disjoint prompt shards concatenate: build the prompts once (``span_prompts``), split them across
    processes, and ``summarize`` the joined rows.
    """
    if margin < 0:
        raise ValueError(f"margin={margin} must be >= 0")
    continuations = greedy_continuations(model, tokenizer, [p.prompt_ids for p in prompts],
                                         [p.span_tokens + margin for p in prompts], batch_size=batch_size)
    rows = []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        exact, partial = match(continuation, prompt.target)
        row = {"record_id": prompt.record_id, "span_index": prompt.span_index, "label": prompt.label,
               "exact": exact, "partial": partial, "prompt_tokens": len(prompt.prompt_ids),
               "span_tokens": prompt.span_tokens}
        if return_text:
            row["continuation"] = continuation
        rows.append(row)
    return rows


def extract_spans(
    model,
    tokenizer,
    records,
    *,
    batch_size: int = 16,
    max_spans: int | None = 1000,
    seed: int = 0,
    margin: int = DEFAULT_MARGIN,
    max_length: int | None = None,
    return_text: bool = False,
) -> dict:
    """Try to extract every sensitive span of ``records`` (pass the training records, and the training
    ``max_length``) by greedy decoding: ``span_prompts`` + ``extract_prompts`` + ``summarize`` in one process.

    Returns ``{"summary": summarize(rows) + {"skipped": {reason: count}, "max_spans", "seed", "margin"},
    "spans": rows}``.
    """
    prompts, skipped = span_prompts(records, tokenizer, max_length=max_length, max_spans=max_spans, seed=seed)
    rows = extract_prompts(model, tokenizer, prompts, batch_size=batch_size, margin=margin, return_text=return_text)
    summary = {**summarize(rows), "skipped": skipped, "max_spans": max_spans, "seed": seed, "margin": margin}
    return {"summary": summary, "spans": rows}
