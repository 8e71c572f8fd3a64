"""Judges: given an instruction and two answers in a fixed order, say which is better — or that neither is.

Owns the three judges and their specs (``make_judge``); a judge sees positions ("first", "second"), never which
model wrote which answer, and returns a ``Verdict``: ``first``, ``second`` or ``tie``, or a failure with its reason.
Any exception of one call becomes that call's failure (``Exception`` only: Ctrl-C still stops the run).

- ``reference`` / ``reference:contains``: programmatic. An answer is right when, after normalising (case folded,
  runs of whitespace to one space, surrounding punctuation stripped), it equals the reference (``contains``: the
  normalised reference appears in it as whole words). One right and one wrong: the right one wins; both right or
  both wrong: tie. An instruction without a reference is refused before any work.
- ``lm:MODEL`` (default ``lm:smollm2-135m``, the embedded model): a verdict prompt (the tokenizer's chat template
  when it has one) after which the next token should be ``1`` or ``2``; the verdict compares the log-probabilities
  of exactly those two tokens, so there is no free text to parse and no unparseable reply. ``margin`` =
  log p("1") − log p("2"); ``|margin| < tie_margin`` is a tie. ``mass`` = p("1") + p("2") says how much the judge
  considered the two choices at all. A prompt longer than the judge's context is a failure, never truncated.
- ``openai:URL[#MODEL]``: an OpenAI-compatible ``/chat/completions`` endpoint (``URL`` is the API base, e.g.
  ``http://localhost:8000/v1``) at temperature 0 via urllib; ``$OPENAI_API_KEY`` is sent when set. The reply's
  first non-space character must be 1 or 2. HTTP errors, timeouts, refused connections and unparseable replies
  are failures with their reason, each tried once per run (a rerun tries failed calls again).

Sensitive: judges read instructions and answers (private, see the package docstring); the ``openai`` judge sends
them to its endpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from privtune.errors import UserError
from privtune.eval.winrate.answers import left_pad, prompt_ids

DEFAULT_JUDGE = "lm:smollm2-135m"
CHOICES = ("1", "2")


@dataclass(frozen=True)
class Pair:
    """One judgment to make: the instruction, the answer shown first and the one shown second."""

    instruction: str
    first: str
    second: str
    reference: str | None = None


@dataclass(frozen=True)
class Verdict:
    choice: str | None  # "first", "second" or "tie"; None when the call failed
    failure: str | None = None
    margin: float | None = None
    mass: float | None = None


def failed(err: Exception) -> Verdict:
    text = " ".join(str(err).split()) or "no message"
    return Verdict(choice=None, failure=f"{type(err).__name__}: {text[:200]}")


class PairJudge:
    """A judge that makes one call per pair."""

    name = "judge"

    def identity(self) -> dict:
        """What its verdicts depend on (part of the judgments' key)."""
        return {"judge": self.name}

    def verdict(self, pair: Pair) -> Verdict:
        raise NotImplementedError

    def verdicts(self, pairs: Sequence[Pair]) -> Iterator[Verdict]:
        """One verdict per pair, in order, each yielded as soon as it is made."""
        for pair in pairs:
            try:
                yield self.verdict(pair)
            except Exception as err:  # any failure of one call is that call's counted failure
                yield failed(err)

    def needs_reference(self) -> bool:
        return False

    def load(self, device) -> None:
        """Make the judge ready on this rank's device (a no-op for judges without a model)."""


# ---------------------------------------------------------------------------------------------------------------
# Programmatic


def normalise(text: str) -> str:
    return " ".join(text.casefold().split()).strip(string.punctuation + " ")


class ReferenceJudge(PairJudge):
    def __init__(self, *, contains: bool = False):
        self.contains = contains
        self.name = "reference:contains" if contains else "reference"

    def needs_reference(self) -> bool:
        return True

    def right(self, answer: str, reference: str) -> bool:
        got, want = normalise(answer), normalise(reference)
        if not self.contains:
            return got == want
        return re.search(rf"(?<!\w){re.escape(want)}(?!\w)", got) is not None

    def verdict(self, pair: Pair) -> Verdict:
        if pair.reference is None:
            raise ValueError("the instruction has no reference")
        first, second = self.right(pair.first, pair.reference), self.right(pair.second, pair.reference)
        return Verdict(choice="tie" if first == second else "first" if first else "second")


# ---------------------------------------------------------------------------------------------------------------
# A local causal LM

_VERDICT_PROMPT = """Which response follows the instruction better (more helpful, correct and complete)?

Instruction:
{instruction}
{reference}
Response 1:
{first}

Response 2:
{second}

Answer with one digit, 1 or 2."""


def verdict_text(pair: Pair) -> str:
    reference = f"\nA correct answer: {pair.reference}\n" if pair.reference else ""
    return _VERDICT_PROMPT.format(instruction=pair.instruction, reference=reference, first=pair.first,
                                  second=pair.second)


def choice_token_ids(tokenizer, spec: str) -> list[int]:
    ids = [tokenizer.encode(choice, add_special_tokens=False) for choice in CHOICES]
    if any(len(one) != 1 for one in ids):
        raise UserError(f"the judge model {spec}'s tokenizer does not encode 1 and 2 as one token each",
                        "choose another judge model")
    return [one[0] for one in ids]


class LMJudge(PairJudge):
    """Reads the verdict from the judge model's next-token log-probabilities of "1" and "2"."""

    def __init__(self, model_ref, *, tie_margin: float, batch_size: int, dtype: str = "float32", seed: int = 0):
        self.model_ref, self.tie_margin, self.batch_size = model_ref, tie_margin, batch_size
        self.dtype, self.seed = dtype, seed
        self.name = f"lm:{model_ref.spec}"
        self.choice_ids = choice_token_ids(model_ref.tokenizer(), model_ref.spec)  # checked before any work
        self._loaded = None

    def identity(self) -> dict:
        return {"judge": "lm", "model": self.model_ref.identity, "tie_margin": self.tie_margin, "dtype": self.dtype,
                "seed": self.seed, "prompt": _VERDICT_PROMPT}

    def load(self, device) -> None:
        model, tokenizer = self.model_ref.load(dtype=self.dtype, seed=self.seed)
        self._loaded = (model.to(device).eval(), tokenizer, self.model_ref.context_length())

    def verdicts(self, pairs: Sequence[Pair]) -> Iterator[Verdict]:
        model, tokenizer, context = self._loaded
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            try:
                prompts = [prompt_ids(tokenizer, verdict_text(pair)) for pair in batch]
                fits = [context is None or len(p) <= context for p in prompts]
                logps = self._choice_logprobs(model, [p for p, ok in zip(prompts, fits, strict=True) if ok],
                                              self.choice_ids, tokenizer)
            except Exception as err:  # the whole batch failed: every pair in it is a counted failure
                yield from (failed(err) for _ in batch)
                continue
            it = iter(logps)
            for prompt, ok in zip(prompts, fits, strict=True):
                if not ok:
                    yield Verdict(choice=None, failure=f"judge prompt of {len(prompt)} tokens exceeds the judge's "
                                  f"context of {context}")
                    continue
                one, two = next(it)
                margin = one - two
                choice = "tie" if abs(margin) < self.tie_margin else "first" if margin > 0 else "second"
                yield Verdict(choice=choice, margin=margin, mass=math.exp(one) + math.exp(two))

    @torch.inference_mode()
    def _choice_logprobs(self, model, prompts: list[list[int]], choice_ids: list[int], tokenizer) -> list:
        """log p("1"), log p("2") after each prompt, from one left-padded forward that keeps only the last
        position's logits (a full batch × length × vocabulary tensor would not fit at LLM vocabularies). Positions
        count from each prompt's first real token, so padding changes nothing."""
        if not prompts:
            return []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids, mask = left_pad(prompts, pad)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=1).logits
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        return logp[:, choice_ids].cpu().tolist()


# ---------------------------------------------------------------------------------------------------------------
# An OpenAI-compatible endpoint


class OpenAIJudge(PairJudge):
    def __init__(self, url: str, model: str | None, *, timeout: float):
        self.url, self.model, self.timeout = url, model, timeout
        self.name = f"openai:{url}" + (f"#{model}" if model else "")

    def identity(self) -> dict:
        return {"judge": "openai", "url": self.url, "model": self.model, "prompt": _VERDICT_PROMPT}

    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else f"{base}/chat/completions"

    def verdict(self, pair: Pair) -> Verdict:
        body = {"messages": [{"role": "user", "content": verdict_text(pair)}], "temperature": 0, "max_tokens": 4}
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.endpoint(), data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode())
        except urllib.error.HTTPError as err:
            return Verdict(choice=None, failure=f"HTTP {err.code} {err.reason}")
        except TimeoutError:
            return Verdict(choice=None, failure=f"timeout after {self.timeout:g} s")
        except urllib.error.URLError as err:
            reason = "timeout" if isinstance(err.reason, TimeoutError) else err.reason
            return Verdict(choice=None, failure=f"unreachable: {reason}")
        except json.JSONDecodeError:
            return Verdict(choice=None, failure="unparseable reply: not JSON")
        return _read_reply(reply)


def _read_reply(reply) -> Verdict:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return Verdict(choice=None, failure="unparseable reply: no choices[0].message.content")
    first = (content or "").strip()[:1]
    if first not in CHOICES:
        return Verdict(choice=None, failure=f"unparseable reply: {(content or '')[:40]!r}")
    return Verdict(choice="first" if first == "1" else "second")


# ---------------------------------------------------------------------------------------------------------------


def make_judge(spec: str, *, tie_margin: float, batch_size: int, timeout: float, dtype: str = "float32",
               seed: int = 0):
    """The judge a ``--judge`` spec names, checked (the model resolved, the URL's form) without loading anything."""
    from privtune.eval.winrate.inputs import resolve_model

    if spec in ("reference", "reference:contains"):
        return ReferenceJudge(contains=spec.endswith(":contains"))
    if spec.startswith("lm:") and spec[3:]:
        return LMJudge(resolve_model(spec[3:]), tie_margin=tie_margin, batch_size=batch_size, dtype=dtype, seed=seed)
    if spec.startswith("openai:"):
        url, _, model = spec[len("openai:") :].partition("#")
        if not re.match(r"^https?://[^/\s]+", url):
            raise UserError(f"--judge {spec}: {url!r} is not an http(s) URL",
                            "write e.g. --judge openai:http://localhost:8000/v1#MODEL")
        return OpenAIJudge(url, model or None, timeout=timeout)
    raise UserError(f"unknown judge {spec!r}", "use reference, reference:contains, lm:MODEL or openai:URL[#MODEL]")
