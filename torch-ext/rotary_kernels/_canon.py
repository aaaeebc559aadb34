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


def check_strided(k_tables=None, **tensors) -> None:
    """Dense tensors only: sparse, mkldnn or nested tensors have no strides to rotate along.
    The public functions ask it only once a call has failed (the failure re-raised where every
    tensor is dense), so that the common call pays nothing for it."""
    if torch.compiler.is_compiling():  # (fake tensors; and an untraceable check would hide the error)
        return
    if k_tables is not None:
        tensors.update(cos_k=k_tables[0], sin_k=k_tables[1])
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_nested:
            raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor: rotate its packed "
                            "values [T, H, D] instead (with cu_seqlens for per-sequence positions)")
        if isinstance(t, torch.Tensor) and t.layout is not torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got a {t.layout} tensor: call .to_dense() first")


def check_writable(**tensors) -> None:
    """An efficient zero tensor (forward-mode AD, functorch) has no memory to write, as PyTorch's
    own in-place ops say. (Asked, like check_strided, once a call has failed.)"""
    if torch.compiler.is_compiling():  # (dynamo cannot trace _is_zerotensor: it would hide the error)
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t._is_zerotensor():
            raise RuntimeError(f"{name} is an efficient zero tensor, which is immutable: clone() it first")


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
    if r == 0:
        raise ValueError("the rotary dim (cos.shape[-1]) must be positive, got 0")
    return r


def check_odd_rotary(r: int, interleaved: bool, index: dict, *xs) -> None:
    """An odd rotary dim is defined only as transformers' ``apply_rotary_pos_emb`` computes it
    (``rotate_half`` on the whole odd head dim): R == D, half-split, plain tables."""
    bad = [tuple(x.shape) for x in xs if x is not None and x.shape[-1] != r]
    if bad or interleaved or index:
        raise ValueError(
            f"the rotary dim (cos.shape[-1]) must be even, got {r}: an odd one is only defined, as transformers' "
            f"rotate_half computes it, when it equals the head dim (got shapes {bad or [tuple(x.shape) for x in xs if x is not None]}), "
            "half-split, without token-position options"
        )


def _memoized(fn):
    """The lru_cache'd shape function, or the plain one while torch.compile traces (dynamo
    traces through caches anyway, and warns about them)."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


def x_axes(name: str, x: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int):
    """Validate x against cos; returns ``axes``, the permutation to x's kernel view [A, S, H, D]
    (``canonical_view``), reused for cos/sin and outputs. The shape checks and the permutation
    depend on shapes only and are cached (decode calls the same shapes every step: Python time
    is most of a small call)."""
    check_float(name, x)
    return _memoized(_x_axes)(name, tuple(x.shape), tuple(cos.shape), unsqueeze_dim)


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
    """Apply x_axes's permutation to x or to a tensor shaped like it (an output)."""
    t = t.permute(axes[1])
    return t.unsqueeze(0) if t.dim() == 3 else t


def canonical_cs(t: torch.Tensor, x: torch.Tensor, axes) -> torch.Tensor:
    """cos or sin -> [A, S, R] view broadcast against x (zero strides, no copy)."""
    sizes, src = _memoized(_cs_plan)(tuple(t.shape), tuple(x.shape), axes)
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


# ---- Memory rules of the functions that write into tensors they are given ------------------
# (the in-place functions, apply_rotary's outs). A kernel reads and writes every element once,
# in an order the GPU does not fix, so a written tensor must not overlap itself (e.g. expand()),
# another written tensor, or any input other than the one it rotates in place (exactly the
# same view). Both tests below are exact: they solve "do two element offsets coincide" over the
# tensors' sizes and strides (a small bounded integer problem; strided views of one storage,
# such as the q and k heads of a packed qkv, are told apart exactly), not by comparing spans.

_SEARCH_BUDGET = 100_000  # nodes; only layouts no view of a contiguous tensor has get near it


def _solve(target: int, terms: list) -> bool | None:
    """Is ``target == sum(c * stride)`` for integers ``lo <= c <= hi``, over ``terms`` =
    [(stride, lo, hi)] with positive strides? None when the search exceeds its budget."""
    merged: dict = {}
    for st, lo, hi in terms:  # equal strides add their ranges
        a, b = merged.get(st, (0, 0))
        merged[st] = (a + lo, b + hi)
    dims = sorted(((st, lo, hi) for st, (lo, hi) in merged.items()), reverse=True)
    rest_lo, rest_hi = [0] * (len(dims) + 1), [0] * (len(dims) + 1)  # reach of dims[i:]
    for i in range(len(dims) - 1, -1, -1):
        st, lo, hi = dims[i]
        rest_lo[i], rest_hi[i] = rest_lo[i + 1] + lo * st, rest_hi[i + 1] + hi * st
    budget = [_SEARCH_BUDGET]

    def search(i: int, t: int) -> bool | None:
        if i == len(dims):
            return t == 0
        budget[0] -= 1
        if budget[0] < 0:
            return None
        st, lo, hi = dims[i]
        # c * st must leave a remainder dims[i + 1:] can reach
        c0, c1 = max(lo, -((rest_hi[i + 1] - t) // st)), min(hi, (t - rest_lo[i + 1]) // st)
        unknown = False
        for c in range(c0, c1 + 1):
            found = search(i + 1, t - c * st)
            if found:
                return True
            unknown |= found is None
        return None if unknown else False

    return search(0, target)


def _dims(t: torch.Tensor) -> list:
    return [(st, n) for n, st in zip(t.shape, t.stride()) if n != 1]


def internal_overlap(t: torch.Tensor) -> bool | None:
    """Do two elements of t share memory (expand(), as_strided)? None: not decidable cheaply."""
    dims = sorted(_dims(t))
    reach = 0  # largest offset difference the smaller-stride dims span
    for st, n in dims:
        if st <= reach:
            break
        reach += (n - 1) * st
    else:
        return False  # nested strides, as any permuted slice of a contiguous tensor has
    if any(st == 0 for st, _ in dims) or len({st for st, _ in dims}) < len(dims):
        return True
    # some c != 0 with sum(c * st) == 0; by symmetry its first nonzero entry, c[i], is positive
    for i, (st, n) in enumerate(dims):
        found = _solve(-st, [(st, 0, n - 2)] + [(s2, -(n2 - 1), n2 - 1) for s2, n2 in dims[i + 1:]])
        if found is not False:
            return found
    return False


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """Do a and b share a byte of memory? None: not decidable cheaply."""
    if a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    ea, eb = a.element_size(), b.element_size()
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + sum((n - 1) * st for st, n in _dims(a)) * ea + ea
    b1 = b0 + sum((n - 1) * st for st, n in _dims(b)) * eb + eb
    if a1 <= b0 or b1 <= a0:
        return False
    # a0 + sum(i * sa) + u == b0 + sum(j * sb) + v, i/j within the sizes, u/v within an element
    terms = ([(st * ea, -(n - 1), 0) for st, n in _dims(a) if st] + [(1, -(ea - 1), 0)] +
             [(st * eb, 0, n - 1) for st, n in _dims(b) if st] + [(1, 0, eb - 1)])
    return _solve(a0 - b0, terms)


def check_writes(written: dict, inputs: dict, in_place_of: dict | None = None) -> None:
    """The memory rules above, for ``written`` {name: tensor} (None entries skipped) against
    each other and ``inputs``; ``in_place_of`` {written name: input name} lets a written tensor
    be exactly that input (apply_rotary's ``out1 is x1``). Raises ValueError naming the arguments."""
    in_place_of = in_place_of or {}
    names = [n for n, t in written.items() if t is not None]
    for i, name in enumerate(names):
        w = written[name]
        if w.device.type == "meta":
            continue
        found = internal_overlap(w)
        if found is not False:
            raise ValueError(
                f"{name} {'has' if found else 'may have'} elements sharing memory (e.g. from expand()); "
                f"the kernels write each element once: pass {name}.clone() (or .contiguous())"
            )
        others = [(n, t, "an input") for n, t in inputs.items() if t is not None]
        others += [(n, written[n], "written too") for n in names[i + 1:]]
        for other, t, role in others:
            if in_place_of.get(name) == other and same_view(w, t):
                continue
            found = overlap(w, t)
            if found is not False:
                own = in_place_of.get(name) if role == "an input" else None
                raise ValueError(
                    f"{name} {'overlaps' if found else 'may overlap'} {other} ({role}) in memory; pass "
                    + (f"{own} itself for in place, or " if own else "") + "a separate tensor"
                )
