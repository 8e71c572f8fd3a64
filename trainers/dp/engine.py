"""The per-sample clipping engine: one forward and one backward per micro-batch, clipped sums accumulated.

Owns: ``DPEngine`` — hooks in, per-unit norms, clip factors, the clipped sum of a logical step — and
``ClippedSum``, what a step hands to the noise stage.

Privacy unit: one row by default; rows sharing a unit id are one unit (user / group level), clipped together;
unit id -1 marks padding rows, which contribute nothing. A unit must not span two micro-batches of one step
(checked). Sensitivity: with ``clipping="flat"`` each unit's gradient over ALL trainable parameters has norm
<= C; with ``clipping="per_layer"`` each trainable parameter tensor p is clipped to C_p = C / sqrt(P) (P tensors,
tied tensors counted once), so the whole unit still has norm <= C. Noise std is sigma * C in both cases.

How a step runs (book-keeping, one backward)::

    engine = DPEngine(model, clip_norm=C)                       # refuses uncovered / unsupported parameters
    for micro in (m.without_padding() for m in step.micro_batches):   # padding rows only cost compute
        with engine.micro_batch(micro.unit_ids):                # hooks on, trainable requires_grad off
            logits = model(input_ids, attention_mask=mask).logits
            engine.backward(per_example_loss(logits, labels))   # norms + clipped sum, saved tensors freed
    clipped = engine.pop_clipped_sum()                          # {name: fp32 tensor}; all-reduce it under DDP

Inside ``micro_batch`` the trainable parameters have ``requires_grad=False`` (restored on exit, even on error),
so autograd computes only activation gradients; the weight gradient is formed once, from the saved
activations and the *clip-scaled* output gradients. ``param.grad`` is never touched until ``set_grads`` writes
the privatised update. Under data parallelism do not wrap the model in DDP (its reducer expects ordinary
gradients): all-reduce ``ClippedSum.grads`` and add the noise once.

Precision: norms and clipped sums are computed in fp32 (fp64 for fp64 parameters), with autocast switched off,
from the same saved tensors, so a clipped unit adds a vector of norm C up to fp32 rounding. Memory: the saved
inputs replace what autograd would have saved for the weight gradients; the output gradients of every hooked
layer are kept until the end of the micro-batch's backward (about one more activation-sized tensor per layer);
instantiated per-unit gradients exist for one parameter at a time.

Guardrails: every parameter with ``requires_grad=True`` must be among the trainable ones and covered by a rule
(else ``DPRefusal`` before training); after each backward every trainable parameter must have received a
contribution from a hook (else ``DPInvariantError``: a clip is never skipped silently). Gradient checkpointing
is refused (re-running forwards inside the backward would record activations twice).

Assumption (verified for the tiny Llama / Pythia / Gemma / Qwen families by the brute-force tests): rows do not
interact in the forward (no batch norm, no cross-row attention, no MoE load-balancing loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from .errors import DPInvariantError, DPRefusal
from .rules import (
    Capture,
    EmbeddingRule,
    GenericRule,
    LinearRule,
    Recorder,
    as_tokens,
    assign_rules,
    full_shape,
)
from .terms import (
    DenseTerm,
    LinearTerm,
    Term,
    clipped_sum,
    embedding_term,
    linear_term,
    squared_norm,
    use_ghost,
)
from .units import UnitLayout

CLIPPINGS = ("flat", "per_layer")
LINEAR_STRATEGIES = ("auto", "ghost", "instantiate")
_NORM_EPS = 1e-6  # c_u = min(1, C / (|g_u| + eps))


@dataclass(frozen=True)
class ClippedSum:
    """The sum over a logical step's units of their clipped gradients (before noise), and logging stats."""

    grads: dict[str, torch.Tensor]  # parameter name -> sum_u c_u g_u (fp32, or fp64 for fp64 parameters)
    num_units: int  # units actually processed (for logging only: never divide by it, see noise.normalize)
    unit_ids: torch.Tensor  # (num_units,) the caller's unit ids, in processing order
    unit_norms: torch.Tensor  # (num_units,) gradient norm of each unit before clipping (all parameters)
    clipped_fraction: float  # share of units with at least one clip factor < 1
    num_micro_batches: int


def _accumulate_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class DPEngine:
    """Per-unit clipping with hooks; see the module docstring for the protocol."""

    def __init__(
        self,
        model: nn.Module,
        *,
        trainable: Iterable[nn.Parameter] | None = None,
        clip_norm: float,  # privacy: the per-unit sensitivity C
        clipping: str = "flat",  # privacy: "flat" (one norm over all parameters) or "per_layer" (C / sqrt(P) each)
        linear_strategy: str = "auto",  # performance only: "auto" | "ghost" | "instantiate"; same result
    ):
        if isinstance(clip_norm, bool) or not (
            isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0
        ):
            raise DPRefusal(f"clip_norm must be a finite number > 0, got {clip_norm!r}", "set privacy.clip_norm")
        if clipping not in CLIPPINGS:
            raise DPRefusal(f"unknown clipping '{clipping}'", f"choose one of {', '.join(CLIPPINGS)}")
        if linear_strategy not in LINEAR_STRATEGIES:
            raise DPRefusal(f"unknown linear_strategy '{linear_strategy}'",
                            f"choose one of {', '.join(LINEAR_STRATEGIES)}")
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            raise DPRefusal("gradient checkpointing is on; the DP engine does not support it yet",
                            "call model.gradient_checkpointing_disable()")
        self.model = model
        self.clip_norm = float(clip_norm)
        self.clipping = clipping
        self.linear_strategy = linear_strategy

        names = {id(p): n for n, p in model.named_parameters()}  # tied parameters: first name
        if trainable is None:
            chosen = [p for p in model.parameters() if p.requires_grad]
        else:
            chosen = list(trainable)
        params: dict[str, nn.Parameter] = {}
        for p in chosen:
            if id(p) not in names:
                raise DPRefusal("a parameter passed as trainable does not belong to the model",
                                "pass parameters of the model being trained")
            params[names[id(p)]] = p
        stray = [n for n, p in model.named_parameters() if p.requires_grad and n not in params]
        if stray:
            raise DPRefusal(
                f"parameter(s) {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''} require grad but are not "
                "in the trainable set: they would be updated without privacy",
                "freeze them (requires_grad=False) or include them in the trainable parameters",
            )
        if not params:
            raise DPRefusal("no trainable parameters", "unfreeze the parameters to fine-tune")
        self.params = params
        self.shapes = {name: full_shape(p) for name, p in params.items()}  # whole shapes, also when sharded
        self._recorder = Recorder()
        self._rules = assign_rules(model, params, self._recorder)
        self._thresholds = self._per_param_thresholds()
        self._active = False
        self._layout: UnitLayout | None = None
        self._backward_done = False
        self._reset_step()

    # ------------------------------------------------------------------------------------------------------
    def _per_param_thresholds(self) -> dict[str, float]:
        if self.clipping == "flat":
            return {}
        c = self.clip_norm / math.sqrt(len(self.params))  # sum_p C_p^2 = C^2: total sensitivity stays C
        return {name: c for name in self.params}

    def _reset_step(self) -> None:
        self._failed = False
        self._sums: dict[str, torch.Tensor] = {}
        self._seen_units: set[int] = set()
        self._stat_ids: list[torch.Tensor] = []
        self._stat_norms: list[torch.Tensor] = []
        self._stat_clipped = 0
        self._micro_batches = 0

    @property
    def rules(self) -> list:
        return list(self._rules)

    # ------------------------------------------------------------------------------------------------------
    @contextmanager
    def micro_batch(self, unit_ids: torch.Tensor, *, sequence_length: int | None = None) -> Iterator[DPEngine]:
        """Hooks installed and trainable ``requires_grad`` off for one forward + ``backward``; restored on exit.

        ``sequence_length``: the micro-batch's token width; when given, every hooked linear layer must see
        (rows, sequence, ...) inputs, not only ``shape[0] == rows``.
        """
        if self._active:
            raise DPInvariantError("micro_batch contexts cannot be nested", "finish one micro-batch first")
        layout = UnitLayout(unit_ids)
        repeated = sorted(set(layout.unit_labels.tolist()) & self._seen_units)
        if repeated:
            raise DPInvariantError(
                f"unit id(s) {repeated[:5]} already appeared in an earlier micro-batch of this step; a unit must "
                "not span two micro-batches",
                "pack all rows of a unit into one micro-batch (PoissonBatchSampler does)",
            )
        if self._failed:
            raise DPInvariantError("an earlier micro-batch of this step failed",
                                   "call engine.discard_step() and start the step again")
        saved_flags = [(p, p.requires_grad) for p in self.params.values()]
        handles = []
        self._active, self._layout, self._backward_done = True, layout, False
        try:
            for p, _ in saved_flags:
                p.requires_grad_(False)
            self._recorder.begin(layout.num_rows, sequence_length)
            handles = [rule.install() for rule in self._rules]
            yield self
        except BaseException:
            self._failed = True  # this step's sum may be incomplete: it must not be released
            raise
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved_flags:
                p.requires_grad_(flag)
            self._recorder.clear()
            self._active, self._layout = False, None

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss.sum()`` ((B,) per-row losses) and add this micro-batch's clipped sum."""
        if not self._active or self._layout is None:
            raise DPInvariantError("engine.backward called outside engine.micro_batch(...)",
                                   "call it inside the with-block of the micro-batch")
        if self._backward_done:
            raise DPInvariantError("engine.backward called twice for one micro-batch", "one backward per micro-batch")
        layout = self._layout
        if loss.dim() != 1 or loss.shape[0] != layout.num_rows:
            raise DPInvariantError(
                f"the loss must hold one value per row ({layout.num_rows},), got shape {tuple(loss.shape)}",
                "use privtune.trainers.dp.per_example_loss (a batch-mean loss cannot be clipped per example)",
            )
        if not loss.requires_grad or not self._recorder.captures:
            raise DPInvariantError("the loss does not depend on any trainable parameter through a hooked module",
                                   "run the model's forward inside engine.micro_batch(...) with grad enabled")
        self._backward_done = True
        # Trainable parameters do not require grad here: only activation gradients are computed (plus the
        # anchors' scalar .grad, discarded with the recorder).
        with record_function("dp.autograd"):
            torch.autograd.backward(loss.sum())
        captures = self._recorder.captures
        self._recorder.captures = []
        try:
            # Norms and clipped sums in full precision even if the caller is inside torch.autocast: both must be
            # computed the same way for the norm to bound what is added (generic rules restore the forward's
            # autocast state themselves).
            device_types = {"cpu"} | {p.device.type for p in self.params.values()}
            with contextlib.ExitStack() as stack:
                for device_type in sorted(device_types):
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
                with record_function("dp.clip"):
                    self._consume(captures, layout)
        finally:
            # The tensor hooks on the forward's outputs keep their captures alive for as long as the caller holds
            # the loss's graph (until the next micro-batch's loss replaces it): drop what they saved now, or one
            # micro-batch's activations and output gradients stay resident through the next forward.
            for cap in captures:
                cap.saved = cap.grad = cap.expected = None
                cap.weights = {}
            captures.clear()
        self._seen_units.update(layout.unit_labels.tolist())
        self._micro_batches += 1

    # ------------------------------------------------------------------------------------------------------
    def _check_coverage(self, captures: list[Capture]) -> None:
        reached = set()
        for cap in captures:
            if cap.grad is not None:  # a capture without grad: its output did not reach the loss (zero term)
                reached.update(id(p) for p in cap.rule.params.values())
        missing = [name for name, p in self.params.items() if id(p) not in reached]
        if missing:
            raise DPInvariantError(
                f"trainable parameter(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} received no "
                "per-sample gradient in this micro-batch (their modules were not called, or their output does "
                "not reach the loss)",
                "freeze parameters the loss does not use, and run the forward inside engine.micro_batch(...)",
            )

    def _terms(self, captures: list[Capture], layout: UnitLayout) -> dict[str, list[Term]]:
        """Each capture -> terms of its parameters, on the real (non-padding) rows only."""
        terms: dict[str, list[Term]] = {name: [] for name in self.params}
        captures = [cap for cap in captures if cap.grad is not None]
        for cap in captures:  # before any computation: a tensor modified in place invalidates the micro-batch
            cap.check_unchanged()
        shared_inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for cap in captures:
            rule = cap.rule
            if isinstance(rule, LinearRule):
                module = rule.module
                cdt = _accumulate_dtype(module.weight)
                # Layers fed the same tensor (q, k, v; gate, up) share its unit view and so its Gram matrix;
                # same storage, shape, strides and dtype, unchanged since (check_unchanged), is the same value.
                x = cap.saved
                key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, cdt)
                if key not in shared_inputs:
                    a = layout.real(as_tokens(x)).to(cdt)
                    shared_inputs[key] = (a, layout.to_units(a))
                a, a_units = shared_inputs[key]
                g = layout.real(as_tokens(cap.grad)).to(cdt)
                if "weight" in rule.params:
                    ghost = use_ghost(a.shape[1] * layout.rows_per_unit, a.shape[2], g.shape[2],
                                      strategy=self.linear_strategy, force_instantiate=rule.force_instantiate)
                    terms[rule.names["weight"]].append(linear_term(a, g, layout, ghost=ghost, a_units=a_units))
                if "bias" in rule.params:
                    terms[rule.names["bias"]].append(DenseTerm(layout.sum_rows(g.sum(dim=1))))
            elif isinstance(rule, EmbeddingRule):
                module = rule.module
                cdt = _accumulate_dtype(module.weight)
                ids = layout.real(cap.saved.reshape(cap.saved.shape[0], -1)).long()
                g = layout.real(cap.grad.reshape(cap.grad.shape[0], ids.shape[1], -1)).to(cdt)
                terms[rule.names["weight"]].append(
                    embedding_term(ids, g, layout, num_embeddings=module.num_embeddings,
                                   padding_idx=module.padding_idx, scale=rule.scale())
                )
            elif isinstance(rule, GenericRule):
                for attr, per_row in rule.per_row_grads(cap, rows=layout.real).items():
                    p = rule.params[attr]
                    terms[rule.names[attr]].append(DenseTerm(layout.sum_rows(per_row.to(_accumulate_dtype(p)))))
            else:  # pragma: no cover - assign_rules only builds the three rules above
                raise DPInvariantError(f"no term for {rule.describe()}", "report this bug")
        return terms

    def _consume(self, captures: list[Capture], layout: UnitLayout) -> None:
        self._check_coverage(captures)
        if layout.num_units == 0:  # an all-padding micro-batch: nothing to add
            return
        with record_function("dp.clip.norms"):
            terms = self._terms(captures, layout)
            grams: dict[int, torch.Tensor] = {}
            sq = {name: squared_norm(ts, layout, grams=grams) for name, ts in terms.items()}  # one parameter at a time
            del grams
        device = next(iter(self.params.values())).device
        total_sq = sum(v.to(device, torch.float64) for v in sq.values()).clamp(min=0.0)  # (U,)
        norms = total_sq.sqrt()
        if self.clipping == "flat":
            factor = (self.clip_norm / (norms + _NORM_EPS)).clamp(max=1.0)
            factors = {name: factor for name in terms}
            clipped = factor < 1.0
        else:
            factors, clipped = {}, torch.zeros_like(norms, dtype=torch.bool)
            for name, s in sq.items():
                f = (self._thresholds[name] / (s.to(device, torch.float64).clamp(min=0.0).sqrt() + _NORM_EPS)).clamp(
                    max=1.0
                )
                factors[name], clipped = f, clipped | (f < 1.0)
        # Accumulated in place into the step's sums: if anything below raises, micro_batch() marks the step
        # failed and pop_clipped_sum() refuses it, so a partly added micro-batch is never released.
        with record_function("dp.clip.sum"):
            row_factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one per distinct factor tensor
            scaled: dict = {}  # row-scaled shared activations (see terms.clipped_sum)
            for name, ts in terms.items():
                p = self.params[name]
                f = factors[name]
                if id(f) not in row_factors:
                    unit_f = f.to(p.device)
                    row_factors[id(f)] = (unit_f, layout.row_weights(unit_f))
                unit_f, row_f = row_factors[id(f)]
                into = self._sums.get(name)  # None on a step's first micro-batch: the first matmul allocates it
                for t in sorted(ts, key=lambda t: not isinstance(t, LinearTerm)):  # a matmul first: no zero fill
                    into = clipped_sum(t, unit_f, row_f, self.shapes[name], into=into, scaled=scaled)
                self._sums[name] = into.to(_accumulate_dtype(p))
            del scaled
        self._stat_ids.append(layout.unit_labels.clone())
        self._stat_norms.append(norms.detach().cpu())
        self._stat_clipped += int(clipped.sum())

    # ------------------------------------------------------------------------------------------------------
    def pop_clipped_sum(self) -> ClippedSum:
        """The step's clipped sum (zeros for a step with no units) and stats; resets for the next step."""
        if self._active:
            raise DPInvariantError("pop_clipped_sum called inside a micro-batch", "call it after the last micro-batch")
        if self._failed:
            raise DPInvariantError("a micro-batch of this step failed, so its clipped sum is incomplete",
                                   "call engine.discard_step() and run the step again")
        grads = {}
        for name, p in self.params.items():
            grads[name] = self._sums.get(name)
            if grads[name] is None:
                grads[name] = torch.zeros(self.shapes[name], dtype=_accumulate_dtype(p), device=p.device)
        ids = torch.cat(self._stat_ids) if self._stat_ids else torch.zeros(0, dtype=torch.long)
        norms = torch.cat(self._stat_norms) if self._stat_norms else torch.zeros(0, dtype=torch.float64)
        result = ClippedSum(
            grads=grads,
            num_units=int(ids.numel()),
            unit_ids=ids,
            unit_norms=norms,
            clipped_fraction=(self._stat_clipped / ids.numel()) if ids.numel() else 0.0,
            num_micro_batches=self._micro_batches,
        )
        self._reset_step()
        return result

    def discard_step(self) -> None:
        """Drop everything accumulated in the current step (after a failed micro-batch)."""
        if self._active:
            raise DPInvariantError("discard_step called inside a micro-batch", "call it after the with-block")
        self._reset_step()

    def set_grads(self, update: dict[str, torch.Tensor], *, copy: bool = True) -> None:
        """Write a privatised update into ``param.grad`` (cast to the parameter's dtype) for the optimizer.

        ``copy=False``: a tensor already of the parameter's dtype and device becomes its ``.grad`` as it is (the
        caller hands over ownership, as ``DPStep`` does with its own buffers)."""
        if set(update) != set(self.params):
            raise DPInvariantError("the update does not cover exactly the trainable parameters",
                                   "pass the dict returned by the noise stage unchanged")
        from torch.distributed.tensor import DTensor

        for name, p in self.params.items():
            value = update[name]
            if isinstance(p, DTensor) != isinstance(value, DTensor) or (isinstance(p, DTensor) and (
                    value.placements != p.placements or value.shape != p.shape or value.device_mesh != p.device_mesh)):
                # a plain tensor on a DTensor parameter is accepted here by torch and fails only in optimizer.step()
                raise DPInvariantError(f"the update of {name} is not in its parameter's form (sharded DTensor "
                                       "with the same placements and shape, or a plain tensor)",
                                       "let the parallel engine's Reduction build the update")
            grad = value.to(device=p.device, dtype=p.dtype)
            p.grad = grad.clone() if copy and grad is value else grad
