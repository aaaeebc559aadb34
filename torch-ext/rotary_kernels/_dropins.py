"""Drop-ins for other libraries' and models' RoPE signatures, each a thin layer over the
public functions of ``_api.py`` (same kernels, same validation): Qwen2-VL's mrope, Llama 4's
complex ``freqs_cis``, DeepSeek-V3's MLA rope, TransformerEngine's ``apply_rotary_pos_emb``."""

from __future__ import annotations

import torch

from . import _canon
from ._api import _rotate, apply_rotary_emb, apply_rotary_transformers
from .freqs import context_parallel_positions, cos_sin_from_angles


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1, *, backend=None):
    """Drop-in for Qwen2-VL's ``apply_multimodal_rotary_pos_emb`` (transformers 4.x): cos/sin
    ``[3, B, S, D]`` (temporal, height, width), ``mrope_section`` (t, h, w) summing to D/2; the
    per-axis selection happens in the kernel."""
    return apply_rotary_transformers(q, k, cos, sin, unsqueeze_dim, mrope_section=tuple(mrope_section),
                                     backend=backend)


def apply_rotary_emb_complex(xq, xk, freqs_cis, *, backend=None):
    """Drop-in for Llama 4's ``apply_rotary_emb(xq, xk, freqs_cis)`` (transformers): xq/xk
    ``[B, S, H, D]`` whose neighbours ``(2i, 2i + 1)`` are the real and imaginary parts of a
    complex number, multiplied by complex ``freqs_cis`` ``[B, S, D/2]``. Its real and imaginary
    parts are the per-pair cos and sin (read in place: no table is built); returns ``(xq, xk)``
    rotated, differentiable."""
    if not isinstance(freqs_cis, torch.Tensor) or not freqs_cis.is_complex():
        raise TypeError(f"freqs_cis must be a complex tensor, got {getattr(freqs_cis, 'dtype', type(freqs_cis))}")
    return apply_rotary_transformers(xq, xk, freqs_cis.real, freqs_cis.imag, 2, interleaved=True, pair_tables=True,
                                     backend=backend)


def apply_rotary_pos_emb_interleave(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, *, backend=None):
    """Drop-in for DeepSeek-V3's ``apply_rotary_pos_emb_interleave`` (transformers; MLA's rope
    part): rotation pairs are read at ``(2i, 2i + 1)`` and written at ``(i, i + R/2)``. cos/sin:
    transformers' ``cat(freqs, freqs)`` tables ``[B, S, R]`` with ``R`` = q's and k's last dim
    (``position_ids`` is accepted and unused, as there); their first halves are read as per-pair
    tables. The main rotary kernel with ``swap_layout`` (``reference.py``): q and k in one launch,
    differentiable (the backward is the transposed map, one launch too)."""
    del position_ids
    if _canon.check_cos_sin(cos, sin) % 2:
        raise ValueError(f"the rotary dim (cos.shape[-1]) must be even, got {cos.shape[-1]}")
    for name, x in (("q", q), ("k", k)):
        _canon.check_float(name, x)
        if x.dim() < 2 or x.shape[-1] != cos.shape[-1]:
            raise ValueError(f"{name}'s last dim must be the rotary dim {cos.shape[-1]} (cos.shape[-1]), got "
                             f"shape {tuple(x.shape)}")
    h = cos.shape[-1] // 2
    return _rotate(q, k, cos[..., :h], sin[..., :h], unsqueeze_dim, True, False, backend, {}, pair_tables=True,
                   swap_layout=True)


TE_FORMATS = ("sbhd", "bshd", "thd")


def apply_rotary_pos_emb_te(t, freqs, tensor_format="sbhd", start_positions=None, interleaved=False, fused=True,
                            cu_seqlens=None, cp_size=1, cp_rank=0, *, backend=None):
    """Drop-in for TransformerEngine's ``apply_rotary_pos_emb``: ``t`` ``[S, B, H, D]`` (sbhd),
    ``[B, S, H, D]`` (bshd) or packed ``[T, H, D]`` (thd, with ``cu_seqlens``); ``freqs`` the
    angle table ``[S2, 1, 1, R]`` (``R <= D``, ``S2`` >= the positions used), whose cos/sin are
    taken in fp32 as TE's fused kernel does (``freqs.cos_sin_from_angles``: one ``[S2, R]``
    cache, read per token in the kernel). ``start_positions``: ``[B]`` offsets added to each
    sequence's positions (decoding); ``cp_size``/``cp_rank``: load-balanced context parallelism
    (``freqs.context_parallel_positions``; with thd, ``cu_seqlens`` are the whole padded
    sequences', as in TE). ``fused`` is accepted and ignored (always one launch). Returns the
    rotated ``t`` in its own layout, differentiable wrt ``t`` (and ``freqs``)."""
    del fused
    if tensor_format not in TE_FORMATS:
        raise ValueError(f"tensor_format must be one of {TE_FORMATS}, got {tensor_format!r}")
    _canon.check_float("t", t)
    if not isinstance(freqs, torch.Tensor) or freqs.dim() != 4 or freqs.shape[1:3] != (1, 1):
        raise ValueError(f"freqs must be TransformerEngine's [S, 1, 1, R] angle table, got "
                         f"{tuple(getattr(freqs, 'shape', ())) or type(freqs).__name__}")
    for name, v in (("cp_size", cp_size), ("cp_rank", cp_rank)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need cp_size >= 1 and 0 <= cp_rank < cp_size, got cp_size={cp_size}, cp_rank={cp_rank}")
    if cp_size > 1 and start_positions is not None:
        raise ValueError("start_positions cannot be combined with cp_size > 1 (as in TransformerEngine)")
    if (tensor_format == "thd") != (cu_seqlens is not None):
        raise ValueError(f"cu_seqlens is required with tensor_format='thd' and only then, got tensor_format="
                         f"{tensor_format!r}, cu_seqlens={'None' if cu_seqlens is None else 'a tensor'}")
    want = 3 if tensor_format == "thd" else 4
    if t.dim() != want:
        raise ValueError(f"with tensor_format={tensor_format!r}, t must be {want}-D, got shape {tuple(t.shape)}")
    rot = freqs.shape[-1]  # (named here: the main API knows it as cos.shape[-1], and sees t as [B, S, H, D])
    if rot % 2 or rot > t.shape[-1]:
        raise ValueError(f"freqs' last dim, the rotary dim, must be even and at most t's head dim {t.shape[-1]} "
                         f"(as in TransformerEngine), got {rot}")
    # (sequences, tokens of each) for sbhd / bshd (unused with thd)
    batch, seq_len = (t.shape[1], t.shape[0]) if tensor_format == "sbhd" else (t.shape[0], t.shape[1])
    if start_positions is not None:  # (named here: the main API knows them as seqlen_offsets)
        n = cu_seqlens.numel() - 1 if tensor_format == "thd" else batch
        if (not isinstance(start_positions, torch.Tensor) or start_positions.dim() != 1
                or start_positions.dtype not in (torch.int32, torch.int64) or start_positions.shape[0] != n):
            raise ValueError(f"start_positions must be an int32/int64 tensor [{n}] (one offset per sequence), got "
                             + (f"{start_positions.dtype} {tuple(start_positions.shape)}"
                                if isinstance(start_positions, torch.Tensor) else type(start_positions).__name__))
    if cp_size > 1 and tensor_format != "thd" and seq_len % 2:
        raise ValueError(f"with cp_size > 1, t's local sequence length must be even (two load-balanced chunks of "
                         f"the sequence), got {seq_len}")
    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    if tensor_format != "thd" and start_positions is None:  # only the rows read: positions < S * cp_size
        angles = angles[: seq_len * cp_size]
    cos, sin = cos_sin_from_angles(angles)
    opts = dict(interleaved=interleaved, backend=backend)
    if start_positions is not None:
        opts["seqlen_offsets"] = start_positions
    if tensor_format == "thd":
        if cp_size > 1:  # per token: its sequence's load-balanced chunk positions
            opts["positions"] = _thd_cp_positions(cu_seqlens, cp_size, cp_rank, t.shape[0])
        else:
            opts["cu_seqlens"] = cu_seqlens
        return apply_rotary_emb(t, cos, sin, 1, **opts)
    x = t.transpose(0, 1) if tensor_format == "sbhd" else t  # [B, S, H, D] views
    if cp_size > 1:
        pos = context_parallel_positions(seq_len * cp_size, cp_size, cp_rank, device=t.device)
        opts["positions"] = pos.expand(batch, -1)
    elif start_positions is None:
        opts["seqlen_offsets"] = 0  # (positions 0.. per sequence, rows of the cache)
    out = apply_rotary_emb(x, cos, sin, 2, **opts)
    return out.transpose(0, 1) if tensor_format == "sbhd" else out


def _thd_cp_positions(cu_seqlens, cp_size, cp_rank, tokens):
    """Positions of the packed local tokens under context parallelism: sequence i (whole padded
    length ``cu_seqlens[i + 1] - cu_seqlens[i]``) holds its two load-balanced chunks here."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [batch + 1], got {getattr(cu_seqlens, 'shape', cu_seqlens)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    parts = [context_parallel_positions(n, cp_size, cp_rank, device=cu_seqlens.device) for n in lengths]
    pos = torch.cat(parts) if parts else cu_seqlens.new_empty(0)
    if pos.numel() != tokens:
        raise ValueError(f"cu_seqlens // cp_size gives {pos.numel()} local tokens, t has {tokens}")
    return pos
