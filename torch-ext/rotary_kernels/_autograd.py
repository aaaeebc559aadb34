"""Autograd for the kernel backends: a ``torch.autograd.Function`` in eager mode, ``torch.library``
custom ops for torch.compile. ``rotate_differentiable`` picks one.

The math, shared by both:

* grad wrt q/k: the rotation is orthogonal per pair, so its backward is the same rotation with
  ``conj`` flipped: nothing is saved but cos/sin. Double backward works the same way.
* grad wrt cos/sin (rare: learned or differentiated frequencies): computed from the saved
  inputs with PyTorch ops, in fp32; q/k are saved only when cos or sin requires grad.
  (With token-position options the public API gathers cos/sin with differentiable PyTorch ops
  first, so these ops only see cos/sin gradients in the plain form.)
* k's own tables (``cos_k``/``sin_k``) ride along wherever cos/sin go for k: k's gradient
  rotates with them, conj. Gradients wrt any table are then taken by the reference (the public
  API sends those calls there), so these paths never differentiate cos_k/sin_k.

``Rotary`` (eager, gradients wrt q/k only: the training case) is the light one on host time:
recording a ``torch.autograd.Function`` costs a fraction of a custom op's autograd, which
matters for decode-sized calls. Its ``setup_context`` form lets torch.func transforms
(``torch.func.grad``, ``jvp``) run it.

``rotary_qk`` (q and k) and ``rotary_x`` (one tensor), in this build's op namespace
(``_ops.py``), are functional ops with fake implementations (so ``torch.compile(fullgraph=True)``
traces them as single nodes) and registered autograd; they also take cos/sin gradients. Their
trailing arguments (positions, cu_seqlens, seqlen_offsets, offset, mrope_section,
mrope_interleaved, cached) are ``_index.TokenIndex.op_args()``. ``rotary_`` rotates in place
(no autograd; under torch.compile the public in-place functions record gradients through
``copy_`` of the functional op's result instead).

``RotaryInplace`` (eager) records the in-place rotation of one tensor for autograd.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._dispatch import launch_elementwise, launch_rotary, rotate_new
from ._index import TokenIndex
from ._ops import add_op_namespace_prefix
from .reference import compute_dtype, rotate_every_two, rotate_half


def functional_transform() -> bool:
    """A forward-mode AD level or a torch.func transform is active: tangents and functorch
    wrappers do not show in ``requires_grad``, so the autograd paths must be taken anyway.
    (False while torch.compile traces: it records the custom ops, whatever the mode.)"""
    if torch.compiler.is_compiling():
        return False
    return fwAD._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None



@torch.library.custom_op(add_op_namespace_prefix("rotary_qk"), mutates_args=())
def rotary_qk(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
    unsqueeze_dim: int, interleaved: bool, conj: bool, backend: str,
    positions: Optional[Tensor], cu_seqlens: Optional[Tensor], seqlen_offsets: Optional[Tensor],
    offset: int, mrope_section: list[int], mrope_interleaved: bool, cached: bool,
    cos_k: Optional[Tensor] = None, sin_k: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    idx = TokenIndex.from_op_args(positions, cu_seqlens, seqlen_offsets, offset, mrope_section, mrope_interleaved, cached)
    q_out, k_out = rotate_new(backend, q, k, cos, sin, unsqueeze_dim, interleaved, conj, idx, True, cos_k, sin_k)
    return q_out, k_out


@torch.library.custom_op(add_op_namespace_prefix("rotary_x"), mutates_args=())
def rotary_x(
    x: Tensor, cos: Tensor, sin: Tensor,
    unsqueeze_dim: int, interleaved: bool, conj: bool, backend: str,
    positions: Optional[Tensor], cu_seqlens: Optional[Tensor], seqlen_offsets: Optional[Tensor],
    offset: int, mrope_section: list[int], mrope_interleaved: bool, cached: bool,
) -> Tensor:
    idx = TokenIndex.from_op_args(positions, cu_seqlens, seqlen_offsets, offset, mrope_section, mrope_interleaved, cached)
    return rotate_new(backend, x, None, cos, sin, unsqueeze_dim, interleaved, conj, idx)[0]


@torch.library.custom_op(add_op_namespace_prefix("rotary_"), mutates_args=("q", "k"))
def rotary_(
    q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor,
    unsqueeze_dim: int, interleaved: bool, conj: bool, backend: str,
    positions: Optional[Tensor], cu_seqlens: Optional[Tensor], seqlen_offsets: Optional[Tensor],
    offset: int, mrope_section: list[int], mrope_interleaved: bool, cached: bool,
    cos_k: Optional[Tensor] = None, sin_k: Optional[Tensor] = None,
) -> None:
    idx = TokenIndex.from_op_args(positions, cu_seqlens, seqlen_offsets, offset, mrope_section, mrope_interleaved, cached)
    launch_rotary(backend, q, k, cos, sin, q, k, unsqueeze_dim, interleaved, conj, idx, None, cos_k, sin_k)


@rotary_qk.register_fake
def _(q, k, *args):
    return torch.empty_like(q), torch.empty_like(k)


@rotary_x.register_fake
def _(x, *args):
    return torch.empty_like(x)


@rotary_.register_fake
def _(q, k, *args):
    return None


def _setup(ctx, xs, cos, sin, args):
    ctx.args = tuple(args[:4])  # (unsqueeze_dim, interleaved, conj, backend)
    idx = TokenIndex.from_op_args(*args[4:11])
    ctx.index_scalars = idx.op_args()[3:]  # the tensors go through save_for_backward
    need_cs = cos.requires_grad or sin.requires_grad
    if need_cs and not idx.plain:
        raise RuntimeError("internal: cos/sin gradients with token-position options are taken by the public API")
    ctx.save_for_backward(cos, sin, *idx[:3], *(x if need_cs else None for x in xs))


def _index_args(ctx):
    """The index arguments to pass on to the backward's op call."""
    return (*ctx.saved_tensors[2:5], *ctx.index_scalars)


def _cos_sin_grads(ctx, xs, grads, cos, sin):
    """Gradients of cos and sin (None where not needed), summed over q and k."""
    unsqueeze_dim, interleaved, conj, _ = ctx.args
    need_cos, need_sin = ctx.needs_input_grad[len(xs)], ctx.needs_input_grad[len(xs) + 1]
    if not (need_cos or need_sin):
        return None, None
    r = cos.shape[-1]
    rotate = rotate_every_two if interleaved else rotate_half
    shape_u = cos.unsqueeze(unsqueeze_dim).shape
    d_cos = d_sin = 0
    for x, g in zip(xs, grads):
        acc = compute_dtype(x.dtype)
        xr, gr = x[..., :r].to(acc), g[..., :r].to(acc)
        if need_cos:
            d_cos = d_cos + (gr * xr).sum_to_size(shape_u)
        if need_sin:
            # forward: y = x*cos + rot(x)*sin;  conj: y = x*cos + rot^T(x*sin)
            d_sin = d_sin + (xr * rotate(gr) if conj else gr * rotate(xr)).sum_to_size(shape_u)
    d_cos = d_cos.reshape(cos.shape).to(cos.dtype) if need_cos else None
    d_sin = d_sin.reshape(sin.shape).to(sin.dtype) if need_sin else None
    return d_cos, d_sin


def _setup_qk(ctx, inputs, output):
    q, k, cos, sin, *args = inputs
    _setup(ctx, (q, k), cos, sin, tuple(args))
    ctx.k_tables = tuple(args[11:])  # (cos_k, sin_k): no gradients here (the public API's rule)
    # Like the reference: an output depends on cos/sin and its own input only.
    for x, out in zip((q, k), output):
        if not (x.requires_grad or cos.requires_grad or sin.requires_grad):
            ctx.mark_non_differentiable(out)


def _backward_qk(ctx, gq, gk):
    cos, sin, _, _, _, q, k = ctx.saved_tensors
    unsqueeze_dim, interleaved, conj, backend = ctx.args
    dq = dk = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dq, dk = rotary_qk(gq, gk, cos, sin, unsqueeze_dim, interleaved, not conj, backend, *_index_args(ctx),
                           *ctx.k_tables)
    d_cos, d_sin = _cos_sin_grads(ctx, (q, k), (gq, gk), cos, sin)
    return dq, dk, d_cos, d_sin, *([None] * 13)


def _setup_x(ctx, inputs, output):
    x, cos, sin, *args = inputs
    _setup(ctx, (x,), cos, sin, tuple(args))


def _backward_x(ctx, g):
    cos, sin, _, _, _, x = ctx.saved_tensors
    unsqueeze_dim, interleaved, conj, backend = ctx.args
    dx = None
    if ctx.needs_input_grad[0]:
        dx = rotary_x(g, cos, sin, unsqueeze_dim, interleaved, not conj, backend, *_index_args(ctx))
    d_cos, d_sin = _cos_sin_grads(ctx, (x,), (g,), cos, sin)
    return dx, d_cos, d_sin, *([None] * 11)


rotary_qk.register_autograd(_backward_qk, setup_context=_setup_qk)
rotary_x.register_autograd(_backward_x, setup_context=_setup_x)


class Rotary(torch.autograd.Function):
    """Eager autograd for gradients wrt q/k (cos/sin need none): forward = the rotation,
    backward = the rotation with ``conj`` flipped, itself differentiable (double backward).

    ``args``: (unsqueeze_dim, interleaved, conj, backend, idx, validated[, cos_k, sin_k]), packed
    into one argument: ``apply`` binds the arguments against forward's signature on every call, whose
    cost grows with their number."""

    @staticmethod
    def forward(q, k, cos, sin, args):
        return tuple(rotate_new(args[3], q, k, cos, sin, *args[:3], *args[4:]))

    @staticmethod
    def setup_context(ctx, inputs, output):  # (separate from forward: torch.func transforms work)
        q, k, cos, sin, args = inputs
        ctx.save_for_backward(cos, sin)
        ctx.args = args
        ctx.has_k = k is not None
        if functional_transform():  # jvp needs the tables; tangents do not show in requires_grad
            ctx.save_for_forward(cos, sin)
        else:
            for x, out in zip((q, k), output):  # like the reference: an output depends on its own input only
                if not x.requires_grad:
                    ctx.mark_non_differentiable(out)

    @staticmethod
    def jvp(ctx, q_t, k_t, cos_t, sin_t, _):
        """Forward-mode AD: the rotation is linear in q/k, so a tangent rotates like its primal,
        through this same Function (tangents may be torch.func wrappers; nested transforms compose).
        (cos/sin with tangents never get here: the public API sends those to the reference.)"""
        cos, sin = ctx.saved_tensors
        if ctx.has_k and q_t is not None and k_t is not None:
            return Rotary.apply(q_t, k_t, cos, sin, ctx.args)
        tables = ((cos, sin), tuple(ctx.args[6:]) or (cos, sin))  # q's, k's
        return tuple(None if t is None else Rotary.apply(t, None, *tables[i], ctx.args[:6])[0]
                     for i, t in enumerate((q_t, k_t)[: 1 + ctx.has_k]))

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        unsqueeze_dim, interleaved, conj, backend, idx, _, *k_tables = ctx.args
        gq, gk = grads if len(grads) == 2 else (grads[0], None)
        args = (unsqueeze_dim, interleaved, not conj, backend, idx, True, *k_tables)
        if torch.is_grad_enabled():  # create_graph: record the backward for double backward
            d = Rotary.apply(gq, gk, cos, sin, args)
        else:
            d = rotate_new(backend, gq, gk, cos, sin, unsqueeze_dim, interleaved, not conj, idx, True, *k_tables)
        dq, dk = d if gk is not None else (d[0], None)
        return dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None, None, None, None


Rotary.forward.__signature__ = inspect.signature(Rotary.forward)  # computed once, not per apply


class RotaryInplace(torch.autograd.Function):
    """In-place rotation recording autograd (flash-attn's ``inplace=True``): x is rotated in
    place (``mark_dirty``: its version is bumped and its history rebased, also for views of a
    larger tensor such as a packed qkv's heads); backward rotates the gradient with ``conj``
    flipped. Nothing is saved but cos/sin; gradients wrt cos/sin are not taken (the public API
    refuses them). ``args``: launch_rotary's (backend, cos, sin, unsqueeze_dim, interleaved,
    conj, idx)."""

    @staticmethod
    def forward(ctx, x, args):
        backend, cos, sin, unsqueeze_dim, interleaved, conj, idx = args
        launch_rotary(backend, x, None, cos, sin, x, None, unsqueeze_dim, interleaved, conj, idx)
        ctx.mark_dirty(x)
        ctx.args = args
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        backend, cos, sin, unsqueeze_dim, interleaved, conj, idx = ctx.args
        return rotate_new(backend, g, None, cos, sin, unsqueeze_dim, interleaved, not conj, idx)[0], None


class RotaryDeinterleave(torch.autograd.Function):
    """DeepSeek-V3 / MLA rope (transformers' ``apply_rotary_pos_emb_interleave``): pairs are read
    at ``(2i, 2i + 1)`` and written at ``(i, i + R/2)``, one elementwise launch (strided views of
    x and out); backward reads the gradient's ``(i, i + R/2)`` and writes ``(2i, 2i + 1)``, conj.
    ``cos``/``sin``: per-pair tables broadcast to ``x[..., ::2]``."""

    @staticmethod
    def forward(ctx, x, cos, sin, backend):
        out = torch.empty_like(x)
        h = x.shape[-1] // 2
        launch_elementwise(backend, x[..., 0::2], x[..., 1::2], cos, sin, out[..., :h], out[..., h:], False)
        ctx.save_for_backward(cos, sin)
        ctx.backend = backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        dx = torch.empty_like(g)
        h = g.shape[-1] // 2
        launch_elementwise(ctx.backend, g[..., :h], g[..., h:], cos, sin, dx[..., 0::2], dx[..., 1::2], True)
        return dx, None, None, None


def rotate_differentiable(q, k, cos, sin, unsqueeze_dim, interleaved, conj, backend, idx: TokenIndex, cos_k=None,
                          sin_k=None) -> tuple:
    """Rotate q (and k, may be None; with cos_k/sin_k when given) recording autograd: ``Rotary``
    in eager mode when cos/sin need no gradient, else (torch.compile, cos/sin gradients) the custom ops."""
    k_tables = () if cos_k is None else (cos_k, sin_k)
    if not (torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad):
        return Rotary.apply(q, k, cos, sin, (unsqueeze_dim, interleaved, conj, backend, idx, True, *k_tables))
    if k is None:
        return (rotary_x(q, cos, sin, unsqueeze_dim, interleaved, conj, backend, *idx.op_args()),)
    return rotary_qk(q, k, cos, sin, unsqueeze_dim, interleaved, conj, backend, *idx.op_args(), *k_tables)
