"""The public functions (re-exported by ``__init__``): validation, backend choice, launch."""

from __future__ import annotations

import torch

from . import _canon, reference
from ._autograd import rotary_, rotary_qk, rotary_x
from ._dispatch import BACKENDS, backend_available, launch_elementwise, launch_rotary, select_backend
from .reference import apply_rotary_transformers_reference, rotary_reference



def _validate(q, k, cos, sin, unsqueeze_dim, interleaved):
    _canon.check_cos_sin(cos, sin)
    if not isinstance(unsqueeze_dim, int) or isinstance(unsqueeze_dim, bool):
        raise TypeError(f"unsqueeze_dim must be an int, got {type(unsqueeze_dim).__name__}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    _canon.canonical_x("q" if k is not None else "x", q, cos, unsqueeze_dim)
    if k is not None:
        _canon.canonical_x("k", k, cos, unsqueeze_dim)
    _canon.check_same_device(q=q, k=k, cos=cos, sin=sin)


def _needs_graph(*tensors) -> bool:
    """Use the custom op (autograd, torch.compile) rather than a bare launch?"""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def apply_rotary_transformers(q, k, cos, sin, unsqueeze_dim=1, *, interleaved=False, backend=None):
    """Rotate q and k like transformers' ``apply_rotary_pos_emb``; returns ``(q_embed, k_embed)``.

    q: ``[B, Hq, S, D]`` (``unsqueeze_dim=1``) or ``[B, S, Hq, D]`` (``unsqueeze_dim=2``), any
    strides; k likewise with its own head count (GQA/MQA). cos/sin: ``[B, S, R]`` or
    ``[S, R]`` (with a matching ``unsqueeze_dim``), fp32 or any float dtype. Outputs have
    the inputs' dtypes and memory layouts. Math in fp32, rounded once.
    """
    _validate(q, k, cos, sin, unsqueeze_dim, interleaved)
    be = select_backend(q.device, backend)
    if be == "reference":
        return apply_rotary_transformers_reference(q, k, cos, sin, unsqueeze_dim, interleaved)
    if _needs_graph(q, k, cos, sin):
        return rotary_qk(q, k, cos, sin, unsqueeze_dim, interleaved, False, be)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    launch_rotary(be, q, k, cos, sin, q_out, k_out, unsqueeze_dim, interleaved, False)
    return q_out, k_out


def apply_rotary_emb(x, cos, sin, unsqueeze_dim=1, interleaved=False, *, backend=None):
    """Rotate a single tensor (q-only layers such as Gemma3n/Gemma4 KV-shared layers)."""
    _validate(x, None, cos, sin, unsqueeze_dim, interleaved)
    be = select_backend(x.device, backend)
    if be == "reference":
        return rotary_reference(x, cos, sin, unsqueeze_dim, interleaved)
    if _needs_graph(x, cos, sin):
        return rotary_x(x, cos, sin, unsqueeze_dim, interleaved, False, be)
    out = torch.empty_like(x)
    launch_rotary(be, x, None, cos, sin, out, None, unsqueeze_dim, interleaved, False)
    return out


def _inplace(q, k, cos, sin, unsqueeze_dim, interleaved, backend):
    _validate(q, k, cos, sin, unsqueeze_dim, interleaved)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, cos, sin)):
        raise RuntimeError(
            "in-place rotation does not support autograd; use apply_rotary_transformers / "
            "apply_rotary_emb, or call under torch.no_grad() / torch.inference_mode()"
        )
    be = select_backend(q.device, backend)
    if torch.compiler.is_compiling():  # data pointers are not traceable; the op is the same
        rotary_(q, k, cos, sin, unsqueeze_dim, interleaved, False, be)
        return
    for name, t in (("q", q), ("k", k)):
        if t is not None:
            _canon.check_no_partial_overlap(name, t, cos, sin)
    if k is not None:
        _canon.check_no_partial_overlap("k", k, q)
    launch_rotary(be, q, k, cos, sin, q, k, unsqueeze_dim, interleaved, False)


def apply_rotary_transformers_(q, k, cos, sin, unsqueeze_dim=1, *, interleaved=False, backend=None):
    """In-place ``apply_rotary_transformers``: rotates q and k in place and returns them."""
    _inplace(q, k, cos, sin, unsqueeze_dim, interleaved, backend)
    return q, k


def apply_rotary_emb_(x, cos, sin, unsqueeze_dim=1, interleaved=False, *, backend=None):
    """In-place ``apply_rotary_emb``: rotates x in place and returns it."""
    _inplace(x, None, cos, sin, unsqueeze_dim, interleaved, backend)
    return x


def apply_rotary(x1, x2, cos, sin, out1, out2, conj: bool = False, *, backend=None) -> None:
    """flash-attn / ``kernels-community/rotary`` elementwise rotation, written into out1/out2.

    ``out1 = x1 * cos - x2 * sin`` and ``out2 = x1 * sin + x2 * cos`` (sin negated when
    ``conj``), with cos/sin broadcast to x1's shape, math in fp32. ``out1``/``out2`` may be
    ``x1``/``x2`` themselves (in place) but must not partially overlap the inputs.
    """
    for name, t in (("x1", x1), ("x2", x2), ("cos", cos), ("sin", sin)):
        _canon.check_float(name, t)
    if x2.shape != x1.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    _canon.check_out("out1", out1, x1)
    _canon.check_out("out2", out2, x2)
    for name, t in (("cos", cos), ("sin", sin)):
        try:
            ok = torch.broadcast_shapes(t.shape, x1.shape) == x1.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to x1's shape {tuple(x1.shape)}")
    _canon.check_same_device(x1=x1, x2=x2, cos=cos, sin=sin, out1=out1, out2=out2)
    _canon.check_no_partial_overlap("out1", out1, x1, x2, cos, sin)
    _canon.check_no_partial_overlap("out2", out2, x1, x2, cos, sin)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x1, x2, cos, sin, out1, out2)):
        raise RuntimeError("apply_rotary writes into out1/out2 and does not support autograd; "
                           "use apply_rotary_transformers or apply_rotary_emb for training")
    launch_elementwise(select_backend(x1.device, backend), x1, x2, cos, sin, out1, out2, bool(conj))


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    return [b for b in BACKENDS if backend_available(b, device)[0]]
