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

import torch

from . import _canon
from ._index import NO_INDEX, canonical_positions, canonical_tables, check_values, kernel_views, reference_kwargs
from .reference import apply_rotary_reference, rotary_reference_indexed

BACKENDS = ("cuda", "triton", "cpu", "reference")


from . import _compiled

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


def backend_available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``, and why not."""
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        ops = COMPILED
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {device}"
        return (ops is not None), "the compiled extension is not built (pip install -e . --no-build-isolation)"
    if backend == "cuda":
        ops = COMPILED
        if device.type != "cuda" or torch.version.hip:
            return False, f"the cuda backend runs on NVIDIA CUDA tensors, got {device}"
        if not (ops is not None and ops.HAS_CUDA_EXT):
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
    the fastest available one. Cached per (device type, backend): availability does not change
    within a process (not while torch.compile traces: a cache filled then would cost a second graph)."""
    key = (device.type, device.index if device.type == "cuda" else None, backend)  # (GPUs may differ in arch)
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


class Declined(Exception):
    """rotate_new(validated=False): the one-call op did not take the arguments; validate them."""


def rotate_new(backend, q, k, cos, sin, unsqueeze_dim, interleaved, conj, idx=NO_INDEX, validated=True, cos_k=None,
               sin_k=None) -> list:
    """Rotate q (and k, may be None) into new tensors; returns ``[q_out]`` or ``[q_out, k_out]``.

    On the compiled backends the plain form goes through one C++ op (``rotary_transformers``
    in torch_binding.cpp: views, allocation and launch in one call); anything it does not take
    (token positions, k not fusable with q) is allocated here and goes through launch_rotary,
    which needs validated arguments (else ``Declined`` is raised). ``cos_k``/``sin_k``: k's own
    tables (launch_rotary).
    """
    if backend in ("cpu", "cuda") and idx.plain and cos_k is None:
        outs = COMPILED.ops.rotary_transformers(q, k, cos, sin, unsqueeze_dim, interleaved, conj)
        if outs:
            return outs
    if not validated:
        raise Declined
    outs = [torch.empty_like(q)] + ([torch.empty_like(k)] if k is not None else [])
    launch_rotary(backend, q, k, cos, sin, outs[0], outs[1] if k is not None else None, unsqueeze_dim,
                  interleaved, conj, idx, None, cos_k, sin_k)
    return outs


def _fusable(q4, k4) -> bool:
    return k4.shape[:2] == q4.shape[:2] and k4.shape[3] == q4.shape[3] and k4.dtype == q4.dtype


def launch_rotary(backend, q, k, cos, sin, q_out, k_out, unsqueeze_dim, interleaved, conj, idx=NO_INDEX,
                  views=None, cos_k=None, sin_k=None):
    """Rotate q (and k, may be None) into q_out/k_out; outputs may be the inputs (in place).

    Arguments are validated by the caller; ``idx``: the token-position options
    (``_index.TokenIndex``); ``views``: q's and k's kernel views (``_index.Views``) when the caller's
    validation built them. One launch for q and k, two when they cannot share one (different
    batch/sequence/head dim/dtype). ``cos_k``/``sin_k``: k's own tables (None: cos/sin); the
    kernels take them as a second table pair read for k's heads.
    """
    ck, sk = (cos, sin) if cos_k is None else (cos_k, sin_k)
    check_values(q, cos, unsqueeze_dim, idx)
    if cos_k is not None:
        check_values(k, cos_k, unsqueeze_dim, idx)
    if backend == "reference":
        for x, out, c, s in ((q, q_out, cos, sin), (k, k_out, ck, sk)):
            if x is not None:
                out.copy_(rotary_reference_indexed(x, c, s, unsqueeze_dim, interleaved, conj, **reference_kwargs(idx)))
        return
    v = views if views is not None else kernel_views(q, k, cos, unsqueeze_dim, idx)
    jobs = [(q, v.q4, _canon.canonical_view(q_out, v.q_axes), v.q_axes, cos, sin)]  # (x, x4, out4, axes, cos, sin)
    if k is not None:
        jobs.append((k, v.k4, _canon.canonical_view(k_out, v.k_axes), v.k_axes, ck, sk))
    if k is not None and _fusable(v.q4, v.k4):
        jobs = [jobs[0] + (v.k4, jobs[1][2], cos_k, sin_k)]
    else:
        jobs = [job + (None, None, None, None) for job in jobs]
    extra = (idx.offset, list(idx.mrope_section), idx.mrope_interleaved)
    for x, x4, o4, axes, c, s, k4, ko4, c_k, s_k in jobs:
        tables = (canonical_tables(c, x, axes, idx), canonical_tables(s, x, axes, idx),
                  *canonical_positions(x, axes, idx), *extra)
        k_tables = () if c_k is None else (canonical_tables(c_k, k, v.k_axes, idx),
                                           canonical_tables(s_k, k, v.k_axes, idx))
        if backend == "triton":
            TRITON.rotary_triton(x4, k4, *tables[:2], o4, ko4, interleaved, conj, *tables[2:], *k_tables)
        elif _canon.same_view(x4, o4) and (k4 is None or _canon.same_view(k4, ko4)):
            COMPILED.ops.rotary_inplace(x4, k4, *tables[:2], interleaved, conj, *tables[2:], *k_tables)
        else:
            COMPILED.ops.rotary(x4, k4, *tables[:2], o4, ko4, interleaved, conj, *tables[2:], *k_tables)


def launch_elementwise(backend, x1, x2, cos, sin, out1, out2, conj):
    """flash-attn's apply_rotary: cos/sin broadcast to x1; outs may alias x1/x2."""
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
