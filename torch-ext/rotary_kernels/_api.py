"""The public functions (re-exported by ``__init__``): validation, backend choice, launch."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from . import _canon
from ._autograd import RotaryInplace, functional_transform, rotary
from ._dispatch import (BACKENDS, COMPILED, Declined, Plan, backend_available, launch_elementwise, launch_inplace,
                        full_width, rotate, rotate_inplace_op, rotate_inplace_replayed, select_backend)
from ._index import NO_INDEX, check_values, kernel_axes, make_index, reference_kwargs
from .reference import materialize_cos_sin, rotary_reference_indexed

_INDEX_DOC = """
    Token-position options (keyword-only; semantics in ``reference.py``, "Token positions"):

    * ``positions``: int tensor of the tokens' shape ([B, S] or [T]); cos/sin are then
      ``[max_pos, R]`` caches and each token reads row ``positions[token]`` in the kernel.
    * ``cu_seqlens`` (+ ``max_seqlen``, accepted and unused): packed x ``[T, H, D]`` whose
      sequences start at ``cu_seqlens[b]``; positions restart at 0 in each (cache mode).
    * ``seqlen_offsets``: int or int tensor ``[batch]`` added to every position of a
      sequence (decoding with a KV cache; cache mode).
    * ``mrope_section=(t, h, w)`` (+ ``mrope_interleaved``): multimodal RoPE; cos/sin are
      ``[3, ..., R]`` per-axis tables, or, in cache mode, positions are ``[3, ...]``.

    Positions outside the cache raise ``IndexError`` on CPU tensors (checked where the kernels
    launch, so also inside compiled programs); on GPUs the kernels read nothing out of bounds
    and write NaN into the rotated dims of such a token, and ``ROTARY_KERNELS_CHECK=1`` checks
    before launching (a sync)."""


INDEX_OPTIONS = ("positions", "cu_seqlens", "max_seqlen", "seqlen_offsets", "mrope_section", "mrope_interleaved")


def _full_shape(t: torch.Tensor) -> torch.Tensor:
    """A per-pair table's full-width stand-in ``[..., R]`` for the shape rules (a broadcast view:
    nothing copied, never read)."""
    return t[..., :1].expand(*t.shape[:-1], 2 * t.shape[-1])


def _validate(q, k, cos, sin, unsqueeze_dim, interleaved, index: dict, k_tables=None, pair_tables=False):
    unknown = sorted(set(index) - set(INDEX_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the token-position options are {INDEX_OPTIONS}")
    r = _canon.check_cos_sin(cos, sin)
    if not isinstance(unsqueeze_dim, int) or isinstance(unsqueeze_dim, bool):
        raise TypeError(f"unsqueeze_dim must be an int, got {type(unsqueeze_dim).__name__}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if r % 2 and not pair_tables:  # (computed by the reference: the kernels rotate pairs)
        _canon.check_odd_rotary(r, interleaved, index, q, k)
    if pair_tables:
        for name, x in (("q" if k is not None else "x", q), ("k", k)):
            if isinstance(x, torch.Tensor) and x.dim() and 2 * r > x.shape[-1]:
                raise ValueError(f"rotary dim {2 * r} (2 x cos.shape[-1], per-pair tables) is larger than {name}'s "
                                 f"head dim {x.shape[-1]}")
    shape = _full_shape(cos) if pair_tables else cos  # (the rules are stated for full-width tables)
    idx = make_index(q, shape, unsqueeze_dim, **index)
    axes = kernel_axes(q, k, shape, unsqueeze_dim, idx)
    cos_k, sin_k = k_tables or (None, None)
    _canon.check_same_device(q=q, k=k, cos=cos, sin=sin, cos_k=cos_k, sin_k=sin_k)
    if cos_k is not None:  # the same rules against k (the tables' own shapes may differ from cos's)
        shape_k = _full_shape(cos_k) if pair_tables else cos_k
        try:
            kernel_axes(k, None, shape_k, unsqueeze_dim, make_index(k, shape_k, unsqueeze_dim, **index))
        except ValueError as e:
            raise ValueError(f"cos_k/sin_k: {e}") from None
    return idx, axes


def _records_grad(*tensors) -> bool:
    """Autograd records this call: grad mode and an input that requires grad."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def _needs_graph(*tensors) -> bool:
    """Go through the autograd Functions rather than launch directly? (Always while torch.compile
    traces: dynamo records the Functions, whose compute is then the custom ops.)"""
    return torch.compiler.is_compiling() or functional_transform() or _records_grad(*tensors)


_REFERENCE_TRANSFORMS = (torch._C._functorch.TransformType.Vmap, torch._C._functorch.TransformType.Jvp)


def _reference_for_transform(*tables) -> bool:
    """Under torch.func's grad/vjp, ``Rotary`` carries q/k's gradients; forward-mode AD (jvp,
    forward_ad), vmap, and transforms that reach cos/sin go through the reference's PyTorch ops."""
    if not functional_transform():
        return False
    if fwAD._current_level >= 0 or any(i.key() in _REFERENCE_TRANSFORMS
                                       for i in torch._C._functorch.get_interpreter_stack() or ()):
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tables if t is not None)


def _backend(q, cos, sin, backend, k_tables=None, pair_tables=False) -> str:
    """The backend of a validated call: the reference where only it computes the result (an odd
    rotary dim; torch.func transforms reaching cos/sin, vmap; gradients wrt any table when k has
    its own), else ``select_backend``'s choice."""
    be = select_backend(q.device, backend)  # (validates a requested backend either way)
    tables = (cos, sin, *(k_tables or ()))
    k_grads = k_tables is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tables)
    odd = cos.shape[-1] % 2 and not pair_tables
    return "reference" if odd or k_grads or _reference_for_transform(*tables) else be


def _one_call_backend(q, k, cos, sin, unsqueeze_dim, interleaved, backend, index):
    """The backend for the one-call path, or None when it does not apply: token-position
    options, tensor subclasses, tracing, torch.func, the reference backend. On cpu/cuda the C++
    entry ops (torch_binding.cpp) validate, plan and launch in one dispatch; on triton a launch
    recorded for the call's geometry is replayed (``_dispatch.rotate``). (A small
    (decode) call then costs one op dispatch, or one launch, instead of tens of Python-level
    tensor calls.)"""
    if index or type(unsqueeze_dim) is not int or not -5 <= unsqueeze_dim < 5 or type(interleaved) is not bool:
        return None  # (5: cos/sin [B, S, R] unsqueezed have 4 dims; the full path reports the rest)
    if type(q) is not torch.Tensor or type(cos) is not torch.Tensor or type(sin) is not torch.Tensor or not (
            k is None or type(k) is torch.Tensor):
        return None
    if torch.compiler.is_compiling() or functional_transform():
        return None
    try:
        be = select_backend(q.device, backend)
    except (RuntimeError, TypeError, ValueError):  # reported by the full path, after argument validation
        return None
    return be if be in ("cpu", "cuda", "triton") else None


def _run(q, k, cos, sin, plan: Plan) -> tuple:
    """Launch, through ``Rotary`` when autograd (or torch.compile) records the call."""
    if _needs_graph(q, k, cos, sin):
        return rotary(q, k, cos, sin, plan)
    return tuple(rotate(q, k, cos, sin, plan))


def _plain_if_cos_grad(q, k, cos, sin, unsqueeze_dim, interleaved, idx, axes):
    """Gradients wrt cos/sin through positions/mrope: gather them with differentiable PyTorch
    ops (the reference's own gather) and rotate in the plain form, where ``Rotary``
    differentiates cos/sin. Returns (cos, sin, idx, axes)."""
    if idx.plain or not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return cos, sin, idx, axes
    c, s = materialize_cos_sin(q, cos, sin, unsqueeze_dim, interleaved, **reference_kwargs(idx))
    return c, s, NO_INDEX, kernel_axes(q, k, c, unsqueeze_dim, NO_INDEX)


def _tables(cos, sin, interleaved, pair_tables, conj, names=("cos", "sin")):
    """Check the table options and, with ``pair_tables``, the per-pair tables' shapes. (The
    kernels read per-pair tables as they are; ``_dispatch.full_width`` expands them for the
    reference's PyTorch ops.)"""
    for name, v in (("interleaved", interleaved), ("pair_tables", pair_tables), ("conj", conj)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    if not pair_tables:
        return cos, sin
    _canon.check_float(names[0], cos)
    _canon.check_float(names[1], sin)
    if cos.dim() < 1 or cos.shape[-1] == 0 or cos.shape != sin.shape:
        raise ValueError(f"with pair_tables, {names[0]} and {names[1]} must be [..., R/2] of one shape, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    return cos, sin


def _k_tables(k, cos, cos_k, sin_k, interleaved, pair_tables, conj):
    """k's own tables ``(cos_k, sin_k)``, checked (both or neither, k given, float, cos's rotary
    dim; per-pair like cos/sin with ``pair_tables``), or None; the rest is checked against k with
    cos/sin's rules (``_validate``)."""
    if cos_k is None and sin_k is None:
        return None
    if cos_k is None or sin_k is None:
        raise ValueError(f"cos_k and sin_k must be given together, got only {'cos_k' if sin_k is None else 'sin_k'}")
    if k is None:
        raise ValueError("cos_k/sin_k rotate k, but k is None")
    _canon.check_float("cos_k", cos_k)
    _canon.check_float("sin_k", sin_k)
    if isinstance(cos, torch.Tensor) and min(cos.dim(), cos_k.dim()) >= 1 and cos_k.shape[-1] != cos.shape[-1]:
        raise ValueError(f"cos_k's rotary dim (last dim) must be cos's, {cos.shape[-1]}, got {cos_k.shape[-1]}")
    cos_k, sin_k = _tables(cos_k, sin_k, interleaved, pair_tables, conj, ("cos_k", "sin_k"))
    try:
        _canon.check_cos_sin(cos_k, sin_k)
    except ValueError as e:
        raise ValueError(f"cos_k/sin_k: {e}") from None
    return cos_k, sin_k


def _rotate(q, k, cos, sin, unsqueeze_dim, interleaved, conj, backend, index, k_tables=None,
            pair_tables=False, swap_layout=False) -> tuple:
    """The out-of-place functions: q (and k, may be None) rotated into new tensors; k with its own
    tables ``k_tables`` when given; ``pair_tables``: every table per pair ``[..., R/2]``;
    ``swap_layout`` (with per-pair tables, no ``k_tables``): outputs in the other pair layout
    (``Plan``), gradients wrt the tables then by the reference."""
    try:
        table_grads = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
        if pair_tables and table_grads and not swap_layout:
            # gradients wrt the tables: Rotary differentiates full-width ones (expanded differentiably)
            cos, sin, k_tables = full_width(cos, sin, k_tables, interleaved)
            pair_tables = False
        one_call = k_tables is None and not swap_layout  # (the one-call path takes neither)
        be = _one_call_backend(q, k, cos, sin, unsqueeze_dim, interleaved, backend, index) if one_call else None
        if be == "triton" and _records_grad(q, k, cos, sin):
            be = None  # (Rotary's backward replays or plans with the validated plan of the full path)
        if be is not None:  # the common call (eager, no torch.func): the C++ op validates, plans, launches
            # (on Triton: a launch recorded by an earlier, validated call of this geometry, or Declined)
            plan = Plan(unsqueeze_dim, interleaved, conj, be, pair_tables=pair_tables)
            try:
                if _records_grad(q, k, cos, sin):
                    return rotary(q, k, cos, sin, plan)
                return tuple(rotate(q, k, cos, sin, plan))
            except Declined:  # (anything it does not take: validated here, then the Python plan)
                pass
        idx, axes = _validate(q, k, cos, sin, unsqueeze_dim, interleaved, index, k_tables, pair_tables)
        be = _backend(q, cos, sin, backend, k_tables, pair_tables)  # (validates a requested backend either way)
        if swap_layout and table_grads:
            be = "reference"
        if pair_tables and be == "reference":  # (its PyTorch ops read full-width tables)
            cos, sin, k_tables = full_width(cos, sin, k_tables, interleaved)
            pair_tables = False
        if be == "reference":  # (PyTorch ops: autograd and transforms of their own)
            check_values(q, cos, unsqueeze_dim, idx)
            kw = reference_kwargs(idx)
            ck, sk = k_tables or (cos, sin)
            return tuple(rotary_reference_indexed(x, c, s, unsqueeze_dim, interleaved, conj, swap_layout, **kw)
                         for x, c, s in ((q, cos, sin), (k, ck, sk)) if x is not None)
        cos, sin, idx, axes = _plain_if_cos_grad(q, k, cos, sin, unsqueeze_dim, interleaved, idx, axes)
        return _run(q, k, cos, sin, Plan(unsqueeze_dim, interleaved, conj, be, idx, axes, True, k_tables, pair_tables,
                                         swap_layout))
    except Exception:  # (no kernel nor shape rule takes a sparse or nested tensor: name it)
        _canon.check_strided(**{"q" if k is not None else "x": q}, k=k, cos=cos, sin=sin, k_tables=k_tables)
        raise


def apply_rotary_transformers(q, k, cos, sin, unsqueeze_dim=1, *, interleaved=False, pair_tables=False, conj=False,
                              cos_k=None, sin_k=None, backend=None, **index):
    """Rotate q and k like transformers' ``apply_rotary_pos_emb``; returns ``(q_embed, k_embed)``.

    q: ``[B, Hq, S, D]`` (``unsqueeze_dim=1``) or ``[B, S, Hq, D]`` (``unsqueeze_dim=2``), any
    strides; k likewise with its own head count (GQA/MQA). cos/sin: ``[B, S, R]`` or
    ``[S, R]`` (with a matching ``unsqueeze_dim``), fp32 or any float dtype. Outputs have
    the inputs' dtypes and memory layouts. Math in fp32, rounded once.

    ``interleaved``: GPT-J pairs ``(2i, 2i + 1)`` instead of ``(i, i + R/2)``. ``pair_tables``:
    cos/sin hold one entry per pair, ``[..., R/2]`` (gpt-oss, flash-attn, vLLM). ``conj``: the
    transpose of the rotation, i.e. by ``-theta`` (nanochat's sign). ``cos_k``/``sin_k``: k's own
    tables (both or neither; cos's rules and rotary dim; flash-attn's ``apply_rotary_emb_qkv_``),
    q and k still in one launch. ``backend``: see ``available_backends``.
    """
    k_tables = None
    if cos_k is not None or sin_k is not None:  # (no call on the common path: host time)
        k_tables = _k_tables(k, cos, cos_k, sin_k, interleaved, pair_tables, conj)
    _canon.check_float("k", k)  # apply_rotary_emb rotates a single tensor
    cos, sin = _tables(cos, sin, interleaved, pair_tables, conj)
    q_out, k_out = _rotate(q, k, cos, sin, unsqueeze_dim, interleaved, conj, backend, index, k_tables, pair_tables)
    return q_out, k_out


def apply_rotary_emb(x, cos, sin, unsqueeze_dim=1, interleaved=False, *, pair_tables=False, conj=False,
                     backend=None, **index):
    """Rotate a single tensor (q-only layers such as Gemma3n/Gemma4 KV-shared layers); options
    as ``apply_rotary_transformers``."""
    cos, sin = _tables(cos, sin, interleaved, pair_tables, conj)
    return _rotate(x, None, cos, sin, unsqueeze_dim, interleaved, conj, backend, index, None, pair_tables)[0]


def check_mutable(**tensors) -> None:
    """Like torch's own in-place ops: an inference tensor is only updated inside inference mode.
    (Not while torch.compile traces, which cannot inspect it and functionalizes the update.)"""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.is_inference():
            raise RuntimeError(f"{name} is an inference tensor (made under torch.inference_mode()); updating it "
                               "in place outside inference mode is not allowed: clone() it first")


_CREATION = torch._C._autograd.CreationMeta
_NOT_REBASED = {  # views whose in-place update autograd refuses (torch's handle_view_on_rebase)
    _CREATION.NO_GRAD_MODE: "a view made in no_grad mode, and is being updated with grad mode enabled: make "
                            "the view and the update both inside no_grad, or both outside",
    _CREATION.MULTI_OUTPUT_NODE: "one of several views one function returned (unbind, split, chunk): rotate "
                                 "the tensor they view (e.g. apply_rotary_qkv_) or use the out-of-place function",
    _CREATION.IN_CUSTOM_FUNCTION: "a view made inside a custom autograd Function: use the out-of-place function",
    _CREATION.INFERENCE_MODE: "a view made in inference mode: clone() it first",
}


def check_autograd_inplace(**tensors) -> None:
    """What PyTorch's own in-place ops refuse in grad mode, refused before anything is written
    (autograd's own check runs after a Function's forward, the data rotated by then): a leaf
    that requires grad, a view of one, and views whose update autograd cannot record."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is None or not t.requires_grad:
            continue
        if t._is_view():
            why = _NOT_REBASED.get(torch._C._autograd._get_creation_meta(t))
            if why:
                raise RuntimeError(f"{name} is {why}")
            if t._base.is_leaf:
                raise RuntimeError(f"{name} is a view of a leaf tensor that requires grad, which in-place operations "
                                   "may not update (as PyTorch's own): rotate a clone, or use the out-of-place function")
        elif t.is_leaf:
            raise RuntimeError(f"{name} is a leaf tensor that requires grad, which in-place operations may not update "
                               "(as PyTorch's own): rotate a clone, or use the out-of-place function")


def _inplace(q, k, cos, sin, unsqueeze_dim, interleaved, pair_tables, conj, backend, index, k_tables=None):
    """The in-place functions; ``k_tables``: k's own (cos_k, sin_k) from ``_k_tables``, or None."""
    try:
        names = ("q", "k") if k is not None else ("x", "k")
        check_mutable(**{names[0]: q, "k": k})
        cos, sin = _tables(cos, sin, interleaved, pair_tables, conj)
        be = None if conj or k_tables is not None else _one_call_backend(q, k, cos, sin, unsqueeze_dim, interleaved,
                                                                         backend, index)
        if be is not None and not _records_grad(q, k, cos, sin):  # (with gradients: the full path, or its error)
            if be == "triton":  # a launch recorded by an earlier, validated call of this geometry
                done = rotate_inplace_replayed(q, k, cos, sin, Plan(unsqueeze_dim, interleaved, False, be,
                                                                    pair_tables=pair_tables))
            else:
                done = COMPILED.ops.rotary_transformers_(q, k, cos, sin, unsqueeze_dim, interleaved, pair_tables)
            if done:
                torch.autograd.graph.increment_version([t for t in (q, k) if t is not None])
                return
        idx, axes = _validate(q, k, cos, sin, unsqueeze_dim, interleaved, index, k_tables, pair_tables)
        cos_k, sin_k = k_tables or (None, None)
        if functional_transform() or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (cos, sin, cos_k, sin_k))):
            raise RuntimeError(
                "in-place rotation takes no gradients wrt cos/sin (cos_k/sin_k), nor forward-mode AD / torch.func "
                "transforms; use apply_rotary_transformers / apply_rotary_emb"
            )
        plan = Plan(unsqueeze_dim, interleaved, conj, _backend(q, cos, sin, backend, None, pair_tables), idx, axes,
                    True, k_tables, pair_tables)
        grad = _needs_graph(q, k)
        if torch.compiler.is_compiling():  # data pointers are not traceable: functional ops
            if grad:  # (copy_ records the in-place update for autograd)
                for x, y in zip((q, k), rotary(q, k, cos, sin, plan)):
                    x.copy_(y)
            else:
                rotate_inplace_op(q, k, cos, sin, *plan.op_args())
            return
        if grad:
            check_autograd_inplace(**{names[0]: q, "k": k})
        _canon.check_writes({names[0]: q, "k": k}, dict(cos=cos, sin=sin, positions=idx.positions,
                                                        cu_seqlens=idx.cu_seqlens, seqlen_offsets=idx.seqlen_offsets,
                                                        cos_k=cos_k, sin_k=sin_k))
        if grad:  # one launch per tensor: autograd lets a Function modify one view in place, not two
            RotaryInplace.apply(q, cos, sin, plan._replace(axes=(axes[0], None), k_tables=None))
            if k is not None:  # (k in q's place, with its own tables: their values are checked then)
                RotaryInplace.apply(k, *(k_tables or (cos, sin)),
                                    plan._replace(axes=(axes[1], None), check=k_tables is not None, k_tables=None))
            return
        launch_inplace(q, k, cos, sin, plan)
        torch.autograd.graph.increment_version([t for t in (q, k) if t is not None])
    except Exception:  # (a sparse or nested tensor, or a zero tensor to write: name it)
        _canon.check_strided(**{"q" if k is not None else "x": q}, k=k, cos=cos, sin=sin, k_tables=k_tables)
        _canon.check_writable(**{"q" if k is not None else "x": q}, k=k)
        raise


def apply_rotary_transformers_(q, k, cos, sin, unsqueeze_dim=1, *, interleaved=False, pair_tables=False, conj=False,
                               cos_k=None, sin_k=None, backend=None, **index):
    """In-place ``apply_rotary_transformers``: rotates q and k in place and returns them.
    q and k must not overlap in memory (each element is rotated once)."""
    k_tables = None
    if cos_k is not None or sin_k is not None:  # (no call on the common path: host time)
        k_tables = _k_tables(k, cos, cos_k, sin_k, interleaved, pair_tables, conj)
    _canon.check_float("k", k)  # apply_rotary_emb_ rotates a single tensor
    _inplace(q, k, cos, sin, unsqueeze_dim, interleaved, pair_tables, conj, backend, index, k_tables)
    return q, k


def apply_rotary_emb_(x, cos, sin, unsqueeze_dim=1, interleaved=False, *, pair_tables=False, conj=False,
                      backend=None, **index):
    """In-place ``apply_rotary_emb``: rotates x in place and returns it."""
    _inplace(x, None, cos, sin, unsqueeze_dim, interleaved, pair_tables, conj, backend, index)
    return x


for _f in (apply_rotary_transformers, apply_rotary_emb, apply_rotary_transformers_, apply_rotary_emb_):
    _f.__doc__ += _INDEX_DOC


def _split_qkv(qkv, num_q_heads, num_kv_heads):
    """q's and k's heads of a packed qkv: ``[B, S, Hq + 2 Hk, D]`` / ``[T, Hq + 2 Hk, D]``, or
    flash-attn's ``[B, S, 3, H, D]`` (head counts implied)."""
    _canon.check_float("qkv", qkv)
    try:
        if qkv.dim() == 5:
            h = qkv.shape[3]
            if qkv.shape[2] != 3 or num_q_heads not in (None, h) or num_kv_heads not in (None, h):
                raise ValueError(f"a 5-D qkv must be [B, S, 3, H, D] (head counts H), got shape {tuple(qkv.shape)} "
                                 f"with num_q_heads={num_q_heads}, num_kv_heads={num_kv_heads}")
            return qkv[:, :, 0], qkv[:, :, 1]
        if qkv.dim() not in (3, 4):
            raise ValueError("qkv must be [B, S, Hq + 2 Hk, D], [T, Hq + 2 Hk, D] or [B, S, 3, H, D], got shape "
                             f"{tuple(qkv.shape)}")
        for name, n in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        if qkv.shape[-2] != num_q_heads + 2 * num_kv_heads:
            raise ValueError(f"qkv has {qkv.shape[-2]} heads, expected num_q_heads + 2 * num_kv_heads = "
                             f"{num_q_heads + 2 * num_kv_heads}")
        return qkv[..., :num_q_heads, :], qkv[..., num_q_heads : num_q_heads + num_kv_heads, :]
    except Exception:  # (no kernel nor shape rule takes a sparse or nested tensor: name it)
        _canon.check_strided(qkv=qkv)
        raise


def apply_rotary_qkv(qkv, cos, sin, num_q_heads=None, num_kv_heads=None, *, interleaved=False, pair_tables=False, conj=False,
                     cos_k=None, sin_k=None, backend=None, **index):
    """Rotate the q and k heads of a packed projection output ``[B, S, Hq + 2 Hk, D]`` (heads in
    the order q, k, v; or packed tokens ``[T, Hq + 2 Hk, D]``; or flash-attn's
    ``[B, S, 3, H, D]``, head counts implied) in one launch; returns
    ``(q_embed, k_embed)``. Differentiable: gradients flow back into ``qkv`` (v's are untouched).
    cos/sin: ``[B, S, R]`` / ``[S, R]`` / ``[T, R]``, or caches with the token-position options;
    other options as ``apply_rotary_transformers``."""
    q, k = _split_qkv(qkv, num_q_heads, num_kv_heads)
    return apply_rotary_transformers(q, k, cos, sin, -2, interleaved=interleaved, pair_tables=pair_tables,
                                     conj=conj, cos_k=cos_k, sin_k=sin_k, backend=backend, **index)


def apply_rotary_qkv_(qkv, cos, sin, num_q_heads=None, num_kv_heads=None, *, interleaved=False, pair_tables=False, conj=False,
                      cos_k=None, sin_k=None, backend=None, **index):
    """In-place ``apply_rotary_qkv``: rotates q's and k's heads inside ``qkv`` (one launch, v
    untouched) and returns ``qkv``; differentiable like the other in-place functions."""
    q, k = _split_qkv(qkv, num_q_heads, num_kv_heads)
    _inplace(q, k, cos, sin, -2, interleaved, pair_tables, conj, backend, index,
             _k_tables(k, cos, cos_k, sin_k, interleaved, pair_tables, conj))
    return qkv


def _split_kv(kv):
    _canon.check_float("kv", kv)
    try:
        if kv.dim() != 5 or kv.shape[2] != 2:
            raise ValueError(f"kv must be [B, S, 2, H, D] (flash-attn's packed k and v), got shape {tuple(kv.shape)}")
        return kv[:, :, 0]
    except Exception:  # (no kernel nor shape rule takes a sparse or nested tensor: name it)
        _canon.check_strided(kv=kv)
        raise


def apply_rotary_kv(kv, cos, sin, *, interleaved=False, pair_tables=False, conj=False, backend=None, **index):
    """Rotate k of flash-attn's packed ``kv`` ``[B, S, 2, H, D]`` (v untouched); returns k_embed
    ``[B, S, H, D]``. Options as ``apply_rotary_transformers``; cos/sin ``[B, S, R]`` / ``[S, R]``."""
    return apply_rotary_emb(_split_kv(kv), cos, sin, -2, interleaved, pair_tables=pair_tables, conj=conj,
                            backend=backend, **index)


def apply_rotary_kv_(kv, cos, sin, *, interleaved=False, pair_tables=False, conj=False, backend=None, **index):
    """In-place ``apply_rotary_kv``: rotates k inside ``kv`` and returns ``kv``."""
    _inplace(_split_kv(kv), None, cos, sin, -2, interleaved, pair_tables, conj, backend, index)
    return kv


def apply_rotary(x1, x2, cos, sin, out1, out2, conj: bool = False, *, backend=None) -> None:
    """flash-attn / ``kernels-community/rotary`` elementwise rotation, written into out1/out2.

    ``out1 = x1 * cos - x2 * sin`` and ``out2 = x1 * sin + x2 * cos`` (sin negated when
    ``conj``), with cos/sin broadcast to x1's shape, math in fp32. ``out1``/``out2`` may be
    ``x1``/``x2`` themselves (in place) but must not otherwise overlap any argument.
    """
    for name, t in (("x1", x1), ("x2", x2), ("cos", cos), ("sin", sin)):
        _canon.check_float(name, t)
    try:
        if x2.shape != x1.shape or x2.dtype != x1.dtype:
            raise ValueError(f"x1 and x2 must have the same shape and dtype, got {tuple(x1.shape)} {x1.dtype} "
                             f"and {tuple(x2.shape)} {x2.dtype}")
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
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x1, x2, cos, sin, out1, out2)):
            raise RuntimeError("apply_rotary writes into out1/out2 and does not support autograd; "
                               "use apply_rotary_transformers or apply_rotary_emb for training")
        check_mutable(out1=out1, out2=out2)
        _canon.check_writes(dict(out1=out1, out2=out2), dict(x1=x1, x2=x2, cos=cos, sin=sin),
                            in_place_of=dict(out1="x1", out2="x2"))
        launch_elementwise(select_backend(x1.device, backend), x1, x2, cos, sin, out1, out2, bool(conj))
        torch.autograd.graph.increment_version((out1, out2))
    except Exception:  # (a sparse or nested tensor, or a zero tensor to write: name it)
        _canon.check_strided(x1=x1, x2=x2, cos=cos, sin=sin, out1=out1, out2=out2)
        _canon.check_writable(out1=out1, out2=out2)
        raise


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    return [b for b in BACKENDS if backend_available(b, device)[0]]
