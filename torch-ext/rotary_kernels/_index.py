"""Token-position options (cos/sin cache + positions, varlen ``cu_seqlens``, ``seqlen_offsets``,
multimodal RoPE): validation, and the canonical tensors the kernels read.

Semantics: ``reference.py`` ("Token positions"). The kernels compute each token's cos/sin row
themselves, so nothing of size ``tokens x R`` is materialised:

* ``positions``      -> int64 ``[X, A, S]`` view (X = 3 for mrope positions, else 1)
* ``cu_seqlens``     -> int64 ``[n + 1]``; a token's sequence is found by binary search
* ``seqlen_offsets`` -> an int (``offset``) or an int64 ``[n]`` tensor, one entry per sequence
* cos/sin            -> ``[P, R]`` tables in cache mode; ``[3, A, S, R]`` views for mrope
  without positions; else ``[A, S, R]`` as before (``_canon.py``)
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from . import _canon
from .reference import check_cu_seqlens, check_positions, check_span, token_positions, token_shape

INT_DTYPES = (torch.int32, torch.int64)


class TokenIndex(NamedTuple):
    """In the order of the custom ops' trailing arguments (``_autograd.py``)."""

    positions: Optional[torch.Tensor] = None  # int, token shape (or [3, ...] for mrope)
    cu_seqlens: Optional[torch.Tensor] = None  # int, [n + 1]
    seqlen_offsets: Optional[torch.Tensor] = None  # int, [n]
    offset: int = 0  # added to every position
    mrope_section: tuple = ()  # () or (t, h, w) in rotary pairs
    mrope_interleaved: bool = False
    cached: bool = False  # cos/sin are [P, R] tables read at each token's position

    @property
    def plain(self) -> bool:
        return not self.cached and not self.mrope_section

    def op_args(self) -> tuple:
        """The trailing arguments of the custom ops (mrope_section as the list they take)."""
        return (*self[:4], list(self.mrope_section), *self[5:])

    @classmethod
    def from_op_args(cls, *args) -> "TokenIndex":
        positions, cu_seqlens, seqlen_offsets, offset, mrope_section, mrope_interleaved, cached = args
        return cls(positions, cu_seqlens, seqlen_offsets, offset, tuple(mrope_section), mrope_interleaved, cached)


NO_INDEX = TokenIndex()


def checks_enabled(*tensors) -> bool:
    """Data-dependent checks (value ranges) cost a device sync on GPUs: always on CPU tensors,
    on GPUs only with ROTARY_KERNELS_CHECK=1; never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    if all(t.device.type == "cpu" for t in tensors if t is not None):
        return True
    return os.environ.get("ROTARY_KERNELS_CHECK", "0") not in ("", "0")


def _check_int(name, t, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {t.device}")


def make_index(x, cos, unsqueeze_dim, positions=None, cu_seqlens=None, max_seqlen=None, seqlen_offsets=None,
               mrope_section=None, mrope_interleaved=False) -> TokenIndex:
    """Validate the options against x (q) and cos; returns the TokenIndex the launchers take."""
    del max_seqlen  # flash-attn API compatibility: not needed (one program per token)
    cached = positions is not None or cu_seqlens is not None or seqlen_offsets is not None
    if not isinstance(mrope_interleaved, bool):
        raise TypeError(f"mrope_interleaved must be a bool, got {type(mrope_interleaved).__name__}")
    if mrope_interleaved and mrope_section is None:
        raise ValueError("mrope_interleaved=True needs mrope_section")
    section = ()
    if mrope_section is not None:
        try:
            section = tuple(mrope_section)
        except TypeError:
            raise ValueError(f"mrope_section must be three non-negative ints (t, h, w), got {mrope_section!r}") from None
        if len(section) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in section):
            raise ValueError(f"mrope_section must be three non-negative ints (t, h, w), got {mrope_section!r}")
        if sum(section) != cos.shape[-1] // 2:
            raise ValueError(
                f"mrope_section {section} must sum to the number of rotary pairs, cos.shape[-1] // 2 = {cos.shape[-1] // 2}"
            )
    if not cached:
        if section and (cos.dim() < 2 or cos.shape[0] != 3):
            raise ValueError(f"with mrope_section, cos/sin must be [3, ..., R] (one table per axis), got {tuple(cos.shape)}")
        return TokenIndex(mrope_section=section, mrope_interleaved=mrope_interleaved)

    if cos.dim() != 2:
        raise ValueError(
            f"with positions, cu_seqlens or seqlen_offsets, cos/sin must be [max_pos, R] caches, got {tuple(cos.shape)}"
        )
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 3-D or 4-D, got shape {tuple(x.shape)}")
    lead = token_shape(x, unsqueeze_dim)
    n_seqs = lead[0] if len(lead) == 2 else 1
    if cu_seqlens is not None:
        _check_int("cu_seqlens", cu_seqlens, x.device)
        if x.dim() != 3:
            raise ValueError(f"cu_seqlens needs packed tokens x [T, H, D], got shape {tuple(x.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")
        n_seqs = cu_seqlens.numel() - 1
    if positions is not None:
        _check_int("positions", positions, x.device)
        tok = positions
        if section:
            if positions.dim() < 1 or positions.shape[0] != 3:
                raise ValueError(f"with mrope_section, positions must be [3, ...] (one per axis), got {tuple(positions.shape)}")
            tok = positions[0]
        try:  # positions lie where cos's leading dims would: validate them the same way
            _canon.x_axes("x", x, tok.unsqueeze(-1), unsqueeze_dim)
        except ValueError:
            want = [3, *lead] if section else list(lead)
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} do not match x's tokens: pass shape {want} (they broadcast "
                f"as transformers' position_ids do: their cos/sin rows unsqueezed at dim {unsqueeze_dim} against x's "
                f"shape {tuple(x.shape)})"
            ) from None
    offset, offsets = 0, None
    if isinstance(seqlen_offsets, torch.Tensor):
        _check_int("seqlen_offsets", seqlen_offsets, x.device)
        if seqlen_offsets.dim() != 1 or seqlen_offsets.shape[0] not in (1, n_seqs):
            raise ValueError(
                f"seqlen_offsets must be an int or a 1-D tensor with one entry per sequence ({n_seqs}), "
                f"got shape {tuple(seqlen_offsets.shape)}"
            )
        offsets = seqlen_offsets.expand(n_seqs)
    elif seqlen_offsets is not None:
        if not isinstance(seqlen_offsets, int) or isinstance(seqlen_offsets, bool):
            raise TypeError(f"seqlen_offsets must be an int or an int tensor, got {type(seqlen_offsets).__name__}")
        if not -(2**63) <= seqlen_offsets < 2**63:
            raise ValueError(f"seqlen_offsets={seqlen_offsets} does not fit in int64")
        offset = seqlen_offsets
    if cos.shape[0] == 0:
        raise ValueError("the cos/sin cache is empty (0 rows)")
    return TokenIndex(positions, cu_seqlens, offsets, offset, section, mrope_interleaved, cached=True)


def check_values(x, cos, unsqueeze_dim, idx: TokenIndex) -> None:
    """The data-dependent checks of the token-position options: ``cu_seqlens`` rises from 0 to
    the number of tokens, every position lies in the cache (reference.check_positions). Called
    where the kernels launch, so they also run inside torch.compile'd and exported programs
    (whose tracing skips them); ``checks_enabled`` says on which devices."""
    if not idx.cached or not checks_enabled(x, idx.positions, idx.cu_seqlens, idx.seqlen_offsets):
        return
    if idx.cu_seqlens is not None:
        check_cu_seqlens(idx.cu_seqlens, token_shape(x, unsqueeze_dim)[-1])
    if idx.positions is None and idx.cu_seqlens is None and idx.seqlen_offsets is None:
        tokens = token_shape(x, unsqueeze_dim)[-1]  # positions offset .. offset + tokens - 1: no tensor
        if tokens and x.device.type != "meta":
            check_span(idx.offset, idx.offset + tokens - 1, cos.shape[0])
        return
    pos = token_positions(x, unsqueeze_dim, idx.positions, idx.cu_seqlens, idx.seqlen_offsets)
    check_positions(pos + idx.offset if idx.offset else pos, cos.shape[0])


def reference_kwargs(idx: TokenIndex) -> dict:
    """The TokenIndex as keyword arguments of reference.rotary_reference_indexed."""
    if idx.plain:
        return {}
    off = idx.seqlen_offsets
    if idx.offset:
        off = idx.offset if off is None else off + idx.offset
    elif off is None and idx.cached:
        off = 0
    return dict(positions=idx.positions, cu_seqlens=idx.cu_seqlens, seqlen_offsets=off,
                mrope_section=idx.mrope_section or None, mrope_interleaved=idx.mrope_interleaved)


def template(x, cos, unsqueeze_dim, idx: TokenIndex) -> torch.Tensor:
    """A tensor shaped like a plain-mode cos for x: what x_axes validates x against (a cache's
    rotary dim included: a cache wider than x's head dim was read past x's rows)."""
    if not idx.cached:
        return cos[0] if idx.mrope_section else cos
    r = cos.shape[-1]
    if idx.positions is not None:
        p = idx.positions[0] if idx.mrope_section else idx.positions
        return p.unsqueeze(-1).expand(*p.shape, r)
    return torch.empty(token_shape(x, unsqueeze_dim) + [r], device="meta")


def kernel_axes(q, k, cos, unsqueeze_dim, idx: TokenIndex) -> tuple:
    """Validate q (and k) against cos and the index; the permutations to their kernel views
    ``[A, S, H, D]`` (``_canon.x_axes``), ``(q_axes, k_axes or None)``."""
    q_axes = _canon.x_axes("q" if k is not None else "x", q, template(q, cos, unsqueeze_dim, idx), unsqueeze_dim)
    if k is None:
        return q_axes, None
    return q_axes, _canon.x_axes("k", k, template(k, cos, unsqueeze_dim, idx), unsqueeze_dim)


def canonical_tables(t, x, axes, idx: TokenIndex) -> torch.Tensor:
    """cos or sin as the kernels read it: [P, R] (cache), [3, A, S, R] (mrope), else [A, S, R]."""
    if idx.cached:
        return t
    if not idx.mrope_section:
        return _canon.canonical_cs(t, x, axes)
    c0 = _canon.canonical_cs(t[0], x, axes)
    return torch.as_strided(t, (3, *c0.shape), (t.stride(0), *c0.stride()), c0.storage_offset())


def canonical_positions(x, axes, idx: TokenIndex):
    """positions -> int64 [X, A, S] (or None); cu_seqlens / offsets -> int64."""
    pos = None
    if idx.positions is not None:
        p = idx.positions.to(torch.int64)
        if idx.mrope_section:
            p0 = _canon.canonical_cs(p[0].unsqueeze(-1), x, axes)[..., 0]
            pos = torch.as_strided(p, (3, *p0.shape), (p.stride(0), *p0.stride()), p0.storage_offset())
        else:
            pos = _canon.canonical_cs(p.unsqueeze(-1), x, axes)[..., 0].unsqueeze(0)
    # (the kernels read cu_seqlens as contiguous: a strided int64 view was read past its elements)
    cu = idx.cu_seqlens.to(torch.int64).contiguous() if idx.cu_seqlens is not None else None
    off = idx.seqlen_offsets.to(torch.int64) if idx.seqlen_offsets is not None else None
    return pos, cu, off
