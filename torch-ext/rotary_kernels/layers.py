"""Layers for ``kernels.kernelize``: stateless ``nn.Module`` classes whose ``forward`` has the
signature of the transformers function they replace, ``apply_rotary_pos_emb(q, k, cos, sin,
unsqueeze_dim=1)`` (transformers hub-kernel name ``"rotary_pos_emb"``).

Model-aware: kernels binds ``forward`` to the hub function object it replaces; the layer runs
that function's probed convention (``hub.classify``: half-split or interleaved pairs, per-element
or per-pair cos/sin tables, rotation by +theta or -theta) and the model's own code for math this
package does not implement. Called as a plain module, it is transformers' ``apply_rotary_pos_emb``.

``has_backward`` / ``can_torch_compile`` say what each layer supports; ``kernels`` uses them to
refuse a layer for a mode it cannot serve. See ``rotary_kernels.hub`` for ``kernelize(model)``
and a ready mapping.
"""

from __future__ import annotations

import torch
from torch import nn

from . import hub


class apply_rotary_transformers(nn.Module):
    """Out of place, differentiable (custom-op autograd), traceable by torch.compile: any mode."""

    has_backward = True
    can_torch_compile = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim=1):
        return hub.rope(self, q, k, cos, sin, unsqueeze_dim, False)


class apply_rotary_transformers_inplace(nn.Module):
    """Rotates q and k in place and returns them: inference only, for callers (like transformers'
    attention layers) that never read q/k again; saves the output allocations, not bandwidth."""

    has_backward = False
    can_torch_compile = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim=1):
        return hub.rope(self, q, k, cos, sin, unsqueeze_dim, True)


__all__ = ["apply_rotary_transformers", "apply_rotary_transformers_inplace"]
