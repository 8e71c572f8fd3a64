"""per_example_loss against transformers' own loss; UnitLayout against naive loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.trainers.dp import UnitLayout, per_example_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-pythia"])
def test_per_example_loss_matches_transformers_per_row(dpref, family):
    model = dpref.tiny_model(family, "full")
    batch = dpref.make_batch(seed=5, lengths=[8, 5, 3], width=8, unit_ids=[0, 1, 2], prompt=[2, 0, 1])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    losses = per_example_loss(logits, batch.labels)
    assert losses.shape == (3,)
    for r in range(3):
        n = int(batch.lengths[r])
        hf = model(input_ids=batch.input_ids[r:r + 1, :n], labels=batch.labels[r:r + 1, :n]).loss
        # transformers computes its loss in float32 even for float64 logits: compare at float32 precision
        torch.testing.assert_close(losses[r], hf.to(losses.dtype), rtol=1e-6, atol=1e-7)


def test_rows_without_targets_give_zero_and_no_nan_gradient():
    logits = torch.randn(3, 4, 7, requires_grad=True)
    poisoned = logits.clone()
    poisoned_rows = torch.zeros(3, 4, 7, dtype=torch.bool)
    poisoned_rows[1] = True
    poisoned = torch.where(poisoned_rows, torch.full_like(poisoned, float("nan")), poisoned)  # a fully masked row
    labels = torch.tensor([[1, 2, 3, 4], [-100] * 4, [5, -100, -100, -100]])
    loss = per_example_loss(poisoned, labels)
    assert loss[1] == 0 and torch.isfinite(loss).all()
    assert loss[2].item() == 0.0  # only the first label, which is never a target (shift)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad[1].abs().sum()) == 0.0


def test_per_example_loss_checks_shapes():
    with pytest.raises(ValueError, match="expects logits"):
        per_example_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        per_example_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), -100)  # keyword-only


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ids=st.lists(st.integers(-1, 4), min_size=1, max_size=9), width=st.integers(1, 3))
def test_unit_layout_matches_naive_grouping(ids, width):
    layout = UnitLayout(torch.tensor(ids))
    rows = torch.randn(len(ids), width, 2, dtype=torch.float64)
    order = list(dict.fromkeys(u for u in ids if u >= 0))  # units in order of first appearance
    assert layout.unit_labels.tolist() == order and layout.num_units == len(order)
    real = layout.real(rows)
    assert torch.equal(real, rows[[r for r, u in enumerate(ids) if u >= 0]])
    concat = layout.to_units(real)
    size = max((ids.count(u) for u in order), default=0)
    assert concat.shape == (len(order), max(size, 1) * width, 2) or (layout.identity and concat.shape == real.shape)
    summed = layout.sum_rows(real.sum(dim=1))
    for k, u in enumerate(order):
        members = rows[[r for r, v in enumerate(ids) if v == u]]
        expected = torch.cat([members.flatten(0, 1), rows.new_zeros((size - len(members)) * width, 2)])
        assert torch.equal(concat[k], expected)
        torch.testing.assert_close(summed[k], members.sum(dim=(0, 1)))
    weights = layout.row_weights(torch.arange(len(order), dtype=torch.float64))
    assert weights.tolist() == [float(order.index(u)) for u in ids if u >= 0]


def test_unit_layout_rejects_bad_ids():
    with pytest.raises(ValueError):
        UnitLayout(torch.tensor([0, -2]))
    with pytest.raises(ValueError):
        UnitLayout(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        UnitLayout(torch.tensor([[0, 1]]))
