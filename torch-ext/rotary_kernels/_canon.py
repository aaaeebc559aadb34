"""Input validation and the canonical view every kernel backend consumes.

Public entry points validate here (clear ``TypeError``/``ValueError`` naming the
argument), then hand the kernels *views* (never copies):

* ``x``   -> ``[A, S, H, D]``: H is the axis cos/sin broadcast over (the one
  ``unsqueeze_dim`` inserts), A and S are the two other leading axes in order
  (A = 1 for 3-D inputs);
* ``cos`` -> ``[A, S, R]`` with zero strides where it broadcasts.
"""

from __future__ import annotations

import functools

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")


def check_cos_sin(cos, sin) -> int:
    """Validate cos/sin; returns the rotary dim R."""
    check_float("cos", cos)
    check_float("sin", sin)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != sin.dtype:
        raise ValueError(f"cos and sin must have the same dtype, got {cos.dtype} and {sin.dtype}")
    if cos.dim() < 1:
        raise ValueError("cos and sin must have at least one dimension (the rotary dim)")
    r = cos.shape[-1]
    if r == 0 or r % 2:
        raise ValueError(f"the rotary dim (cos.shape[-1]) must be even and positive, got {r}")
    return r


def _cached(fn):
    """The lru_cache'd shape function, or the plain one while torch.compile traces (dynamo
    traces through caches anyway, and warns about them)."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


def canonical_x(name: str, x: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int):
    """Return (x4 [A,S,H,D] view, axes) after validating x against cos.

    ``axes`` is the permutation applied, reused to canonicalise cos/sin and outputs. The
    shape checks and the permutation depend on shapes only and are cached (decode calls the
    same shapes every step: Python time is most of a small call).
    """
    check_float(name, x)
    axes = _cached(_x_axes)(name, tuple(x.shape), tuple(cos.shape), unsqueeze_dim)
    return canonical_view(x, axes), axes


@functools.lru_cache(maxsize=1024)
def _x_axes(name: str, x_shape: tuple, cos_shape: tuple, unsqueeze_dim: int):
    x_dim = len(x_shape)
    if x_dim not in (3, 4):
        raise ValueError(f"{name} must be 3-D or 4-D (e.g. [B, H, S, D] or [B, S, H, D]), got shape {x_shape}")
    r = cos_shape[-1]
    if r > x_shape[-1]:
        raise ValueError(f"rotary dim {r} (cos.shape[-1]) is larger than {name}'s head dim {x_shape[-1]}")
    nd_cos = len(cos_shape) + 1
    if not -nd_cos <= unsqueeze_dim < nd_cos:
        raise ValueError(f"unsqueeze_dim={unsqueeze_dim} is out of range for cos of shape {cos_shape}")
    if nd_cos > x_dim:
        raise ValueError(
            f"cos.unsqueeze({unsqueeze_dim}) has {nd_cos} dims, more than {name} ({x_dim} dims, shape {x_shape})"
        )
    head_axis = (unsqueeze_dim % nd_cos) + (x_dim - nd_cos)
    if head_axis == x_dim - 1:
        raise ValueError(f"unsqueeze_dim={unsqueeze_dim} would broadcast cos over the head dim of {name}")
    cos_u_lead = list(cos_shape[:-1])
    cos_u_lead.insert(unsqueeze_dim % nd_cos, 1)
    lead = list(x_shape[:-1])
    padded = [1] * (len(lead) - len(cos_u_lead)) + cos_u_lead
    if any(c not in (1, n) for c, n in zip(padded, lead)):
        raise ValueError(
            f"cos/sin of shape {cos_shape} unsqueezed at dim {unsqueeze_dim} do not broadcast to "
            f"{name}'s shape {x_shape}"
        )
    others = [i for i in range(x_dim - 1) if i != head_axis]
    return (unsqueeze_dim, tuple(others + [head_axis, x_dim - 1]))


def canonical_view(t: torch.Tensor, axes) -> torch.Tensor:
    """Apply canonical_x's permutation to x or to a tensor shaped like it (an output)."""
    t = t.permute(axes[1])
    return t.unsqueeze(0) if t.dim() == 3 else t


def canonical_cs(t: torch.Tensor, x: torch.Tensor, axes) -> torch.Tensor:
    """cos or sin -> [A, S, R] view broadcast against x (zero strides, no copy)."""
    sizes, src = _cached(_cs_plan)(tuple(t.shape), tuple(x.shape), axes)
    st = t.stride()
    return t.as_strided(sizes, [st[d] if d is not None else 0 for d in src], t.storage_offset())


@functools.lru_cache(maxsize=1024)
def _cs_plan(t_shape: tuple, x_shape: tuple, axes):
    """Sizes of the canonical [A, S, R] view of a cos/sin of shape t_shape, and for each of its
    dims the dim of t it walks (None: broadcast, stride 0)."""
    unsqueeze_dim, perm = axes
    # t.unsqueeze(unsqueeze_dim), right-aligned against x's leading dims + [R]
    u_dims = list(range(len(t_shape)))
    u_dims.insert(unsqueeze_dim % (len(t_shape) + 1), None)
    u_shape = [t_shape[d] if d is not None else 1 for d in u_dims]
    full = list(x_shape[:-1]) + [t_shape[-1]]
    pad = len(full) - len(u_dims)
    src_full = [None] * pad + [d if (d is not None and u_shape[i] != 1) else None for i, d in enumerate(u_dims)]
    picked = [src_full[p] for p in perm]  # permuted like x: [others..., head, last]
    sizes = [full[p] for p in perm]
    sizes, picked = sizes[:-2] + sizes[-1:], picked[:-2] + picked[-1:]  # drop the head axis
    if len(sizes) == 2:
        sizes, picked = [1] + sizes, [None] + picked
    return tuple(sizes), tuple(picked)


def check_out(name: str, out, like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must match its input: expected {tuple(like.shape)} {like.dtype} on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape


def check_no_partial_overlap(name: str, out: torch.Tensor, *inputs: torch.Tensor) -> None:
    """``out`` may be exactly an input (in place) but must not partly overlap one.

    Like ATen's own check, this is exact for dense tensors (whose memory span is all
    theirs) and gives up on strided views whose spans interleave.
    """
    for t in inputs:
        if t is None or same_view(out, t) or out.numel() == 0 or t.numel() == 0:
            continue
        if out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            continue
        if not (_dense(out) and _dense(t)):
            continue
        (a0, a1), (b0, b1) = _span(out), _span(t)
        if a0 < b1 and b0 < a1:
            raise ValueError(
                f"{name} partially overlaps an input; pass the input itself for in place, or a separate tensor"
            )


def _dense(t: torch.Tensor) -> bool:
    """Does t cover its memory span exactly (a permutation of a contiguous tensor)?"""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t: torch.Tensor):
    lo = t.data_ptr()
    return lo, lo + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
