"""Per-unit gradient terms: squared norms, cross inner products and clipped sums, without per-sample weights
where they would be large.

Owns: the three term types a capture becomes once its output gradient is known, and the math on them.

- ``DenseTerm``: the per-unit gradient itself, (U, *shape). Biases, generic-rule parameters, and linear weights
  whose per-unit gradient is instantiated (LoRA factors; short sequences relative to the layer size).
- ``LinearTerm``: a linear weight kept as activations A (U, L, d_in) and output gradients G (U, L, d_out).
  Its squared norm comes either from the ghost identity sum_{s,t} (a_s.a_t)(g_s.g_t) (per-unit gradient never
  formed) or, when ``instantiate`` is set, from the per-unit gradient G^T A formed for this one parameter and
  dropped as soon as its norm (and cross terms) are known. Either way the clipped sum is computed afterwards
  from the rows: (c * G)^T A, one matmul, the one ordinary backprop would have done. So at most one layer's
  per-unit gradients exist at a time.
- ``EmbeddingTerm``: an embedding weight kept as token ids (U, L) and lookup gradients (U, L, d) (already
  multiplied by the embedding scale and zeroed at ``padding_idx``); per-unit gradient = scatter of the rows of G
  into the rows of the ids. Squared norm by aggregating equal (unit, id) keys: O(L d), never (U, V, d).

A parameter used several times (tied embedding / LM head, a module called twice) has several terms; its per-unit
gradient is their sum, so its squared norm is sum_i |P_i|^2 + 2 sum_{i<j} <P_i, P_j>. ``cross`` gives every pair:
linear-linear sum_{s,t} (g1_s.g2_t)(a1_s.a2_t); linear-embedding sum_t sum_s G_h[s, x_t] (a_s.g_e[t]);
embedding-embedding sum_{s,t} [x_s = y_t] (g_s.h_t); dense-anything by contracting the dense gradient.

Sensitive: every tensor here is derived from private examples; nothing is kept beyond one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .units import UnitLayout


@dataclass
class DenseTerm:
    per_unit: torch.Tensor  # (U, *shape)


@dataclass
class LinearTerm:
    a_rows: torch.Tensor  # (B_real, T, d_in): padding rows already dropped
    g_rows: torch.Tensor  # (B_real, T, d_out)
    a_units: torch.Tensor  # (U, L, d_in)
    g_units: torch.Tensor  # (U, L, d_out)
    instantiate: bool  # norm from the (U, d_out, d_in) per-unit gradient instead of the ghost identity


@dataclass
class EmbeddingTerm:
    ids_rows: torch.Tensor  # (B_real, T) long
    g_rows: torch.Tensor  # (B_real, T, d): scaled, zero at padding_idx
    ids_units: torch.Tensor  # (U, L)
    g_units: torch.Tensor  # (U, L, d)
    num_embeddings: int


Term = DenseTerm | LinearTerm | EmbeddingTerm


def use_ghost(tokens_per_unit: int, d_in: int, d_out: int, *, strategy: str, force_instantiate: bool) -> bool:
    """Ghost norm when 2 L^2 <= d_in d_out (cheaper than instantiating), unless forced either way."""
    if strategy == "ghost":
        return True
    if strategy == "instantiate" or force_instantiate:
        return False
    return 2 * tokens_per_unit * tokens_per_unit <= d_in * d_out


def linear_term(a_rows: torch.Tensor, g_rows: torch.Tensor, layout: UnitLayout, *, ghost: bool,
                a_units: torch.Tensor | None = None) -> LinearTerm:
    """``a_units``: the unit view of ``a_rows`` when another layer of the same input already built it (q, k and
    v read one tensor); sharing the object lets ``squared_norm`` reuse its Gram matrices."""
    if a_units is None:
        a_units = layout.to_units(a_rows)
    return LinearTerm(a_rows, g_rows, a_units, layout.to_units(g_rows), instantiate=not ghost)


def norm_view(term: Term) -> Term:
    """The form the norm is computed from: instantiated linear terms become dense (U, d_out, d_in)."""
    if isinstance(term, LinearTerm) and term.instantiate:
        return DenseTerm(torch.bmm(term.g_units.transpose(1, 2), term.a_units))
    return term


def squared_norm(terms: list[Term], layout: UnitLayout, *, grams: dict[int, torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """|sum_i P_i|^2 per unit for the terms of one parameter: sum_i |P_i|^2 + 2 sum_{i<j} <P_i, P_j>.

    ``grams``: a cache of per-unit activation Gram matrices A A^T shared by the parameters of one micro-batch,
    keyed by the identity of the A tensor (layers reading one input compute it once)."""
    views = [norm_view(t) for t in terms]  # instantiated gradients of this parameter only, freed on return
    total = self_sq(views[0], layout, grams=grams)
    for i in range(1, len(views)):
        total = total + self_sq(views[i], layout, grams=grams)
        for j in range(i):
            total = total + 2.0 * cross(views[i], views[j])
    return total


def embedding_term(ids_rows: torch.Tensor, g_rows: torch.Tensor, layout: UnitLayout, *, num_embeddings: int,
                   padding_idx: int | None, scale: torch.Tensor | None) -> EmbeddingTerm:
    if scale is not None:
        g_rows = g_rows * scale.to(g_rows.dtype)
    if padding_idx is not None:  # the padding row of the table receives no gradient from the lookup
        g_rows = g_rows.masked_fill((ids_rows == padding_idx).unsqueeze(-1), 0.0)
    return EmbeddingTerm(ids_rows, g_rows, layout.to_units(ids_rows), layout.to_units(g_rows), num_embeddings)


# ----------------------------------------------------------------------------------------------------------------
# Squared norms and inner products, per unit: (U,)


def _gram_product(x1: torch.Tensor, x2: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """sum_{s,t} (x1_s . x2_t)(y1_s . y2_t) per unit."""
    return (torch.bmm(x1, x2.transpose(1, 2)) * torch.bmm(y1, y2.transpose(1, 2))).sum(dim=(1, 2))


def self_sq(term: Term, layout: UnitLayout, *, grams: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """|P|^2 per unit (linear terms: ghost identity; pass norm_view(term) to honour ``instantiate``)."""
    if isinstance(term, DenseTerm):
        return term.per_unit.flatten(1).pow(2).sum(dim=1)
    if isinstance(term, LinearTerm):
        a = term.a_units
        if grams is None:
            return _gram_product(a, a, term.g_units, term.g_units)
        if id(a) not in grams:
            grams[id(a)] = torch.bmm(a, a.transpose(1, 2))
        g = term.g_units
        return (grams[id(a)] * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
    # Embedding: sum over distinct (unit, id) keys of |sum of G rows with that key|^2.
    row_unit = layout.real_unit(term.ids_rows.device)
    keys = (row_unit.unsqueeze(1) * term.num_embeddings + term.ids_rows).flatten()
    g = term.g_rows.flatten(0, 1)
    out = g.new_zeros(layout.num_units)
    if keys.numel() == 0:
        return out
    uniq, inverse = torch.unique(keys, return_inverse=True)
    agg = g.new_zeros((uniq.numel(), g.shape[-1])).index_add_(0, inverse, g)
    return out.index_add_(0, torch.div(uniq, term.num_embeddings, rounding_mode="floor"), agg.pow(2).sum(dim=1))


def _dense_rows(dense: torch.Tensor, ids_units: torch.Tensor) -> torch.Tensor:
    """dense (U, V, d) gathered at ids (U, L) -> (U, L, d)."""
    index = ids_units.unsqueeze(-1).expand(-1, -1, dense.shape[-1])
    return torch.gather(dense, 1, index)


def cross(t1: Term, t2: Term) -> torch.Tensor:
    """<P1, P2> per unit, for two terms of the same parameter (linear terms read as ghost, see norm_view)."""
    order = {DenseTerm: 0, LinearTerm: 1, EmbeddingTerm: 2}
    if order[type(t1)] > order[type(t2)]:
        t1, t2 = t2, t1
    if isinstance(t1, DenseTerm):
        d = t1.per_unit
        if isinstance(t2, DenseTerm):
            return (d * t2.per_unit).flatten(1).sum(dim=1)
        if isinstance(t2, LinearTerm):  # sum_t g_t^T D a_t
            return (torch.bmm(t2.g_units, d) * t2.a_units).sum(dim=(1, 2))
        return (_dense_rows(d, t2.ids_units) * t2.g_units).sum(dim=(1, 2))
    if isinstance(t1, LinearTerm):
        if isinstance(t2, LinearTerm):
            return _gram_product(t1.a_units, t2.a_units, t1.g_units, t2.g_units)
        # LM head (weight V x d, G over the vocabulary) against an embedding lookup of the same weight:
        # sum_t sum_s G_h[s, x_t] (a_s . g_e[t]).
        ids = t2.ids_units  # (U, L2)
        g_at_ids = torch.gather(t1.g_units, 2, ids.unsqueeze(1).expand(-1, t1.g_units.shape[1], -1))  # (U, L1, L2)
        return (g_at_ids * torch.bmm(t1.a_units, t2.g_units.transpose(1, 2))).sum(dim=(1, 2))
    same = (t1.ids_units.unsqueeze(2) == t2.ids_units.unsqueeze(1)).to(t1.g_units.dtype)
    return (same * torch.bmm(t1.g_units, t2.g_units.transpose(1, 2))).sum(dim=(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Clipped sums: sum_u c_u P_u, shaped like the parameter


def clipped_sum(term: Term, unit_factor: torch.Tensor, row_factor: torch.Tensor, shape: torch.Size, *,
                into: torch.Tensor | None = None, scaled: dict | None = None) -> torch.Tensor:
    """sum_u c_u g_u of one term, shaped like its parameter; added in place to ``into`` when given (no temporary
    of the parameter's size: the matmul and the index_add accumulate into it directly).

    ``scaled``: a cache of row-scaled activations for one micro-batch, keyed by the identity of the activation
    and factor tensors (under flat clipping q, k and v scale their shared input once)."""
    if isinstance(term, DenseTerm):
        result = torch.tensordot(unit_factor.to(term.per_unit.dtype), term.per_unit, dims=1).reshape(shape)
        return result if into is None else into.add_(result)
    factor = row_factor.to(term.g_rows.dtype).view(-1, 1, 1)
    if isinstance(term, LinearTerm):
        # (c G)^T A = G^T (c A): scale whichever side is narrower (an LM head's G is vocabulary-wide)
        g, a = term.g_rows, term.a_rows
        if a.shape[-1] < g.shape[-1]:
            key = (id(a), id(row_factor))
            if scaled is None or key not in scaled:
                scaled_a = a * factor
                if scaled is not None:
                    scaled[key] = scaled_a
            a = scaled_a if scaled is None else scaled[key]
        else:
            g = g * factor
        g_t, a = g.flatten(0, 1).transpose(0, 1), a.flatten(0, 1)
        if into is None:
            return (g_t @ a).reshape(shape)
        into.view(g_t.shape[0], a.shape[1]).addmm_(g_t, a)
        return into
    g = term.g_rows * factor
    if into is None:
        out = g.new_zeros((term.num_embeddings, g.shape[-1]))
        return out.index_add_(0, term.ids_rows.flatten(), g.flatten(0, 1)).reshape(shape)
    into.view(term.num_embeddings, g.shape[-1]).index_add_(0, term.ids_rows.flatten(), g.flatten(0, 1))
    return into
