"""Autograd for the kernel backends: one ``torch.autograd.Function`` per operation, the same in
eager mode, under torch.compile (dynamo traces the Functions; their compute is then the
functional custom op ``_dispatch.rotate_op``, one opaque graph node) and under torch.func.

``Rotary`` rotates q (and k) into new tensors:

* grad wrt q/k: the rotation is orthogonal per pair, so its backward is the same rotation with
  ``conj`` flipped: nothing is saved but cos/sin. Double backward works the same way.
* grad wrt cos/sin (rare: learned or differentiated frequencies): computed from the saved
  inputs with PyTorch ops, in fp32; q/k are saved only when cos or sin requires grad.
  (With token-position options the public functions gather cos/sin with differentiable
  PyTorch ops first, so these gradients are only taken in the plain form.)
* k's own tables (``cos_k``/``sin_k``, ``Plan.k_tables``) go wherever the plan goes: k's
  gradient rotates back with them. Gradients wrt any table are then taken by the reference (the
  public functions send such calls there), so ``Rotary`` never differentiates them. Likewise with
  ``Plan.swap_layout`` (MLA's rope): its backward is the flipped plan (read in the forward's output
  layout, written in its input's), and gradients wrt its tables go through the reference.

A Function rather than custom ops with registered autograd: recording one costs less than half
as much host time in eager mode (one-token decode forward+backward on a 2-core CPU: ~44 us
against ~100 us). Forward-mode AD (``torch.func.jvp``, ``forward_ad``) and vmap go through the
reference's PyTorch ops (``_api._reference_for_transform``): dynamo cannot trace a Function
with a custom ``jvp``.

``rotary`` records ``Rotary`` where torch.func or torch.compile may see it (they need its
separate ``setup_context``) and its twin ``RotaryEager`` everywhere else (the same forward,
context and backward in the one-function form, which PyTorch applies without binding the
arguments to forward's signature in Python: ~10 us less host time per recorded call).

``RotaryInplace`` records the in-place rotation of one tensor.
"""

from __future__ import annotations

import inspect

import torch
import torch.autograd.forward_ad as fwAD

from ._dispatch import Plan, launch_rotary, rotate
from .reference import compute_dtype, rotate_every_two, rotate_half


def functional_transform() -> bool:
    """A forward-mode AD level or a torch.func transform is active: tangents and functorch
    wrappers do not show in ``requires_grad``, so the autograd paths must be taken anyway.
    (False while torch.compile traces.)"""
    if fwAD._current_level < 0 and torch._C._functorch.peek_interpreter_stack() is None:
        return False
    return not torch.compiler.is_compiling()


def _cos_sin_grads(plan: Plan, xs, grads, cos, sin, need_cos, need_sin):
    """Gradients of cos and sin (None where not needed), summed over q and k."""
    r = cos.shape[-1]
    rotate_fn = rotate_every_two if plan.interleaved else rotate_half
    shape_u = cos.unsqueeze(plan.unsqueeze_dim).shape
    d_cos = d_sin = 0
    for x, g in zip(xs, grads):
        acc = compute_dtype(x.dtype)
        xr, gr = x[..., :r].to(acc), g[..., :r].to(acc)
        if need_cos:
            d_cos = d_cos + (gr * xr).sum_to_size(shape_u)
        if need_sin:
            # forward: y = x*cos + rot(x)*sin;  conj: y = x*cos + rot^T(x*sin)
            d_sin = d_sin + (xr * rotate_fn(gr) if plan.conj else gr * rotate_fn(xr)).sum_to_size(shape_u)
    d_cos = d_cos.reshape(cos.shape).to(cos.dtype) if need_cos else None
    d_sin = d_sin.reshape(sin.shape).to(sin.dtype) if need_sin else None
    return d_cos, d_sin


class Rotary(torch.autograd.Function):
    """q (and k, may be None) rotated into new tensors, differentiable wrt q, k, cos and sin.
    ``plan``: the validated call (``_dispatch.Plan``)."""

    @staticmethod
    def forward(q, k, cos, sin, plan):
        return tuple(rotate(q, k, cos, sin, plan))

    @staticmethod
    def setup_context(ctx, inputs, output):  # (separate from forward: torch.func transforms work)
        q, k, cos, sin, plan = inputs
        ctx.plan = plan
        ctx.has_k = k is not None
        if cos.requires_grad or sin.requires_grad:
            ctx.save_for_backward(cos, sin, q, k)
        else:
            ctx.save_for_backward(cos, sin)
        if not functional_transform():  # (torch.func wrappers do not show requires_grad)
            for x, out in zip((q, k), output):  # like the reference: an output depends on its own input
                if not (x.requires_grad or cos.requires_grad or sin.requires_grad):  # and cos/sin only
                    ctx.mark_non_differentiable(out)

    @staticmethod
    def backward(ctx, *grads):
        cos, sin, *xs = ctx.saved_tensors
        gq, gk = grads if ctx.has_k else (grads[0], None)
        need = ctx.needs_input_grad
        dq = dk = d_cos = d_sin = None
        if need[0] or need[1]:
            plan = ctx.plan.flipped()
            # create_graph: record the backward for double backward (not while compiling: the
            # traced backward is one graph)
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                d = rotary(gq, gk, cos, sin, plan)
            else:
                d = rotate(gq, gk, cos, sin, plan)
            dq = d[0] if need[0] else None
            dk = d[1] if need[1] else None
        if need[2] or need[3]:
            d_cos, d_sin = _cos_sin_grads(ctx.plan, xs[: 1 + ctx.has_k], (gq, gk), cos, sin, need[2], need[3])
        return dq, dk, d_cos, d_sin, None


# Function.apply binds its arguments against forward's signature, computing inspect.signature on
# every call (~5 us, a tenth of a one-token forward+backward): computed once here instead.
Rotary.forward.__signature__ = inspect.signature(Rotary.forward)


class RotaryEager(torch.autograd.Function):
    """``Rotary`` in eager mode outside torch.func transforms (see ``rotary``). A Function with
    ``setup_context`` has every ``apply``'s arguments bound to forward's signature in Python
    (``inspect.Signature.bind``): one-token forward on a 2-core CPU 21.4 us against 10.2 us in
    this form."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, plan):
        output = Rotary.forward(q, k, cos, sin, plan)
        Rotary.setup_context(ctx, (q, k, cos, sin, plan), output)
        return output

    backward = Rotary.backward


def rotary(q, k, cos, sin, plan) -> tuple:
    """q (and k) rotated into new tensors by ``Rotary``, recorded for autograd: ``Rotary``
    itself while torch.compile traces or a torch.func transform is active, else ``RotaryEager``."""
    if torch.compiler.is_compiling() or functional_transform():
        return Rotary.apply(q, k, cos, sin, plan)
    return RotaryEager.apply(q, k, cos, sin, plan)


class RotaryInplace(torch.autograd.Function):
    """In-place rotation recording autograd (flash-attn's ``inplace=True``): x is rotated in
    place (``mark_dirty``: its version is bumped and its history rebased, also for views of a
    larger tensor such as a packed qkv's heads); backward rotates the gradient with ``conj``
    flipped. Nothing is saved but cos/sin; gradients wrt cos/sin are not taken (the public API
    refuses them). Double backward as ``Rotary``'s. ``plan``: x's validated call
    (``_dispatch.Plan``, x in q's place)."""

    @staticmethod
    def forward(ctx, x, cos, sin, plan):
        launch_rotary(x, None, cos, sin, x, None, plan)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.plan = plan
        return x

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph: double backward
            return rotary(g, None, cos, sin, ctx.plan.flipped())[0], None, None, None
        return rotate(g, None, cos, sin, ctx.plan.flipped())[0], None, None, None
