"""Privacy units inside one micro-batch: which rows belong together.

Owns: ``UnitLayout``, built from the per-row ``unit_ids`` tensor of a micro-batch.

- Rows with the same non-negative unit id form ONE privacy unit (group- or user-level DP): their gradients are
  summed before the norm is taken, so the whole unit is clipped to C together.
- Rows with unit id -1 are padding rows (dummy rows that keep micro-batch shapes fixed). They belong to no unit
  and are dropped (index-selected away, never multiplied by 0: a fully masked row can hold NaN activations)
  before anything is computed, whatever their loss.
- A unit never spans two micro-batches of one logical step: the sampler packs a unit's rows into one
  micro-batch, and the engine checks it (a unit id seen twice in one step is an error).

Units are numbered 0..U-1 in order of first appearance. The "unit-concatenated" layout puts the real rows of
each unit one after another along the token axis, zero-padded up to the largest unit:
(B_real, T, ...) -> (U, R*T, ...). A per-sample formula written for one sequence then gives the per-unit
quantity, including the cross terms between rows of the same unit. When every real row is its own unit (the
common case) the layout is the identity and nothing is copied.

Sensitive: nothing here reads data; unit ids only say which rows are one person's / one group's.
"""

from __future__ import annotations

import torch


class UnitLayout:
    """Row <-> unit bookkeeping for one micro-batch."""

    def __init__(self, unit_ids: torch.Tensor):
        if not isinstance(unit_ids, torch.Tensor) or unit_ids.dim() != 1:
            raise ValueError("unit_ids must be a 1-D tensor with one unit id per row (-1 for padding rows)")
        if unit_ids.dtype.is_floating_point or unit_ids.dtype == torch.bool or unit_ids.is_complex():
            raise ValueError(f"unit_ids must be an integer tensor, got {unit_ids.dtype}")
        ids = [int(u) for u in unit_ids.detach().cpu().tolist()]
        if any(u < -1 for u in ids):
            raise ValueError("unit ids must be >= 0, or -1 for padding rows")
        self.num_rows = len(ids)
        self.real_rows: list[int] = [r for r, u in enumerate(ids) if u >= 0]  # rows kept, in order
        order: dict[int, int] = {}
        for r in self.real_rows:
            order.setdefault(ids[r], len(order))
        self.unit_labels = torch.tensor(list(order), dtype=torch.long)  # (U,) caller's ids, first-appearance order
        self.num_units = len(order)
        self._real_unit = [order[ids[r]] for r in self.real_rows]  # unit index of each real row
        members: list[list[int]] = [[] for _ in range(self.num_units)]
        for k, u in enumerate(self._real_unit):
            members[u].append(k)  # positions among the real rows
        self.rows_per_unit = max((len(m) for m in members), default=0)
        self.has_padding = len(self.real_rows) != self.num_rows
        self.identity = self.rows_per_unit <= 1  # real row k is unit k
        width = max(self.rows_per_unit, 1)
        self._members = torch.tensor([m + [-1] * (width - len(m)) for m in members], dtype=torch.long).view(-1, width)
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------------------
    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._cache:
            members = self._members.to(device)
            self._cache[device] = dict(
                real=torch.tensor(self.real_rows, dtype=torch.long, device=device),
                unit=torch.tensor(self._real_unit, dtype=torch.long, device=device),
                members=members,
                valid=members >= 0,
            )
        return self._cache[device]

    @property
    def num_real_rows(self) -> int:
        return len(self.real_rows)

    def real(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B_real, ...): drop padding rows (a view-free no-op when there are none)."""
        if rows.shape[0] != self.num_rows:
            raise ValueError(f"expected {self.num_rows} rows, got a tensor of shape {tuple(rows.shape)}")
        if not self.has_padding:
            return rows
        return rows.index_select(0, self._on(rows.device)["real"])

    def real_unit(self, device: torch.device) -> torch.Tensor:
        """(B_real,) unit index of each real row."""
        return self._on(device)["unit"]

    def to_units(self, real_rows: torch.Tensor) -> torch.Tensor:
        """(B_real, T, ...) -> (U, R*T, ...): each unit's rows concatenated along the token axis, zero-padded."""
        if real_rows.shape[0] != self.num_real_rows or real_rows.dim() < 2:
            raise ValueError(f"expected ({self.num_real_rows}, T, ...), got {tuple(real_rows.shape)}")
        if self.identity:
            return real_rows
        cache = self._on(real_rows.device)
        gathered = real_rows[cache["members"].clamp(min=0)]  # (U, R, T, ...)
        valid = cache["valid"].view(*cache["valid"].shape, *([1] * (real_rows.dim() - 1)))
        gathered = torch.where(valid, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))
        return gathered.flatten(1, 2)

    def sum_rows(self, per_row: torch.Tensor) -> torch.Tensor:
        """(B_real, ...) -> (U, ...): sum of the rows of each unit."""
        if self.identity:
            return per_row
        out = per_row.new_zeros((self.num_units, *per_row.shape[1:]))
        return out.index_add_(0, self.real_unit(per_row.device), per_row)

    def row_weights(self, per_unit: torch.Tensor) -> torch.Tensor:
        """(U,) per-unit factors -> (B_real,) per-row factors."""
        if self.identity:
            return per_unit
        return per_unit[self.real_unit(per_unit.device)]
