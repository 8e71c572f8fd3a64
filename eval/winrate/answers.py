"""The two models' answers: batched greedy generation, sharded across ranks, written as it goes.

Owns: the prompt (the tokenizer's chat template with the instruction as the one user turn, when the tokenizer has
a template; else the raw instruction), batched greedy decoding (left padding, length-sorted batches, at most
``max_new_tokens`` new tokens, stop at EOS), and the answer part files. Under torchrun rank r answers the pending
instructions ``r::world``; every batch is appended to the rank's part file (flushed) before the next starts, so an
interrupted run resumes with the answers already written, with any number of processes. Rows are keyed by
``answers_key``: the model's identity, the instructions' digest and every generation setting, so an answer is
never reused for another model, instruction set or setting.

An instruction whose prompt leaves no room for ``max_new_tokens`` in the model's context is not truncated (that
would answer another question): its row records the failure and the instruction is excluded, and listed, later.

Sensitive: the answers of a model trained on private data (see the package docstring).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from privtune.eval.scoring import eval_mode, length_sorted_batches
from privtune.eval.winrate.inputs import Instruction, ModelRef
from privtune.eval.winrate.parts import PartWriter, part_path, read_parts
from privtune.fingerprint import digest
from privtune.process import ProcessState
from privtune.progress import progress


def answers_key(model: ModelRef, instructions_digest: str, *, max_new_tokens: int, dtype: str, seed: int) -> str:
    return digest({"model": model.identity, "instructions": instructions_digest, "max_new_tokens": max_new_tokens,
                   "dtype": dtype, "seed": seed, "decoding": "greedy"})


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(instruction)["input_ids"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with every prompt ending at the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def iter_greedy(model, tokenizer, prompts: dict[int, list[int]], *, max_new_tokens: int,
                batch_size: int) -> Iterator[list[dict]]:
    """Greedy answers to ``prompts`` (index -> token ids), one list of rows per batch:
    ``{"i", "answer", "tokens", "stop"}`` with ``stop`` "eos" or "length" (cut at ``max_new_tokens``)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=tokenizer.eos_token_id)
    order = list(prompts)
    with eval_mode(model):
        for batch in length_sorted_batches([len(prompts[i]) for i in order], batch_size):
            indices = [order[j] for j in batch]
            ids, mask = left_pad([prompts[i] for i in indices], pad_id)
            width = ids.shape[1]
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            yield [_answer_row(i, out[row, width:].tolist(), tokenizer, max_new_tokens)
                   for row, i in enumerate(indices)]


def _answer_row(index: int, new: list[int], tokenizer, max_new_tokens: int) -> dict:
    eos = tokenizer.eos_token_id
    length = new.index(eos) if eos in new else len(new)  # generate pads finished rows after their EOS
    return {"i": index, "answer": tokenizer.decode(new[:length], skip_special_tokens=True).strip(),
            "tokens": length, "stop": "eos" if length < max_new_tokens else "length"}


def generate_answers(model_ref: ModelRef, instructions: Sequence[Instruction], out_dir: Path, key: str,
                     proc: ProcessState, *, max_new_tokens: int, batch_size: int, dtype: str, seed: int,
                     label: str) -> None:
    """This rank's share of the answers not yet written for ``key`` (nothing is loaded when there is none)."""
    done = {row["i"] for row in read_parts(out_dir, "answers", key)}
    proc.barrier()  # every rank splits the same pending list: none may write before all have read
    mine = [i for i in range(len(instructions)) if i not in done][proc.rank :: proc.world_size]
    if not mine:
        return
    model, tokenizer = model_ref.load(dtype=dtype, seed=seed)
    model.to(proc.device)
    context = model_ref.context_length()
    prompts, too_long = {}, []
    for i in mine:
        ids = prompt_ids(tokenizer, instructions[i].instruction)
        if context is not None and len(ids) + max_new_tokens > context:
            too_long.append({"i": i, "answer": None, "failure": f"prompt of {len(ids)} tokens + max_new_tokens "
                             f"{max_new_tokens} exceeds the model's context of {context}"})
        else:
            prompts[i] = ids
    with PartWriter(part_path(out_dir, "answers", key, proc.rank)) as writer, \
            progress(total=len(mine), desc=f"answers of {label}", unit="answer") as bar:
        if too_long:
            writer.write(too_long)
            bar.update(len(too_long))
        for rows in iter_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size):
            writer.write(rows)
            bar.update(len(rows))
    del model


def read_answers(out_dir: Path, key: str) -> dict[int, dict]:
    return {row["i"]: row for row in read_parts(out_dir, "answers", key)}
