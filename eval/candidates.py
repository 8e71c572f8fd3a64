"""Scoring a canary's candidates: the full-text NLL of every candidate secret, shared prefix forwarded once.

Owns: how the candidates tokenize (``candidate_layout``), what scoring them costs in forwarded tokens
(``scoring_cost``), and the scorers behind ``candidate_nlls`` — the KV-cache digit trie and the batched
shared-prefix path — plus ``full_nll``, the plain cache-free forward every result is checked against. What the
scores mean (ranks, exposure, the skew-normal fit) is ``privtune.eval.exposure``'s.

- **Candidates** R: the canary's pattern with every ``secret_digits``-digit string (leading zeros included);
  |R| = 10^digits. **Score** of a candidate: its log-perplexity = the sum of token NLLs (nats) of the *whole*
  candidate text, tokenized as training tokenizes it (``add_special_tokens=True``; no EOS: it follows every
  candidate alike and would only add cost). The tokens before the secret are the same for every candidate, so
  they are forwarded once and only the secret and the suffix after it are scored per candidate; the prefix NLL
  is added back, so the scores are those of the full text, as in the paper.
- **Digit trie**: when the candidates tokenize as the shared prefix + one token per digit + a shared suffix
  (SmolLM2, Llama, Qwen, Gemma and the byte tokenizer split digits; checked on every digit pair at every
  position), the candidates are walked with the KV cache: level k forwards 10^k one-token steps and the leaves
  forward the suffix, ``sum_{0<k<d} 10^k + len(suffix) * 10^d`` tokens in all instead of
  ``10^d * (d + len(suffix))``. Levels are walked depth-first in chunks of ``batch_size`` rows, so memory stays
  bounded for any d: about ``d * batch_size * (prefix + d) * kv_bytes_per_token`` of cache plus
  ``batch_size * vocab * 8`` bytes of logits (~1 GB for the embedded model at the default 512). Large steps
  (a thousand rows or more) keep the per-token cost of an ordinary forward on CPU; much smaller ones lose
  speed (figures in docs/performance-notes.md).
- **Batched** (tokenizers that merge digits, such as GPT-NeoX's, or a sample of candidates): every candidate text
  is tokenized and its tokens after the shared prefix are scored in batches of ``batch_size`` candidates; a
  candidate whose tokens cross into the prefix is scored whole.

Sensitive: the secret digits (the candidate space holds them); nothing here logs a candidate.
"""

from __future__ import annotations

import copy
import functools
import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from privtune.eval.scoring import eval_mode, length_sorted_batches, pad_batch
from privtune.progress import progress

_CHUNK = 65_536  # candidate texts tokenized at a time on the batched path


# ---------------------------------------------------------------------------------------------------------------
# How the candidates tokenize


@dataclass(frozen=True)
class CandidateLayout:
    """Tokens shared by every candidate, and the per-digit tokens when the digit trie applies."""

    prefix_ids: tuple[int, ...]  # common to every probed candidate
    digit_ids: tuple[int, ...] | None  # token of "0".."9" when every candidate = prefix + one token per digit + suffix
    suffix_ids: tuple[int, ...]  # the shared tokens after the digits (meaningful with digit_ids)
    continuation_length: int  # longest probed candidate minus the prefix

    @property
    def digit_trie(self) -> bool:
        return self.digit_ids is not None


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, as training tokenizes it (special tokens included)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def _probe_indices(digits: int, secret_index: int) -> list[int]:
    """Every repdigit, every digit pair at every adjacent position (zeros elsewhere), the secret, 100 random."""
    space = 10**digits
    found = {0, space - 1, secret_index}
    found.update(int(str(a) * digits) for a in range(10))
    for pos in range(digits - 1):
        for a in range(10):
            for b in range(10):
                chars = ["0"] * digits
                chars[pos], chars[pos + 1] = str(a), str(b)
                found.add(int("".join(chars)))
    rng = random.Random(0)
    found.update(rng.randrange(space) for _ in range(min(100, space)))
    return sorted(found)


def candidate_layout(tokenizer, canary) -> CandidateLayout:
    """Probe the tokenizer on the canary's candidates (see ``_probe_indices``) and describe their tokens."""
    d = canary.secret_digits
    indices = _probe_indices(d, int(canary.secret))
    encoded = encode(tokenizer, [canary.candidate(i) for i in indices])
    shortest = min(len(ids) for ids in encoded)
    p = 0
    while p < shortest and all(ids[p] == encoded[0][p] for ids in encoded):
        p += 1
    s = 0
    while s < shortest - p and all(ids[-1 - s] == encoded[0][-1 - s] for ids in encoded):
        s += 1
    prefix = tuple(encoded[0][:p])
    suffix = tuple(encoded[0][len(encoded[0]) - s :]) if s else ()
    continuation = max(len(ids) for ids in encoded) - p
    digit_of: dict[str, int] = {}
    trie = p > 0  # the root's next-token distribution needs at least one prefix token
    for index, ids in zip(indices, encoded, strict=True):
        middle = ids[p : len(ids) - s]
        if not trie or len(middle) != d:
            trie = False
            break
        for ch, tok in zip(f"{index:0{d}d}", middle, strict=True):
            if digit_of.setdefault(ch, tok) != tok:
                trie = False
                break
    if trie and len(set(digit_of.values())) != 10:
        trie = False
    digit_ids = tuple(digit_of[str(k)] for k in range(10)) if trie else None
    return CandidateLayout(prefix_ids=prefix, digit_ids=digit_ids, suffix_ids=suffix if trie else (),
                           continuation_length=continuation)


def scoring_cost(layout: CandidateLayout, digits: int, sample_size: int) -> dict:
    """``{"candidates", "scorer", "exact_tokens", "extrapolate_tokens"}``: tokens forwarded after the shared prefix
    to score every candidate, or ``sample_size`` of them plus the secret."""
    space = 10**digits
    if layout.digit_trie:
        exact = sum(10**k for k in range(1, digits)) + len(layout.suffix_ids) * space
        scorer = "digit-trie"
    else:
        exact = space * max(layout.continuation_length - 1, 0)
        scorer = "batched"
    sample = min(sample_size, space - 1)
    return {"candidates": space, "scorer": scorer, "exact_tokens": exact,
            "extrapolate_tokens": (sample + 1) * max(layout.continuation_length - 1, 0)}


# ---------------------------------------------------------------------------------------------------------------
# Forward passes with a shared prefix


@functools.cache
def _cache_kwarg_of(forward_cls) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed the argument


def _forward(model, input_ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None):
    """(logits, cache) of one forward; ``cache`` is extended in place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_cache": True}
    if cache is not None:
        kwargs[_cache_kwarg_of(type(base))] = cache
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    new_cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
    return out.logits, new_cache


def _fork(cache, lo: int, hi: int, repeat: int):
    """A new cache holding rows [lo, hi) of ``cache``, each repeated ``repeat`` times; ``cache`` is untouched.

    Dynamic cache layers replace their tensors (``torch.cat`` / indexing) instead of writing into them, so a
    shallow copy of the container and its layers is enough.
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if (lo, hi) != (0, cache.layers[0].keys.shape[0]):
        new.batch_select_indices(slice(lo, hi))
    if repeat > 1:
        new.batch_repeat_interleave(repeat)
    return new


class _Prefix:
    """One forward of the shared prefix: its NLL, the next-token log-probs, and its KV cache (one row)."""

    def __init__(self, model, prefix_ids: Sequence[int], device: torch.device):
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        logits, self.cache = _forward(model, ids)
        logp = logits[0].float().log_softmax(-1)
        self.nll = float(-logp[:-1].gather(-1, ids[0, 1:, None]).sum()) if ids.shape[1] > 1 else 0.0
        self.next_logp = logp[-1]
        self.length = ids.shape[1]


@torch.inference_mode()
def full_nll(model, sequences: Sequence[Sequence[int]], *, batch_size: int, device: torch.device) -> np.ndarray:
    """Sum of token NLLs of each whole sequence (its first token is not predicted), without any cache."""
    out = np.zeros(len(sequences), dtype=np.float64)
    for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
        ids, mask = pad_batch([sequences[i] for i in batch], 0)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        token_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out[batch] = (token_nll.double() * mask[:, 1:]).sum(1).cpu().numpy()
    return out


def _continuation_nll(model, prefix: _Prefix, continuations: Sequence[Sequence[int]], *, batch_size: int,
                      bar) -> np.ndarray:
    """Sum of token NLLs of each continuation given the shared prefix (every continuation non-empty)."""
    device = prefix.next_logp.device
    out = np.zeros(len(continuations), dtype=np.float64)
    for batch in length_sorted_batches([len(c) for c in continuations], batch_size):
        rows = [continuations[i] for i in batch]
        first = torch.tensor([r[0] for r in rows], device=device)
        nll = -prefix.next_logp[first].double()
        width = max(len(r) for r in rows)
        if width > 1:
            ids, mask = pad_batch([r[:-1] for r in rows], 0)
            targets, _ = pad_batch([r[1:] for r in rows], 0)
            ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
            attention = torch.cat([torch.ones(len(rows), prefix.length, dtype=mask.dtype, device=device), mask], 1)
            logits, _ = _forward(model, ids, _fork(prefix.cache, 0, 1, len(rows)), attention)
            token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
            nll = nll + (token_nll.double() * mask).sum(1)
            bar.update(int(mask.sum()))
        out[batch] = nll.cpu().numpy()
    return out


def _batched_nlls(model, tokenizer, canary, layout: CandidateLayout, indices: np.ndarray, *, batch_size: int,
                  device: torch.device) -> tuple[np.ndarray, int]:
    """Full-text NLL of the candidates ``indices``: tokens after the shared prefix scored in batches."""
    p = len(layout.prefix_ids)
    prefix = _Prefix(model, layout.prefix_ids, device) if p else None
    out = np.zeros(len(indices), dtype=np.float64)
    forwarded = 0
    total = len(indices) * max(layout.continuation_length - 1, 1)
    with progress(total=total, desc=f"exposure canary {canary.canary_id}", unit="tok") as bar:
        for begin in range(0, len(indices), _CHUNK):
            chunk = indices[begin : begin + _CHUNK]
            encoded = encode(tokenizer, [canary.candidate(int(i)) for i in chunk])
            shared = [j for j, ids in enumerate(encoded)
                      if prefix is not None and len(ids) > p and tuple(ids[:p]) == layout.prefix_ids]
            other = sorted(set(range(len(chunk))) - set(shared))
            if shared:
                nll = _continuation_nll(model, prefix, [encoded[j][p:] for j in shared], batch_size=batch_size,
                                        bar=bar)
                out[begin + np.asarray(shared)] = prefix.nll + nll
                forwarded += sum(len(encoded[j]) - p - 1 for j in shared)
            if other:  # a candidate whose tokens cross into the prefix: score the whole text
                out[begin + np.asarray(other)] = full_nll(model, [encoded[j] for j in other],
                                                           batch_size=batch_size, device=device)
                forwarded += sum(len(encoded[j]) for j in other)
    return out, forwarded


def _trie_nlls(model, layout: CandidateLayout, digits: int, *, batch_size: int, device: torch.device,
               desc: str) -> tuple[np.ndarray, int]:
    """Full-text NLL of every candidate by a depth-first walk of the digit trie (see the module docstring)."""
    prefix = _Prefix(model, layout.prefix_ids, device)
    digit_ids = torch.tensor(layout.digit_ids, dtype=torch.long, device=device)
    suffix = torch.tensor(layout.suffix_ids, dtype=torch.long, device=device)
    m = len(layout.suffix_ids)
    out = np.empty(10**digits, dtype=np.float64)
    per_forward = max(1, batch_size // 10)  # parents per forward: their 10 children each make the batch
    forwarded = 0
    total = scoring_cost(layout, digits, 0)["exact_tokens"]

    def expand(cache, nll: torch.Tensor, logp: torch.Tensor, level: int, start: int, bar) -> None:
        # ``nll`` (N,) and ``logp`` (N, 10): the NLL so far and the next digit's log-probs of the N nodes at
        # ``level`` (digits fixed so far) with indices start .. start + N - 1; ``cache`` holds their N rows.
        nonlocal forwarded
        for lo in range(0, len(nll), per_forward):
            hi = min(len(nll), lo + per_forward)
            child = (nll[lo:hi, None] - logp[lo:hi]).reshape(-1)  # children in index order: parent-major
            first = (start + lo) * 10
            if level + 1 == digits and m == 0:
                out[first : first + len(child)] = child.cpu().numpy()
                continue
            rows = len(child)
            sub = _fork(cache, lo, hi, 10)
            tokens = digit_ids.repeat(hi - lo)[:, None]
            if level + 1 == digits:  # leaves: score the suffix after the last digit
                inputs = torch.cat([tokens, suffix[:-1].expand(rows, m - 1)], dim=1)
                logits, _ = _forward(model, inputs, sub)
                lp = logits.float().log_softmax(-1).gather(-1, suffix.expand(rows, m)[..., None])[..., 0]
                out[first : first + rows] = (child - lp.double().sum(1)).cpu().numpy()
                forwarded += rows * m
                bar.update(rows * m)
            else:
                logits, sub = _forward(model, tokens, sub)
                lp = logits[:, -1].float().log_softmax(-1)[:, digit_ids].double()
                forwarded += rows
                bar.update(rows)
                expand(sub, child, lp, level + 1, first, bar)

    with progress(total=total, desc=desc, unit="tok") as bar:
        root_nll = torch.zeros(1, dtype=torch.float64, device=device)
        expand(prefix.cache, root_nll, prefix.next_logp[digit_ids].double()[None], 0, 0, bar)
    return prefix.nll + out, forwarded


@torch.inference_mode()
def candidate_nlls(model, tokenizer, canary, *, batch_size: int = 512, indices: Sequence[int] | None = None,
                   layout: CandidateLayout | None = None) -> tuple[np.ndarray, dict]:
    """Full-text NLL (nats) of candidates ``indices`` (all of them when ``None``), and how they were scored.

    Returns ``(nlls, info)`` with ``info = {"scorer": "digit-trie" | "batched", "forward_tokens": int}``.
    ``batch_size`` is the number of rows per forward: candidates on the batched path, trie nodes on the digit trie
    (memory in the module docstring).
    """
    layout = layout or candidate_layout(tokenizer, canary)
    device = next(model.parameters()).device
    with eval_mode(model):
        if indices is None and layout.digit_trie:
            nlls, forwarded = _trie_nlls(model, layout, canary.secret_digits, batch_size=batch_size, device=device,
                                         desc=f"exposure canary {canary.canary_id}")
            return nlls, {"scorer": "digit-trie", "forward_tokens": forwarded}
        idx = np.arange(canary.candidates_size()) if indices is None else np.asarray(indices, dtype=np.int64)
        nlls, forwarded = _batched_nlls(model, tokenizer, canary, layout, idx, batch_size=batch_size, device=device)
        return nlls, {"scorer": "batched", "forward_tokens": forwarded}
