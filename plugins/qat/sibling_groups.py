"""Sibling fake-quant layers that read one activation (q/k/v, gate/up) trained as one GEMM.

Hugging Face models call ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` one
after another on the same tensor, and ``gate_proj(x)`` / ``up_proj(x)`` too.
In eager training each :class:`~ftq_plugins.qat.fake_quant.Int8QATLinear` costs
the host a Python autograd node, a weight fake-quant launch and a GEMM, and
on a GPU the host issuing them is what the step waits for (the device
idles), so three sibling layers cost three times the host work of one.

A :class:`SiblingGroup` runs the first call of its members as one layer on
their stacked weights: one fake-quant of the stacked weight (per output row,
so the same numbers as each member's own), one GEMM, one autograd node.  The
other members get their slice of that output when they are called with the
same, unchanged input, in the same autocast dtype and grad mode.  A member
called with anything else computes its own output as before: a model that
does not follow the pattern stays correct, only not faster.

Only the mixed-precision path groups (the float32 path computes the int8
kernel's exact arithmetic per layer), and not inside ``torch.compile``,
whose graph sees the layers one by one and fuses what it can itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ftq_plugins.int8.tensor_identity import LastTensorMemo, parameter_state

if TYPE_CHECKING:
    from .fake_quant import Int8QATLinear

__all__ = ["SIBLING_NAMES", "SiblingGroup", "attach_sibling_groups"]

#: Names of layers that one module calls on the same input, by architecture family
#: (Llama/Mistral/Qwen attention and MLP, BERT-style attention, Mixtral experts).
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


class SiblingGroup:
    """Layers of one parent that read the same input, computed as one; see the module docstring."""

    def __init__(self, members: list["Int8QATLinear"]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.fused = members[0].fused
        # the stacked weight's fake-quant, kept until the optimizer (or a load) writes a member's weight
        self._weight_fq: torch.Tensor | None = None
        self._weight_fq_key: tuple | None = None
        # the last group call's outputs still waiting for their members, {member index: output slice},
        # for that input in that dtype and grad mode
        self._pending = LastTensorMemo()

    def forward(self, index: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Member ``index``'s output for input ``x``: its slice of the group's output, computing that when needed."""
        key = (dtype, torch.is_grad_enabled())
        waiting = self._pending.get(x, key)
        if waiting is not None and index in waiting:
            return waiting.pop(index)
        outputs = self._compute(x, dtype)
        self._pending.put(x, key, {i: out for i, out in enumerate(outputs) if i != index})
        return outputs[index]

    def _compute(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        from .fake_quant import QATLinearFunction, shared_fake_quant

        x_fq = shared_fake_quant(x, dtype, self.fused)
        params = [m.weight for m in self.members] + [m.bias for m in self.members]
        y = QATLinearFunction.apply(x, x_fq, self._fake_quant_weight(dtype), self.sizes, *params)
        return y.split(self.sizes, dim=-1)

    def _fake_quant_weight(self, dtype: torch.dtype) -> torch.Tensor:
        from .fake_quant import fake_quant_rows_fast

        key = tuple(parameter_state(m.weight) for m in self.members) + (dtype,)
        if key != self._weight_fq_key:
            with torch.no_grad():
                stacked = torch.cat([m.weight.detach() for m in self.members])
                # per-row fake-quant: the stacked result is each member's own, one above the other
                self._weight_fq = fake_quant_rows_fast(stacked, dtype, self.fused)
            self._weight_fq_key = key
        return self._weight_fq


def attach_sibling_groups(model: torch.nn.Module) -> list[SiblingGroup]:
    """Group the model's :class:`Int8QATLinear` siblings (same parent, names of :data:`SIBLING_NAMES`).

    Members must have the same input size and an ``[out, in]`` weight on one
    device; layers kept in float are simply not members.
    """
    from .fake_quant import Int8QATLinear

    groups = []
    for parent in model.modules():
        for names in SIBLING_NAMES:
            members = [getattr(parent, name, None) for name in names]
            members = [m for m in members if isinstance(m, Int8QATLinear) and not m.transposed]
            if len(members) < 2 or any(m._group is not None for m in members):
                continue
            if len({(m.in_features, m.weight.device, m.weight.dtype) for m in members}) != 1:
                continue
            group = SiblingGroup(members)
            for index, member in enumerate(members):
                member._group = (group, index)
            groups.append(group)
    return groups
