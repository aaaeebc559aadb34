"""The pure-PyTorch reference that defines what every kernel computes.

Conventions (the same for every entry point of the package):

* ``x`` has head dim ``D`` last; ``cos``/``sin`` have a last dim ``R`` (the rotary dim,
  ``R`` even, ``R <= D``) laid out like ``x``'s first ``R`` dims: for the half-split
  (``rotate_half``, Llama/NeoX) layout element ``j`` pairs with ``j + R/2``; for the
  interleaved (GPT-J ``rotate_every_two``) layout element ``2i`` pairs with ``2i + 1``.
  Dims ``R..D`` pass through unchanged (partial rotary).
* ``cos.unsqueeze(unsqueeze_dim)`` must broadcast against ``x`` (transformers' rule).
* Math runs in float32 (float64 for float64 inputs) and is rounded once to ``x.dtype``.

For ``R == D``, half-split, and cos/sin of ``x``'s dtype this is exactly transformers'
``apply_rotary_pos_emb`` up to that single rounding (eager rounds three times).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: [x1, x2] -> [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotate_every_two: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotary_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate one tensor: ``x * cos + rotate(x) * sin`` on the first R dims."""
    r = cos.shape[-1]
    acc = compute_dtype(x.dtype)
    cos = cos.unsqueeze(unsqueeze_dim).to(acc)
    sin = sin.unsqueeze(unsqueeze_dim).to(acc)
    x_rot, x_pass = x[..., :r].to(acc), x[..., r:]
    rotate = rotate_every_two if interleaved else rotate_half
    out = (x_rot * cos + rotate(x_rot) * sin).to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def apply_rotary_transformers_reference(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """Reference for ``apply_rotary_transformers``: the same rotation applied to q and k."""
    return (
        rotary_reference(q, cos, sin, unsqueeze_dim, interleaved),
        rotary_reference(k, cos, sin, unsqueeze_dim, interleaved),
    )


def apply_rotary_reference(x1, x2, cos, sin, conj=False):
    """Reference for flash-attn's elementwise ``apply_rotary``: returns (out1, out2)."""
    acc = compute_dtype(x1.dtype)
    c, s = cos.to(acc), sin.to(acc)
    if conj:
        s = -s
    a, b = x1.to(acc), x2.to(acc)
    return (a * c - b * s).to(x1.dtype), (a * s + b * c).to(x2.dtype)
