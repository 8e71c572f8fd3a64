"""The engine refuses what it cannot make private, and never skips a clip silently.

Refusals before training: uncovered parameters, stray trainable parameters, unsupported layer subclasses,
embedding options that couple examples, gradient checkpointing, bad privacy arguments. Invariant errors during a
step: a trainable parameter without a per-sample contribution, a unit in two micro-batches, a batch-mean loss,
saved activations modified in place, a forward re-run inside the backward. And the engine restores what it
changes (requires_grad, hooks) on every exit path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from privtune.trainers.dp import DPEngine, DPInvariantError, DPRefusal, per_example_loss

pytestmark = pytest.mark.usefixtures("one_thread")
V, D = 9, 4


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.norm = nn.LayerNorm(D)
        self.lin = nn.Linear(D, V)

    def forward(self, ids):
        return self.lin(self.norm(self.emb(ids)))


def toy_loss(logits, ids):
    return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(dim=1)


def run_step(engine, model, ids, unit_ids):
    with engine.micro_batch(unit_ids):
        engine.backward(toy_loss(model(ids), ids))


IDS = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 0]])
UNITS = torch.tensor([0, 1, 2])


# ------------------------------------------------------------------------------------------------------------
# Refusals before training


def test_parameter_owned_by_a_parent_module_is_refused():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Toy()
            self.gate = nn.Parameter(torch.ones(V))

        def forward(self, ids):
            return self.inner(ids) * self.gate

    with pytest.raises(DPRefusal, match=r"gate.*no per-sample rule"):
        DPEngine(Parent(), clip_norm=1.0)


def test_parameter_container_is_refused():
    class WithDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.toy = Toy()
            self.extra = nn.ParameterDict({"default": nn.Parameter(torch.zeros(D))})

        def forward(self, ids):
            return self.toy(ids)

    with pytest.raises(DPRefusal, match=r"extra\.default"):
        DPEngine(WithDict(), clip_norm=1.0)


def test_stray_trainable_parameter_is_refused():
    model = Toy()
    with pytest.raises(DPRefusal, match=r"norm\.weight.*without privacy"):
        DPEngine(model, trainable=[model.emb.weight, model.lin.weight, model.lin.bias, model.norm.bias], clip_norm=1.0)


def test_foreign_parameter_is_refused():
    model = Toy()
    with pytest.raises(DPRefusal, match="does not belong to the model"):
        DPEngine(model, trainable=[*model.parameters(), nn.Parameter(torch.zeros(2))], clip_norm=1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1.0"])
def test_bad_clip_norm_is_refused(bad):
    with pytest.raises(DPRefusal, match="clip_norm"):
        DPEngine(Toy(), clip_norm=bad)


def test_privacy_arguments_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        DPEngine(Toy(), None, 1.0)  # positional privacy arguments fail
    with pytest.raises(DPRefusal, match="clipping"):
        DPEngine(Toy(), clip_norm=1.0, clipping="per-layer")
    with pytest.raises(TypeError):
        DPEngine(Toy(), clip_norm=1.0, clip_nrom=2.0)  # a misspelled option is an error, never ignored


def test_linear_subclass_with_another_forward_is_refused():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = Toy()
    model.lin = Odd(D, V)
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPRefusal, match=r"Odd.*not x @ W.T \+ b"):
        run_step(engine, model, IDS, UNITS)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("with_scale", [False, True])
def test_embedding_subclass_that_is_not_a_scaled_lookup_is_refused(with_scale):
    class Shifted(nn.Embedding):
        def __init__(self, *a):
            super().__init__(*a)
            if with_scale:
                self.embed_scale = 3.0

        def forward(self, ids):
            return super().forward(ids) * 3.0 + 1.0

    model = Toy()
    model.emb = Shifted(V, D)
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPRefusal, match=r"Shifted.*not a known scaled-embedding class"):
        run_step(engine, model, IDS, UNITS)


@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}])
def test_embedding_options_that_change_the_gradient_are_refused(option):
    model = Toy()
    model.emb = nn.Embedding(V, D, **option)
    with pytest.raises(DPRefusal, match=next(iter(option))):
        DPEngine(model, clip_norm=1.0)


def test_generic_module_with_two_inputs_is_refused():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(D))

        def forward(self, x, y):
            return x * self.w + y

    class M(Toy):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, ids):
            h = self.emb(ids)
            return self.lin(self.gate(h, h))

    model = M()
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPRefusal, match=r"'gate' \(Gate\).*exactly one tensor input"):
        run_step(engine, model, IDS, UNITS)


def test_generic_module_with_randomness_is_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(D))

        def forward(self, x):
            return x * self.w + torch.rand_like(x)

    model = Toy()
    model.norm = Noisy()
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPRefusal, match=r"'norm' \(Noisy\).*random"):
        run_step(engine, model, IDS, UNITS)


def test_generic_module_with_hidden_state_is_refused():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(D))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.w + self.calls

    model = Toy()
    model.norm = Counter()
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPRefusal, match=r"'norm' \(Counter\).*does not reproduce its output"):
        run_step(engine, model, IDS, UNITS)


def test_gradient_checkpointing_is_refused(dpref):
    model = dpref.tiny_model("tiny-llama", "full", dtype=torch.float32)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with pytest.raises(DPRefusal, match="checkpointing"):
        DPEngine(model, clip_norm=1.0)


def test_forward_rerun_inside_backward_is_refused():
    class Ckpt(Toy):
        def forward(self, ids):
            h = self.norm(self.emb(ids))
            return checkpoint(lambda x: torch.tanh(self.lin(x)), h, use_reentrant=False)  # tanh saves: recompute

    model = Ckpt()
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises((DPRefusal, RuntimeError), match="checkpointing"):
        run_step(engine, model, IDS, UNITS)


# ------------------------------------------------------------------------------------------------------------
# Invariants during a step


def test_parameter_whose_hooks_never_fire_raises():
    model = Toy()
    model.unused = nn.Linear(D, D)
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPInvariantError, match=r"unused\.weight.*received no per-sample gradient"):
        run_step(engine, model, IDS, UNITS)


def test_parameter_whose_output_never_reaches_the_loss_raises():
    class Dangling(Toy):
        def __init__(self):
            super().__init__()
            self.side = nn.Linear(D, D)

        def forward(self, ids):
            h = self.emb(ids)
            self.side(h)  # computed and dropped
            return self.lin(self.norm(h))

    model = Dangling()
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPInvariantError, match=r"side\.weight"):
        run_step(engine, model, IDS, UNITS)


def test_saved_activation_modified_in_place_raises():
    class InPlace(Toy):
        def forward(self, ids):
            h = self.norm(self.emb(ids))
            out = self.lin(h)
            h.mul_(2.0)  # autograd does not notice: the weight is not differentiated, so h is not saved by it
            return out

    model = InPlace()
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPInvariantError, match="modified in place"):
        run_step(engine, model, IDS, UNITS)


def test_unit_spanning_two_micro_batches_raises():
    model = Toy()
    engine = DPEngine(model, clip_norm=1.0)
    run_step(engine, model, IDS[:2], torch.tensor([0, 1]))
    with pytest.raises(DPInvariantError, match="span two micro-batches"):
        run_step(engine, model, IDS[2:], torch.tensor([1]))
    engine.pop_clipped_sum()
    run_step(engine, model, IDS[2:], torch.tensor([1]))  # a new step: unit 1 may appear again


def test_batch_mean_loss_raises():
    model = Toy()
    engine = DPEngine(model, clip_norm=1.0)
    with engine.micro_batch(UNITS), pytest.raises(DPInvariantError, match="one value per row"):
        engine.backward(toy_loss(model(IDS), IDS).mean())


def test_protocol_misuse_raises():
    model = Toy()
    engine = DPEngine(model, clip_norm=1.0)
    with pytest.raises(DPInvariantError, match="outside"):
        engine.backward(torch.zeros(3, requires_grad=True))
    with engine.micro_batch(UNITS):
        with pytest.raises(DPInvariantError, match="nested"), engine.micro_batch(UNITS):
            pass
        with torch.no_grad():
            logits = model(IDS)
        with pytest.raises(DPInvariantError, match="does not depend"):
            engine.backward(toy_loss(logits, IDS))
    with engine.micro_batch(UNITS):
        engine.backward(toy_loss(model(IDS), IDS))
        with pytest.raises(DPInvariantError, match="twice"):
            engine.backward(toy_loss(model(IDS), IDS))


# ------------------------------------------------------------------------------------------------------------
# State restored, padding-only steps


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_state_is_restored_on_success_and_on_error():
    model = Toy()
    model.norm.bias.requires_grad_(False)
    engine = DPEngine(model, clip_norm=1.0)
    flags = [p.requires_grad for p in model.parameters()]
    with engine.micro_batch(UNITS):
        assert not any(p.requires_grad for p in model.parameters())
        assert _hook_count(model) == 3
        engine.backward(toy_loss(model(IDS), IDS))
    assert [p.requires_grad for p in model.parameters()] == flags and _hook_count(model) == 0
    engine.pop_clipped_sum()
    with pytest.raises(KeyboardInterrupt), engine.micro_batch(UNITS):
        model(IDS)
        raise KeyboardInterrupt  # any exception, even an interrupt, restores the model
    assert [p.requires_grad for p in model.parameters()] == flags and _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(DPInvariantError, match="failed"):  # the failed step cannot be released ...
        engine.pop_clipped_sum()
    with pytest.raises(DPInvariantError, match="failed"), engine.micro_batch(UNITS):
        pass
    engine.discard_step()  # ... only discarded
    run_step(engine, model, IDS, UNITS)
    assert engine.pop_clipped_sum().num_units == 3
    model(IDS)  # outside the context the model is an ordinary model again
    assert _hook_count(model) == 0


def test_padding_only_micro_batch_and_empty_step_give_zero_sums(dpref):
    model = dpref.tiny_model("tiny-gemma", "full", dtype=torch.float32)
    engine = DPEngine(model, clip_norm=1.0)
    ids = torch.full((2, 4), 256)
    with engine.micro_batch(torch.tensor([-1, -1])):
        logits = model(input_ids=ids, attention_mask=torch.zeros_like(ids)).logits  # fully masked: NaN inside
        engine.backward(per_example_loss(logits, torch.full_like(ids, -100)))
    result = engine.pop_clipped_sum()
    assert result.num_units == 0 and result.num_micro_batches == 1
    assert all(torch.equal(g, torch.zeros_like(g)) for g in result.grads.values())
    empty = engine.pop_clipped_sum()  # a step with no micro-batch at all: zeros, noise-only update follows
    assert empty.num_micro_batches == 0 and set(empty.grads) == set(engine.params)
    assert all(float(g.abs().sum()) == 0.0 for g in empty.grads.values())
