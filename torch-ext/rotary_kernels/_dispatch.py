"""Backend selection and the launchers every public function goes through.

Backends:
  ``"cuda"``      the compiled CUDA kernels (NVIDIA GPUs, when the extension was built with CUDA)
  ``"triton"``    the Triton kernels (any GPU Triton supports; on CPU only with TRITON_INTERPRET=1)
  ``"cpu"``       the compiled C++ CPU kernels
  ``"reference"`` the pure-PyTorch reference (any device)

Default order for a device: cuda > triton on GPUs, cpu > reference on CPU.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _canon, _compiled
from ._index import (NO_INDEX, TokenIndex, canonical_positions, canonical_tables, check_values, kernel_axes,
                     reference_kwargs)
from ._ops import add_op_namespace_prefix
from .reference import apply_rotary_reference, full_width_tables, rotary_reference_indexed

BACKENDS = ("cuda", "triton", "cpu", "reference")

# The compiled extension's ops (None when it was not built) and the Triton module (None when
# triton is missing or fails to import), fixed at import: torch.compile guards on such globals,
# so filling them lazily during a first trace would cost a second graph. (Triton reads
# TRITON_INTERPRET when the kernels are defined: set it before importing rotary_kernels.)
COMPILED = _compiled if _compiled.HAS_EXT else None
try:
    from . import _triton as TRITON
except Exception:  # ImportError, or triton failing to find a driver
    TRITON = None


def _interpret() -> bool:
    """The Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return TRITON is not None and TRITON._INTERPRET


def _device_present(device: torch.device) -> bool:
    """Whether this process has a ``device`` (a GPU type whose runtime reports one; CPU and meta
    always), so that asking about a GPU on a machine without one answers rather than raises."""
    module = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    return module is None or not hasattr(module, "is_available") or module.is_available()


def _not_loaded() -> str:
    """Why the compiled ops are missing: not built, or built but not loadable (another torch)."""
    return (f"the compiled extension is not available ({_compiled.IMPORT_ERROR}); build it: "
            "pip install -e . --no-build-isolation")


def backend_available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``, and why not."""
    if backend == "reference":
        return True, ""
    if backend in ("cuda", "triton") and not _device_present(device):
        return False, f"there is no {device.type} device here"
    if backend == "cpu":
        ops = COMPILED
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {device}"
        return (ops is not None), _not_loaded()
    if backend == "cuda":
        ops = COMPILED
        if device.type != "cuda" or torch.version.hip:
            return False, f"the cuda backend runs on NVIDIA CUDA tensors, got {device}"
        if ops is None:
            return False, _not_loaded()
        if not ops.HAS_CUDA_EXT:
            return False, "the extension was built without CUDA (needs nvcc and a CUDA build of torch)"
        if not _cuda_image_ok(device):
            cap = torch.cuda.get_device_capability(device)
            return False, (f"the compiled CUDA kernels have no image for this GPU (sm_{cap[0]}{cap[1]}); rebuild "
                           f"with ROTARY_KERNELS_CUDA_ARCHS including {cap[0]}.{cap[1]}")
        return True, ""
    if backend == "triton":
        if device.type == "cpu" and not _interpret():
            return False, "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        if TRITON is None:
            return False, "triton is not installed or failed to import"
        return True, ""
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


_IMAGE_OK: dict = {}  # CUDA device index -> whether the extension has a kernel image for it


def _cuda_image_ok(device: torch.device) -> bool:
    """The extension's ``cuda_image_ok`` op (rotary_cuda.cu: cudaFuncGetAttributes), once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _IMAGE_OK:
        try:
            op = COMPILED.ops.cuda_image_ok
        except AttributeError:  # a build without the op: assume it loads, as before
            _IMAGE_OK[index] = True
        else:
            _IMAGE_OK[index] = bool(op(index))
    return _IMAGE_OK[index]


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend to run on ``device``: ``backend`` if available there (else RuntimeError), or
    the fastest available one. Cached per (device, backend): availability does not change within a
    process (not while torch.compile traces: a cache filled then would cost a second graph). Keyed
    by the device itself (GPUs may differ in arch): reading its ``type`` builds a new string each
    time, which for a key of (type, index) cost ~0.5 us of a one-token call's ~11."""
    key = (device, backend)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        try:
            return _SELECTED[key]
        except (KeyError, TypeError):  # not chosen yet, or an unhashable backend argument
            pass
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    # meta tensors: shapes only, which the reference's PyTorch ops compute
    choice = "reference" if device.type == "meta" else _select_backend(device, backend)
    if not compiling:
        _SELECTED[key] = choice
    return choice


_SELECTED: dict = {}


def _select_backend(device: torch.device, backend: str | None) -> str:
    if backend is not None:
        ok, why = backend_available(backend, device)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available on {device}: {why}")
        return backend
    order = ("cpu", "triton", "reference") if device.type == "cpu" else ("cuda", "triton", "reference")
    for name in order:
        ok, why = backend_available(name, device)
        if ok:
            return name
        if name == "cuda" and "no image" in why:  # a GPU newer than the build: say so once, go on
            warnings.warn(f"rotary_kernels: {why}; using the next backend", RuntimeWarning, stacklevel=3)
    return "reference"  # unreachable: the reference is always available


class Plan(NamedTuple):
    """A validated call, built once by the public function and consumed by the launchers, the
    autograd Functions (forward and backward) and the custom ops.

    ``axes``: q's and k's permutations to their kernel views (``_index.kernel_axes``), or None on
    the one-call path, where the C++ op plans (plain cos/sin, compiled backend, eager).
    ``check``: run the data checks of the token-position options (``_index.check_values``):
    once per call, so not again in the backward. ``k_tables``: k's own ``(cos_k, sin_k)``
    (None: k reads cos/sin), a second table pair in the same launch. ``pair_tables``: every
    table holds one entry per rotary pair (last dim R/2), read so by the kernels (``full_width``
    expands them for the reference). ``swap_layout``: the outputs' pairs are in the other layout
    than ``interleaved`` (x's) says (``reference.py``; DeepSeek-V3's MLA rope): out of place, with
    per-pair tables and no ``k_tables``."""

    unsqueeze_dim: int
    interleaved: bool
    conj: bool
    backend: str
    idx: TokenIndex = NO_INDEX
    axes: Optional[tuple] = None
    check: bool = True
    k_tables: Optional[tuple] = None
    pair_tables: bool = False
    swap_layout: bool = False

    def flipped(self) -> "Plan":
        """The backward's plan: the transposed rotation, values already checked (with
        ``swap_layout``, read in the forward's output layout and written in its input's)."""
        return tuple.__new__(Plan, (self.unsqueeze_dim, self.interleaved != self.swap_layout, not self.conj,
                                    self.backend, self.idx, self.axes, False, self.k_tables, self.pair_tables,
                                    self.swap_layout))  # (tuple.__new__: no Python frame, on every backward)

    def op_args(self) -> tuple:
        """The custom ops' trailing arguments (the axes are recomputed inside)."""
        return (self.unsqueeze_dim, self.interleaved, self.conj, self.backend, self.check, *self.idx.op_args(),
                *(self.k_tables or (None, None)), self.pair_tables, self.swap_layout)

    @classmethod
    def from_op_args(cls, unsqueeze_dim, interleaved, conj, backend, check, *rest) -> "Plan":
        *index, cos_k, sin_k, pair_tables, swap_layout = rest
        return cls(unsqueeze_dim, interleaved, conj, backend, TokenIndex.from_op_args(*index), None, check,
                   None if cos_k is None else (cos_k, sin_k), pair_tables, swap_layout)


def full_width(cos, sin, k_tables, interleaved: bool):
    """Per-pair tables as full-width ones (``reference.full_width_tables``), k's own too:
    ``(cos, sin, k_tables)``. Where per-pair tables are expanded: only for the code that gathers
    or differentiates tables with PyTorch ops (the reference backend, gradients wrt the tables,
    torch.func transforms reaching them); the kernels read them as they are (``Plan.pair_tables``)."""
    k_tables = k_tables and tuple(full_width_tables(t, interleaved) for t in k_tables)
    return full_width_tables(cos, interleaved), full_width_tables(sin, interleaved), k_tables


class Declined(Exception):
    """The one-call C++ op did not take a call that Python has not validated (``Plan.axes``
    None): the public function validates it (its errors) and builds the Python plan."""


def rotate(q, k, cos, sin, plan: Plan) -> list:
    """Rotate q (and k, may be None) into new tensors; returns ``[q_out]`` or ``[q_out, k_out]``.

    While torch.compile traces: the functional custom op ``rotate`` (one opaque graph node). In
    eager mode, on the compiled backends without token positions: the C++ one-call op
    (``rotary_transformers``, torch_binding.cpp: views, allocation and launch in one dispatch); on
    Triton, a launch recorded for the call's geometry (``_TRITON_LAUNCHES``) is replayed; anything
    else is allocated here and launched by ``launch_rotary``. A plan without axes (the public
    functions' one-call path, not validated) is taken only by those two, else ``Declined``.
    """
    if plan.axes is not None and torch.compiler.is_compiling():  # (a plan without axes is eager: _api._rotate)
        return rotate_op(q, k, cos, sin, *plan.op_args())
    if (plan.backend in ("cpu", "cuda") and (plan.idx is NO_INDEX or plan.idx.plain) and plan.k_tables is None
            and not plan.swap_layout):
        outs = COMPILED.ops.rotary_transformers(q, k, cos, sin, plan.unsqueeze_dim, plan.interleaved, plan.conj,
                                                plan.pair_tables)
        if outs:
            return outs
    key = _triton_key(q, k, cos, sin, plan) if plan.backend == "triton" else None
    launch = _TRITON_LAUNCHES.get(key) if key is not None else None
    if launch is None and plan.axes is None:  # (not validated: only the op or a replay takes it)
        raise Declined
    outs = [torch.empty_like(q)] + ([torch.empty_like(k)] if k is not None else [])
    k_out = outs[1] if k is not None else None
    if launch is not None:
        TRITON.relaunch(launch, _plain_args(q, outs[0], k, k_out, cos, sin))
    else:
        launches = launch_rotary(q, k, cos, sin, outs[0], k_out, plan)
        if key is not None:
            _remember(key, launches, _plain_args(q, outs[0], k, k_out, cos, sin))
    return outs


# The Triton backend's launches for plain out-of-place calls, by the call's geometry (_triton_key),
# replayed on later calls of that geometry (rotate): the views, tables and kernel
# arguments that launch_rotary and rotary_triton derive from shapes and strides, computed once.
# A one-token call through the public function (fake driver, no GPU: benchmarks/
# triton_host_time.py) took ~51 us, of which Triton's own launch ~16; replayed ~25 (the public
# function's validation skipped too: _api._rotate), in place 62 -> 25, backward 88 -> 59. Only launches
# validated and planned by the full path are recorded, and only where the kernel read the call's
# own tensors (one launch: q and k fused; views at their data pointers).
_TRITON_LAUNCHES: dict = {}
_MAX_TRITON_LAUNCHES = 1024  # geometries kept (then the memo starts over)


def _triton_key(q, k, cos, sin, plan: Plan, inplace: bool = False):
    """The memo key of a plain call (no token positions, k's own tables or swap_layout; not
    while tracing), or None: every tensor's device, shape, strides and dtype (what the full
    path's validation read), the plan's options. Out of place, outputs come from ``empty_like``
    of q and k: their strides follow."""
    if not plan.idx.plain or plan.k_tables is not None or plan.swap_layout or torch.compiler.is_compiling():
        return None
    if _unresolved(q, k, cos, sin):  # (launch_rotary resolves them: not recorded, not replayed)
        return None
    return (inplace, q.device, q.shape, q.stride(), q.dtype,
            None if k is None else (k.device, k.shape, k.stride(), k.dtype),
            cos.device, cos.shape, cos.stride(), cos.dtype, sin.device, sin.shape, sin.stride(), sin.dtype,
            plan.unsqueeze_dim, plan.interleaved, plan.conj, plan.pair_tables)


def _plain_args(q, q_out, k, k_out, cos, sin) -> tuple:
    """The kernel's tensor arguments (``_triton.QKLaunch.tensors``) of a plain call: cos/sin in
    k's table slots too, no token positions."""
    return (q, q_out, k, k_out, cos, sin, cos, sin, None, None, None)


def rotate_inplace_replayed(q, k, cos, sin, plan: Plan) -> bool:
    """q and k rotated in place by a recorded launch (``launch_inplace``), True; False when none
    is recorded for their geometry or they share a storage with each other or cos/sin (whose
    overlap only the full path's exact test decides; the rest of what it checked follows from the
    geometry: writes that do not overlap themselves)."""
    key = _triton_key(q, k, cos, sin, plan, inplace=True)
    launch = _TRITON_LAUNCHES.get(key) if key is not None else None
    if launch is None:
        return False
    written = [q.untyped_storage().data_ptr()] + ([k.untyped_storage().data_ptr()] if k is not None else [])
    read = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    if len(set(written)) != len(written) or read.intersection(written):
        return False
    TRITON.relaunch(launch, _plain_args(q, q, k, k, cos, sin))
    return True


def launch_inplace(q, k, cos, sin, plan: Plan) -> None:
    """``launch_rotary`` in place (validated, writes checked), its Triton launch recorded for
    ``rotate_inplace_replayed``."""
    launches = launch_rotary(q, k, cos, sin, q, k, plan)
    key = _triton_key(q, k, cos, sin, plan, inplace=True) if plan.backend == "triton" else None
    if key is not None:
        _remember(key, launches, _plain_args(q, q, k, k, cos, sin))


def _remember(key, launches, args) -> None:
    """Record ``launches`` for ``key`` when they are one launch that read the call's own tensors,
    ``args`` (``_plain_args``): the same data pointers and dtypes (views at the tensors' starts)."""
    if len(launches) != 1 or launches[0] is None:
        return
    launch = launches[0]
    for got, t in zip(launch.tensors, args):
        if (got is None) != (t is None):
            return
        if t is not None and (got.data_ptr() != t.data_ptr() or got.dtype != t.dtype):
            return
    if len(_TRITON_LAUNCHES) >= _MAX_TRITON_LAUNCHES:
        _TRITON_LAUNCHES.clear()
    _TRITON_LAUNCHES[key] = launch._replace(tensors=())  # (not the tensors themselves: no memory kept)


@torch.library.custom_op(add_op_namespace_prefix("rotate"), mutates_args=())
def rotate_op(
    q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor,
    unsqueeze_dim: int, interleaved: bool, conj: bool, backend: str, check: bool,
    positions: Optional[Tensor], cu_seqlens: Optional[Tensor], seqlen_offsets: Optional[Tensor],
    offset: int, mrope_section: list[int], mrope_interleaved: bool, cached: bool,
    cos_k: Optional[Tensor], sin_k: Optional[Tensor], pair_tables: bool, swap_layout: bool,
) -> list[Tensor]:
    """``rotate`` as torch.compile records it (the autograd Functions call it while tracing)."""
    plan = Plan.from_op_args(unsqueeze_dim, interleaved, conj, backend, check, positions, cu_seqlens,
                             seqlen_offsets, offset, mrope_section, mrope_interleaved, cached, cos_k, sin_k,
                             pair_tables, swap_layout)
    outs = [torch.empty_like(q)] + ([torch.empty_like(k)] if k is not None else [])
    launch_rotary(q, k, cos, sin, outs[0], outs[1] if k is not None else None, plan)
    return outs


@rotate_op.register_fake
def _(q, k, *args):
    return [torch.empty_like(q)] + ([torch.empty_like(k)] if k is not None else [])


@torch.library.custom_op(add_op_namespace_prefix("rotate_"), mutates_args=("q", "k"))
def rotate_inplace_op(
    q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor,
    unsqueeze_dim: int, interleaved: bool, conj: bool, backend: str, check: bool,
    positions: Optional[Tensor], cu_seqlens: Optional[Tensor], seqlen_offsets: Optional[Tensor],
    offset: int, mrope_section: list[int], mrope_interleaved: bool, cached: bool,
    cos_k: Optional[Tensor], sin_k: Optional[Tensor], pair_tables: bool, swap_layout: bool,
) -> None:
    """In-place rotation as torch.compile records it without autograd (data pointers are not
    traceable; with autograd the public functions ``copy_`` the functional result instead)."""
    plan = Plan.from_op_args(unsqueeze_dim, interleaved, conj, backend, check, positions, cu_seqlens,
                             seqlen_offsets, offset, mrope_section, mrope_interleaved, cached, cos_k, sin_k,
                             pair_tables, swap_layout)
    launch_rotary(q, k, cos, sin, q, k, plan)


@rotate_inplace_op.register_fake
def _(q, k, *args):
    return None


def _fusable(q4, k4) -> bool:
    return k4.shape[:2] == q4.shape[:2] and k4.shape[3] == q4.shape[3] and k4.dtype == q4.dtype


def launch_rotary(q, k, cos, sin, q_out, k_out, plan: Plan):
    """Rotate q (and k, may be None) into q_out/k_out; outputs may be the inputs (in place).

    Arguments are validated (``plan``); the kernel views of q, k and the outputs are one
    ``as_strided`` each from ``plan.axes`` (recomputed, from a cache, when the plan has none).
    One launch for q and k, two when they cannot share one (different batch/sequence/head
    dim/dtype); with ``plan.k_tables`` the kernels read k's heads from the second table pair;
    with ``plan.swap_layout`` the outputs' pairs are in the other layout (not in place).
    Returns the Triton backend's launches (``_triton.QKLaunch``; none for the other backends).
    """
    launches = []
    if plan.backend != "reference" and _unresolved(q, k, cos, sin, *(plan.k_tables or ()), q_out, k_out):
        _launch_resolved(q, k, cos, sin, q_out, k_out, plan)
        return launches
    if plan.backend == "reference" and plan.pair_tables:
        cos, sin, k_tables = full_width(cos, sin, plan.k_tables, plan.interleaved)
        plan = plan._replace(k_tables=k_tables, pair_tables=False)
    backend, unsqueeze_dim, interleaved, conj, idx = plan.backend, plan.unsqueeze_dim, plan.interleaved, plan.conj, plan.idx
    ck, sk = plan.k_tables or (cos, sin)  # k's tables
    if plan.check:
        check_values(q, cos, unsqueeze_dim, idx)
        if plan.k_tables is not None:
            check_values(k, ck, unsqueeze_dim, idx)
    if backend == "reference":
        for x, out, c, s in ((q, q_out, cos, sin), (k, k_out, ck, sk)):
            if x is not None:
                out.copy_(rotary_reference_indexed(x, c, s, unsqueeze_dim, interleaved, conj, plan.swap_layout,
                                                   **reference_kwargs(idx)))
        return launches
    q_axes, k_axes = plan.axes if plan.axes is not None else kernel_axes(q, k, cos, unsqueeze_dim, idx)
    q4, qo4 = _canon.canonical_view(q, q_axes), _canon.canonical_view(q_out, q_axes)
    jobs = [(q, q4, qo4, q_axes, cos, sin, None)]  # (x, x4, out4, axes, cos, sin, k's job): one launch each
    if k is not None:
        k_job = (k, _canon.canonical_view(k, k_axes), _canon.canonical_view(k_out, k_axes), k_axes, ck, sk, None)
        jobs = [jobs[0][:6] + (k_job,)] if _fusable(q4, k_job[1]) else jobs + [k_job]
    extra = (idx.offset, list(idx.mrope_section), idx.mrope_interleaved)
    for x, x4, o4, axes, c, s, k_job in jobs:
        tables = (canonical_tables(c, x, axes, idx), canonical_tables(s, x, axes, idx),
                  *canonical_positions(x, axes, idx), *extra)
        k4 = ko4 = None
        k_tables = ()
        if k_job is not None:
            k4, ko4 = k_job[1], k_job[2]
            if plan.k_tables is not None:  # (read with k's own views of them)
                k_tables = (canonical_tables(ck, k, k_axes, idx), canonical_tables(sk, k, k_axes, idx))
        k_tables = k_tables or (None, None)
        if backend == "triton":
            launches.append(TRITON.rotary_triton(x4, k4, *tables[:2], o4, ko4, interleaved, conj, *tables[2:],
                                                 *k_tables, plan.pair_tables, plan.swap_layout))
        elif _canon.same_view(x4, o4) and (k4 is None or _canon.same_view(k4, ko4)):
            COMPILED.ops.rotary_inplace(x4, k4, *tables[:2], interleaved, conj, *tables[2:], *k_tables,
                                        plan.pair_tables, plan.swap_layout)
        else:
            COMPILED.ops.rotary(x4, k4, *tables[:2], o4, ko4, interleaved, conj, *tables[2:], *k_tables,
                                plan.pair_tables, plan.swap_layout)
    return launches


def _unresolved(*tensors) -> bool:
    """Is any of ``tensors`` a tensor whose memory does not hold its values: a negative view
    (``z.conj().imag``, ``torch._neg_view``: the values' negatives) or an efficient zero tensor
    (no memory; forward-mode AD, functorch)? PyTorch's ops resolve them; the kernels read memory
    as it is (Triton: a zero tensor's null pointer), so they never see one (``_resolved``,
    ``_launch_resolved``; the compiled one-call ops decline negative views)."""
    for t in tensors:  # (a loop, not any() over a generator: ~0.4 us a call less, on Triton's replay path)
        if t is not None and (t.is_neg() or t._is_zerotensor()):
            return True
    return False


def _resolved(t):
    """t's values in memory of their own (``_unresolved``), or t itself."""
    if t is None:
        return None
    return t.clone() if t._is_zerotensor() else t.resolve_neg()


def _launch_resolved(q, k, cos, sin, q_out, k_out, plan: Plan) -> None:
    """``launch_rotary`` for unresolved tensors (``_unresolved``): the inputs resolved, the results
    written through ``copy_`` (which stores a negative view's negatives, and refuses to write a
    zero tensor)."""
    q2, k2 = _resolved(q), _resolved(k)
    q3, k3 = torch.empty_like(q2), (torch.empty_like(k2) if k is not None else None)
    k_tables = tuple(_resolved(t) for t in plan.k_tables) if plan.k_tables is not None else None
    launch_rotary(q2, k2, _resolved(cos), _resolved(sin), q3, k3, plan._replace(k_tables=k_tables))
    q_out.copy_(q3)
    if k is not None:
        k_out.copy_(k3)


def launch_elementwise(backend, x1, x2, cos, sin, out1, out2, conj):
    """flash-attn's apply_rotary: cos/sin broadcast to x1; outs may alias x1/x2."""
    if backend != "reference" and _unresolved(x1, x2, cos, sin, out1, out2):  # (see _unresolved)
        x1, x2 = _resolved(x1), _resolved(x2)
        y1, y2 = torch.empty_like(x1), torch.empty_like(x2)
        launch_elementwise(backend, x1, x2, _resolved(cos), _resolved(sin), y1, y2, conj)
        out1.copy_(y1)
        out2.copy_(y2)
        return
    if backend == "reference" or x1.dim() > 4:
        y1, y2 = apply_rotary_reference(x1, x2, cos.expand_as(x1), sin.expand_as(x1), conj)
        out1.copy_(y1)
        out2.copy_(y2)
        return
    if backend == "triton":
        def as4(t):
            t = t.expand_as(x1)
            return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t

        TRITON.apply_rotary_triton(
            as4(x1), as4(x2), as4(cos), as4(sin), as4(out1), as4(out2), conj
        )
        return
    COMPILED.ops.apply_rotary(x1, x2, cos, sin, out1, out2, conj)
