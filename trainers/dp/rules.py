"""Which rule computes the per-unit gradient of each trainable parameter, and the hooks that feed it.

Owns: ``assign_rules`` (model + trainable parameters -> one rule per module that directly owns a trainable
parameter, or a refusal), the three rules, and the ``Recorder`` their hooks write to.

- ``LinearRule`` (``nn.Linear`` and subclasses: attention / MLP projections, the LM head, peft LoRA's
  ``lora_A`` / ``lora_B``): saves the input activations A (B, T, d_in) in a forward hook and the output gradient
  G (B, T, d_out) in a tensor hook on the output.
- ``EmbeddingRule`` (``nn.Embedding`` and subclasses): saves the token ids and the output gradient. Scaled
  embeddings (Gemma's ``embed_scale``) multiply G by the scale. Any subclass is checked on its first call
  against ``F.embedding(ids, W) * scale``; a mismatch is refused, naming the class.
- ``GenericRule`` (any other module owning trainable parameters directly and having no child modules: RMSNorm,
  LayerNorm, ...): saves its single tensor input and output gradient and, after the backward, runs a per-row
  vector-Jacobian product of the module's own forward w.r.t. its own parameters (``torch.func``: ``vmap`` of
  ``vjp`` over ``functional_call``). Its first call checks that the re-run reproduces the saved output
  (catches randomness or hidden state). Llama-style RMSNorms take a direct formula, sum_t g_t * xhat_t, after the
  same check on their first call.

Every forward call of a hooked module records one *capture*; a parameter used by several modules (tied
embedding / LM head) or by a module called twice gets several captures, and the engine adds the cross terms.
A hooked output that does not require grad is returned as ``output + anchor`` (a zero scalar leaf that requires
grad), so it is in the autograd graph even though the trainable parameters themselves are switched to
``requires_grad=False`` during the DP step: autograd then never computes the ordinary (summed, unclipped) weight
gradients, only the activation gradients the per-sample rules need.

Sensitive: the saved activations and gradients are functions of private examples; they live only between a
micro-batch's forward and the end of its ``backward`` and are freed there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DPInvariantError, DPRefusal

_LORA_PARTS = ("lora_A", "lora_B")
_EXACT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle dimensions (1 for a 2-D tensor)."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# Captures: what one forward call of a hooked module left behind


@dataclass
class Capture:
    rule: Rule
    saved: torch.Tensor  # A for linear / ids for embedding / input for generic (detached)
    saved_version: int
    grad: torch.Tensor | None = None
    grad_version: int = -1
    kwargs: dict = field(default_factory=dict)
    expected: torch.Tensor | None = None  # GenericRule, first call only: the output the re-run must reproduce
    expected_version: int = -1
    autocast: tuple[str, bool, torch.dtype] | None = None  # GenericRule: the forward's autocast state
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # GenericRule: the weights the forward used

    def set_grad(self, g: torch.Tensor) -> None:
        g = g.detach()
        self.grad = g if self.grad is None else self.grad + g
        self.grad_version = self.grad._version

    def check_unchanged(self) -> None:
        if self.saved._version != self.saved_version or (
            self.grad is not None and self.grad._version != self.grad_version
        ) or (self.expected is not None and self.expected._version != self.expected_version):
            raise DPInvariantError(
                f"a tensor saved for the per-sample gradient of {self.rule.describe()} was modified in place "
                "after it was saved",
                "this model's forward is not supported by the DP engine; report it with the model class",
            )


class Recorder:
    """Shared state of the hooks for one micro-batch: the anchor leaves and the captures."""

    def __init__(self) -> None:
        self.active = False
        self.suspended = False  # True while a GenericRule re-runs a module's forward
        self.num_rows = -1
        self.sequence_length: int | None = None
        self.captures: list[Capture] = []
        self.anchors: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def begin(self, num_rows: int, sequence_length: int | None = None) -> None:
        self.active, self.suspended, self.num_rows = True, False, num_rows
        self.sequence_length = sequence_length
        self.captures, self.anchors = [], {}

    def clear(self) -> None:
        self.active, self.suspended, self.num_rows = False, False, -1
        self.captures, self.anchors = [], {}

    def attach(self, output: torch.Tensor) -> torch.Tensor:
        """``output`` in the autograd graph: as is when it already requires grad, else ``output + anchor``."""
        if output.requires_grad:
            return output
        key = (output.dtype, output.device)
        if key not in self.anchors:
            self.anchors[key] = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        # x + 0 is exact, and puts `output` in the graph although nothing upstream requires grad (the first
        # embedding in full fine-tuning, the first LoRA factors of a frozen model).
        return output + self.anchors[key]

    def recording(self) -> bool:
        if not (self.active and not self.suspended and torch.is_grad_enabled()):
            return False
        if torch._C._current_graph_task_id() != -1:  # a forward re-run inside the backward: checkpointing
            raise DPRefusal(
                "a hooked module ran its forward during the backward pass (activation checkpointing), which would "
                "record its activations twice",
                "disable gradient / activation checkpointing for DP training",
            )
        return True


# ----------------------------------------------------------------------------------------------------------------
# Rules


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's whole shape: DeepSpeed ZeRO-3 keeps a (0,)-shaped placeholder and the shape in ``ds_shape``;
    an FSDP2 DTensor reports its global shape already."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


class Rule:
    kind = "rule"

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter], recorder: Recorder,
                 names: dict[str, str] | None = None):
        self.name, self.module, self.params, self.recorder = name, module, params, recorder
        # attribute -> the engine's parameter name. Under FSDP2 / ZeRO-3 the tensor a forward sees in
        # module.weight is a gathered copy, not the registered parameter, so terms are keyed by name, never by id.
        self.names = names or {attr: attr for attr in params}
        self.verified = False

    def describe(self) -> str:
        return f"module '{self.name}' ({type(self.module).__name__})"

    def install(self) -> torch.utils.hooks.RemovableHandle:
        return self.module.register_forward_hook(self._hook, with_kwargs=True)

    # -- shared checks
    def _single_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or any(
            isinstance(v, torch.Tensor) for v in kwargs.values()
        ):
            raise DPRefusal(
                f"{self.describe()} was called with {len(args)} positional and {len(kwargs)} keyword inputs; "
                "the DP engine handles modules called with exactly one tensor input",
                "freeze this module's parameters or wrap it so it takes one tensor",
            )
        x = args[0]
        if x.dim() < 1 or x.shape[0] != self.recorder.num_rows:
            raise DPRefusal(
                f"{self.describe()} received an input of shape {tuple(x.shape)} whose first dimension is not the "
                f"micro-batch's {self.recorder.num_rows} rows",
                "the DP engine needs the batch dimension first in every layer with trainable parameters",
            )
        return x

    def _output(self, output) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise DPRefusal(f"{self.describe()} returned {type(output).__name__}, not a tensor",
                            "freeze this module's parameters")
        return output

    def _record(self, saved: torch.Tensor, output: torch.Tensor, kwargs: dict | None = None) -> torch.Tensor:
        capture = Capture(rule=self, saved=saved, saved_version=saved._version, kwargs=kwargs or {})
        out = self.recorder.attach(output)
        out.register_hook(capture.set_grad)
        self.recorder.captures.append(capture)
        return out

    def _hook(self, module, args, kwargs, output):  # pragma: no cover - overridden
        raise NotImplementedError


class LinearRule(Rule):
    kind = "linear"

    def __init__(self, name, module, params, recorder, names=None):
        super().__init__(name, module, params, recorder, names)
        # LoRA factors: per-sample gradients are tiny (r x d), instantiating them is always the cheap choice.
        self.force_instantiate = any(part in _LORA_PARTS for part in name.split("."))
        # A plain nn.Linear is x @ W.T + b by construction, unless its forward was replaced on the instance.
        self.verified = type(module) is nn.Linear and "forward" not in vars(module)

    def _hook(self, module, args, kwargs, output):
        if not self.recorder.recording():
            return None
        x = self._single_input(args, kwargs)
        output = self._output(output)
        seq = self.recorder.sequence_length
        if seq is not None and x.dim() >= 3 and x.shape[1] != seq:
            # shape[0] == rows alone would pass a sequence-first (T, B, d) input with T == B: positions would be
            # clipped as if they were units, and one example could move the sum by far more than C.
            raise DPRefusal(
                f"{self.describe()} received an input of shape {tuple(x.shape)} whose leading dims are not the "
                f"micro-batch's (rows, sequence) = ({self.recorder.num_rows}, {seq})",
                "the DP engine needs (batch, sequence, ...) inputs in every layer with trainable parameters",
            )
        if not self.verified:  # a subclass of nn.Linear (or a patched forward): check it is the plain affine map
            with torch.no_grad():
                expected = F.linear(x, module.weight, module.bias)
            if expected.shape != output.shape or not torch.allclose(output, expected.to(output.dtype),
                                                                    **_EXACT_TOLERANCE):
                raise DPRefusal(
                    f"{self.describe()} subclasses nn.Linear but its output is not x @ W.T + b",
                    "the DP engine has no rule for this layer; freeze it or use a plain nn.Linear",
                )
            self.verified = True
        return self._record(x.detach(), output)


# RMSNorm classes whose forward is y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) (Gemma's is (1 + w): not here)
_LLAMA_RMSNORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm", "OlmoRMSNorm",
                   "Olmo2RMSNorm", "GraniteRMSNorm", "SmolLM3RMSNorm")

# Classes known to compute `F.embedding(ids, W) * embed_scale` (checked all the same on the first call).
_KNOWN_SCALED = ("ScaledWordEmbedding",)


class EmbeddingRule(Rule):
    kind = "embedding"

    def __init__(self, name, module, params, recorder, names=None):
        super().__init__(name, module, params, recorder, names)
        if module.max_norm is not None:
            raise DPRefusal(f"{self.describe()} has max_norm set (it renormalises weights in place)",
                            "set max_norm=None or freeze the embedding")
        if module.scale_grad_by_freq:
            raise DPRefusal(
                f"{self.describe()} has scale_grad_by_freq=True (couples the examples of a batch)",
                "set scale_grad_by_freq=False or freeze the embedding",
            )
        self.verified = type(module) is nn.Embedding

    def scale(self) -> torch.Tensor | None:
        """d output / d lookup: Gemma-style scaled embeddings multiply the lookup by ``embed_scale``."""
        module = self.module
        if type(module) is nn.Embedding or not hasattr(module, "embed_scale"):
            return None
        scale = module.embed_scale
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scale))
        return scale.detach().to(device=module.weight.device, dtype=module.weight.dtype)

    def _hook(self, module, args, kwargs, output):
        if not self.recorder.recording():
            return None
        ids = self._single_input(args, kwargs)
        output = self._output(output)
        if ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise DPRefusal(f"{self.describe()} was called with {ids.dtype} ids", "pass integer token ids")
        if not self.verified:
            scale = self.scale()
            known = any(type(module).__name__.endswith(s) for s in _KNOWN_SCALED)
            with torch.no_grad():
                expected = F.embedding(ids, module.weight, module.padding_idx)
                if scale is not None:
                    expected = expected * scale
            if expected.shape != output.shape or not torch.allclose(output, expected.to(output.dtype),
                                                                    **_EXACT_TOLERANCE):
                what = "F.embedding(ids, W) * embed_scale" if scale is not None else "F.embedding(ids, W)"
                hint = "" if known else " (not a known scaled-embedding class)"
                raise DPRefusal(
                    f"{self.describe()}{hint} subclasses nn.Embedding but its output is not {what}",
                    "the DP engine has no rule for this embedding; freeze it or add a rule for its class",
                )
            self.verified = True
        return self._record(ids.detach(), output)


class GenericRule(Rule):
    kind = "generic"

    def _hook(self, module, args, kwargs, output):
        if not self.recorder.recording():
            return None
        x = self._single_input(args, kwargs)
        output = self._output(output)
        capture_out = self._record(x.detach(), output, kwargs=dict(kwargs))
        capture = self.recorder.captures[-1]
        kind = x.device.type
        capture.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        # The weights as this forward used them: under FSDP2 / ZeRO-3 they are gathered only during the module's
        # forward and resharded before the backward, when the per-row gradients are computed (norm weights: small).
        capture.weights = {attr: getattr(module, attr).detach().clone() for attr in self.params}
        if not self.verified:
            capture.expected = output.detach()
            capture.expected_version = capture.expected._version
        return capture_out

    def __init__(self, name, module, params, recorder, names=None):
        super().__init__(name, module, params, recorder, names)
        self._bare: nn.Module | None = None
        # Llama-style RMSNorm, y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype): its per-row weight gradient is
        # sum_t g_t * xhat_t, computed directly instead of re-running the forward under vmap. Taken only for the
        # classes below, and only while the formula reproduces the module's output (checked on its first call).
        self.rms_norm = (type(module).__name__ in _LLAMA_RMSNORMS and set(params) == {"weight"}
                         and len(full_shape(params["weight"])) == 1 and isinstance(getattr(module, "variance_epsilon", None),
                                                                         float))

    def _rms_norm_grads(self, capture: Capture, *, rows) -> dict[str, torch.Tensor] | None:
        x = rows(capture.saved)
        x32 = x.float()
        xhat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.module.variance_epsilon)).to(x.dtype)
        weight = capture.weights["weight"]
        if capture.expected is not None:  # first call: does the formula reproduce the module's output?
            expected = rows(capture.expected)
            again = weight.detach() * xhat
            if again.shape != expected.shape or not torch.allclose(again, expected.to(again.dtype),
                                                                   **_EXACT_TOLERANCE):
                self.rms_norm = False  # not this formula after all: the general path below handles it
                return None
            self.verified = True
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        g = rows(capture.grad).to(acc)
        per_row = (g * xhat.to(acc)).reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1)
        return {"weight": per_row}

    def _hook_free(self) -> nn.Module:
        """A shallow copy of the module without its hooks, for re-running its forward: the sharding engines hook
        every module (DeepSpeed ZeRO-3 would gather parameters inside torch.func's trace)."""
        if self._bare is None:
            import copy
            from collections import OrderedDict

            bare = copy.copy(self.module)
            for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                         "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
                if hasattr(bare, attr):
                    setattr(bare, attr, OrderedDict())
            bare._parameters = OrderedDict(self.module._parameters)  # functional_call swaps these: not the original's
            self._bare = bare
        return self._bare

    def per_row_grads(self, capture: Capture, *, rows) -> dict[str, torch.Tensor]:
        """Per-row gradients {param name: (B_real, *shape)} of this module's own trainable parameters.

        ``rows`` selects the real rows of a (B, ...) tensor (padding rows are never touched).
        """
        from torch.func import functional_call, vjp, vmap

        if self.rms_norm:
            grads = self._rms_norm_grads(capture, rows=rows)
            if grads is not None:
                return grads

        kwargs = capture.kwargs
        expected = rows(capture.expected) if capture.expected is not None else None
        params = capture.weights
        module = self._hook_free()

        def row(x_row: torch.Tensor, g_row: torch.Tensor):
            def f(p):
                return functional_call(module, p, (x_row.unsqueeze(0),), kwargs)

            out, pullback = vjp(f, params)
            (grads,) = pullback(g_row.unsqueeze(0).to(out.dtype))
            return grads, out.squeeze(0)

        device_type, enabled, dtype = capture.autocast
        self.recorder.suspended = True
        try:
            with torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled):  # as in the forward
                grads, outs = vmap(row)(rows(capture.saved), rows(capture.grad))
        except DPRefusal:
            raise
        except Exception as err:  # torch.func could not trace this forward
            raise DPRefusal(
                f"{self.describe()}: per-sample gradients via torch.func failed ({type(err).__name__}: {err})",
                "freeze this module's parameters or add a dedicated rule for its class",
            ) from None
        finally:
            self.recorder.suspended = False
        if expected is not None:
            if outs.shape != expected.shape or not torch.allclose(outs, expected.to(outs.dtype), **_EXACT_TOLERANCE):
                raise DPRefusal(
                    f"{self.describe()}: re-running its forward row by row does not reproduce its output "
                    "(randomness, hidden state or rows that interact)",
                    "freeze this module's parameters or add a dedicated rule for its class",
                )
            self.verified = True
        return grads


# ----------------------------------------------------------------------------------------------------------------
# Assignment


def assign_rules(model: nn.Module, trainable: dict[str, nn.Parameter], recorder: Recorder) -> list[Rule]:
    """One rule per module that directly owns a trainable parameter; refuse anything not covered."""
    by_id = {id(p): name for name, p in trainable.items()}
    covered: set[int] = set()
    rules: list[Rule] = []
    for mod_name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in by_id}
        if not own:
            continue
        where = f"module '{mod_name}' ({type(module).__name__})"
        names = {attr: by_id[id(p)] for attr, p in own.items()}
        if isinstance(module, nn.Linear):
            rule: Rule = LinearRule(mod_name, module, own, recorder, names)
        elif isinstance(module, nn.Embedding):
            rule = EmbeddingRule(mod_name, module, own, recorder, names)
        elif isinstance(module, (nn.ParameterDict, nn.ParameterList)) or any(True for _ in module.children()):
            raise DPRefusal(
                f"trainable parameter(s) {', '.join(names.values())} are owned directly by {where}, which the DP engine has no "
                "per-sample rule for (it has child modules or is a parameter container)",
                "freeze them (requires_grad=False) or move them into a leaf module",
            )
        else:
            rule = GenericRule(mod_name, module, own, recorder, names)
        covered.update(id(p) for p in own.values())
        rules.append(rule)
    missing = [name for name, p in trainable.items() if id(p) not in covered]
    if missing:
        raise DPRefusal(
            f"trainable parameter(s) {', '.join(missing)} are not owned by any module of the model",
            "pass only parameters of the model being trained",
        )
    return rules


__all__ = ["Capture", "EmbeddingRule", "GenericRule", "LinearRule", "Recorder", "Rule", "as_tokens", "assign_rules",
           "full_shape"]
