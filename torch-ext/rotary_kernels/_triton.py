"""Triton kernels: fused q/k rotation (forward = rotation, backward = conj) and the
flash-attn style elementwise ``apply_rotary``.

The launchers take *canonical* tensors (see ``_canon.py``): ``x`` as ``[A, S, H, D]`` and
``cos``/``sin`` as ``[A, S, R]``, both with arbitrary strides (zero strides included).
Nothing is copied: every load and store goes through the strides.

Each program handles one token ``(a, s)`` and a block of heads, of q or of k: the grid's
second axis enumerates q's head blocks and then k's, so q and k share one launch. The
token's cos/sin are read once per program and broadcast over its heads.

Math per rotary pair ``(j1, j2)`` (``(i, i + R/2)`` half-split, ``(2i, 2i + 1)``
interleaved), in fp32 (fp64 for fp64 inputs), rounded once at the store::

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2        with (s1, s2) := (-s2, -s1) when CONJ (the backward)
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

# Elements of x one program touches per rotary half; keeps register use bounded.
_TILE_ELEMS = 4096


@triton.jit
def _round(y, RTNE_BF16: tl.constexpr):
    """Round fp32 to the nearest-even bf16 value (still fp32), so the cast is exact.

    Only for the interpreter, whose fp32->bf16 cast truncates; GPUs round to nearest even.
    """
    if RTNE_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y


@triton.jit
def _rotate_heads(
    x_ptr, y_ptr, c1, c2, s1, s2, a, s, h0, H, D,
    sxa, sxs, sxh, sxd, sya, sys_, syh, syd,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr,
    ACC: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        j1 = 2 * offs_i
        j2 = j1 + 1
    else:
        j1 = offs_i
        j2 = offs_i + HALF
    mask = (offs_h[:, None] < H) & (offs_i[None, :] < HALF)
    x_row = x_ptr + a * sxa + s * sxs + offs_h[:, None].to(tl.int64) * sxh
    y_row = y_ptr + a * sya + s * sys_ + offs_h[:, None].to(tl.int64) * syh
    x1 = tl.load(x_row + j1[None, :] * sxd, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_row + j2[None, :] * sxd, mask=mask, other=0.0).to(ACC)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_row + j1[None, :] * syd, _round(y1, RTNE_BF16).to(out_ty), mask=mask)
    tl.store(y_row + j2[None, :] * syd, _round(y2, RTNE_BF16).to(out_ty), mask=mask)
    if COPY_PASS:
        # Partial rotary, out of place: dims [2 * HALF, D) pass through unchanged.
        for p0 in range(2 * HALF, D, BLOCK_PASS):
            offs_p = p0 + tl.arange(0, BLOCK_PASS)
            pmask = (offs_h[:, None] < H) & (offs_p[None, :] < D)
            v = tl.load(x_row + offs_p[None, :] * sxd, mask=pmask)
            tl.store(y_row + offs_p[None, :] * syd, v, mask=pmask)


@triton.jit
def _position(pos_ptr, cu_ptr, off_ptr, a, s, axis, spx, spa, sps, n_seqs, soff, offset,
              HAS_POS: tl.constexpr, HAS_CU: tl.constexpr, HAS_OFF: tl.constexpr, CU_STEPS: tl.constexpr):
    """The cache row of token (a, s) on mrope axis ``axis`` (reference.py, "Token positions")."""
    b = a
    if HAS_CU:  # the packed token's sequence: the last b with cu[b] <= s (binary search)
        lo = tl.zeros_like(s)
        hi = lo + n_seqs
        for _ in tl.static_range(CU_STEPS):
            mid = (lo + hi) // 2
            go = tl.load(cu_ptr + mid) <= s  # once hi == lo + 1, mid == lo and nothing moves
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        b = lo
    if HAS_POS:
        p = tl.load(pos_ptr + axis * spx + a * spa + s * sps)
    elif HAS_CU:
        p = s - tl.load(cu_ptr + b)
    else:
        p = s
    if HAS_OFF:
        p += tl.load(off_ptr + b * soff)
    return p + offset


@triton.jit
def _rotary_qk_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, cu_ptr, off_ptr,
    S, HQ, HK, D, NQB,
    sqa, sqs, sqh, sqd, soa, sos, soh, sod,
    ska, sks, skh, skd, sla, sls, slh, sld,
    scx, sca, scs, scp, scr, ssx, ssa, sss, ssp, ssr,
    spx, spa, sps, n_seqs, soff, offset, sec0, sec1, sec2,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, CONJ: tl.constexpr,
    COPY_PASS: tl.constexpr, HAS_K: tl.constexpr, ACC: tl.constexpr, RTNE_BF16: tl.constexpr,
    CACHED: tl.constexpr, HAS_POS: tl.constexpr, HAS_CU: tl.constexpr, HAS_OFF: tl.constexpr,
    CU_STEPS: tl.constexpr, MROPE: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    a = pid_t // S
    s = pid_t % S

    offs_i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        j1 = 2 * offs_i
        j2 = j1 + 1
    else:
        j1 = offs_i
        j2 = offs_i + HALF
    m = offs_i < HALF
    # Each pair's cos/sin element offset: x * s_x + a * s_a + s * s_s (per-token tables) or
    # position * s_p (caches; the a/s/x strides are 0), where x is the pair's mrope axis.
    if MROPE == 1:  # sectioned (Qwen2-VL)
        axis = tl.where(offs_i < sec0, 0, tl.where(offs_i < sec0 + sec1, 1, 2))
    elif MROPE == 2:  # interleaved (Qwen3-VL)
        r3 = offs_i % 3
        axis = tl.where((r3 == 1) & (offs_i < 3 * sec1), 1, tl.where((r3 == 2) & (offs_i < 3 * sec2), 2, 0))
    else:
        axis = tl.zeros_like(offs_i)
    base_c = axis * scx + a * sca + s * scs
    base_s = axis * ssx + a * ssa + s * sss
    if CACHED:
        if MROPE != 0 and HAS_POS:
            p0 = _position(pos_ptr, cu_ptr, off_ptr, a, s, 0, spx, spa, sps, n_seqs, soff, offset,
                           HAS_POS, HAS_CU, HAS_OFF, CU_STEPS)
            p1 = _position(pos_ptr, cu_ptr, off_ptr, a, s, 1, spx, spa, sps, n_seqs, soff, offset,
                           HAS_POS, HAS_CU, HAS_OFF, CU_STEPS)
            p2 = _position(pos_ptr, cu_ptr, off_ptr, a, s, 2, spx, spa, sps, n_seqs, soff, offset,
                           HAS_POS, HAS_CU, HAS_OFF, CU_STEPS)
            p = tl.where(axis == 0, p0, tl.where(axis == 1, p1, p2))
        else:
            p = _position(pos_ptr, cu_ptr, off_ptr, a, s, 0, spx, spa, sps, n_seqs, soff, offset,
                          HAS_POS, HAS_CU, HAS_OFF, CU_STEPS)
        base_c += p * scp
        base_s += p * ssp
    c1 = tl.load(cos_ptr + base_c + j1 * scr, mask=m, other=0.0).to(ACC)
    c2 = tl.load(cos_ptr + base_c + j2 * scr, mask=m, other=0.0).to(ACC)
    s1 = tl.load(sin_ptr + base_s + j1 * ssr, mask=m, other=0.0).to(ACC)
    s2 = tl.load(sin_ptr + base_s + j2 * ssr, mask=m, other=0.0).to(ACC)
    if CONJ:
        s1, s2 = -s2, -s1

    if pid_h < NQB:
        _rotate_heads(
            q_ptr, qo_ptr, c1, c2, s1, s2, a, s, pid_h * BLOCK_HQ, HQ, D,
            sqa, sqs, sqh, sqd, soa, sos, soh, sod,
            HALF, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, COPY_PASS, ACC, RTNE_BF16,
        )
    elif HAS_K:
        _rotate_heads(
            k_ptr, ko_ptr, c1, c2, s1, s2, a, s, (pid_h - NQB) * BLOCK_HK, HK, D,
            ska, sks, skh, skd, sla, sls, slh, sld,
            HALF, BLOCK_HK, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, COPY_PASS, ACC, RTNE_BF16,
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _emulate_rtne(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


# Triton's CPU interpreter patches triton.language globally while it runs a kernel, so two
# threads interpreting at once break each other; compiled launches on GPUs need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _launch(kernel, grid, *args, **kwargs):
    if _interpreting():
        with _INTERPRETER_LOCK:
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _table_strides(t):
    """(x, a, s, p, r) element strides of a cos/sin table: [A, S, R], [3, A, S, R] or a [P, R] cache."""
    if t.dim() == 2:
        return 0, 0, 0, t.stride(0), t.stride(1)
    if t.dim() == 3:
        return 0, t.stride(0), t.stride(1), 0, t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), 0, t.stride(3)


def rotary_qk(q, k, cos, sin, q_out, k_out, interleaved: bool, conj: bool, positions=None, cu_seqlens=None,
              seqlen_offsets=None, offset: int = 0, mrope_section=(), mrope_interleaved: bool = False) -> None:
    """Rotate canonical q ``[A, S, Hq, D]`` (and optional k ``[A, S, Hk, D]``) into
    ``q_out``/``k_out`` (which may be q/k themselves: in place). cos/sin: ``[A, S, R]``,
    ``[3, A, S, R]`` (mrope) or ``[P, R]`` caches read at each token's position (``_index.py``)."""
    A, S, HQ, D = q.shape
    HK = k.shape[2] if k is not None else 0
    R = cos.shape[-1]
    half = R // 2
    if A * S == 0 or (HQ + HK) * D == 0:
        return
    block_half = triton.next_power_of_2(half)
    max_h = max(1, _TILE_ELEMS // block_half)
    block_hq = min(triton.next_power_of_2(HQ), max_h)
    block_hk = min(triton.next_power_of_2(max(HK, 1)), max_h)
    nqb = triton.cdiv(HQ, block_hq)
    nkb = triton.cdiv(HK, block_hk)
    copy_pass = R < D and (q_out.data_ptr() != q.data_ptr() or (k is not None and k_out.data_ptr() != k.data_ptr()))
    block_pass = min(triton.next_power_of_2(max(D - R, 1)), 128)
    kk = k if k is not None else q
    ko = k_out if k_out is not None else q_out
    cached = cos.dim() == 2
    pos_strides = positions.stride() if positions is not None else (0, 0, 0)
    n_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else 1
    sec = tuple(mrope_section) if mrope_section else (0, 0, 0)
    dummy = cos  # stands in for absent index tensors (never read)
    grid = (A * S, nqb + nkb)
    _launch(
        _rotary_qk_kernel, grid,
        q, q_out, kk, ko, cos, sin,
        positions if positions is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        seqlen_offsets if seqlen_offsets is not None else dummy,
        S, HQ, HK, D, nqb,
        *q.stride(), *q_out.stride(), *kk.stride(), *ko.stride(),
        *_table_strides(cos), *_table_strides(sin),
        *pos_strides, n_seqs, seqlen_offsets.stride(0) if seqlen_offsets is not None else 0, offset, *sec,
        HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        INTERLEAVED=interleaved, CONJ=conj, COPY_PASS=copy_pass, HAS_K=k is not None,
        ACC=_acc_dtype(q.dtype), RTNE_BF16=_emulate_rtne(q.dtype),
        CACHED=cached, HAS_POS=positions is not None, HAS_CU=cu_seqlens is not None,
        HAS_OFF=seqlen_offsets is not None, CU_STEPS=max(1, n_seqs.bit_length()),
        MROPE=(2 if mrope_interleaved else 1) if mrope_section else 0,
        num_warps=4 if max(block_hq, block_hk) * block_half <= 2048 else 8,
    )


@triton.jit
def _elementwise_kernel(
    x1_ptr, x2_ptr, c_ptr, s_ptr, o1_ptr, o2_ptr, N,
    n1, n2, n3,
    x1s0, x1s1, x1s2, x1s3, x2s0, x2s1, x2s2, x2s3,
    cs0, cs1, cs2, cs3, ss0, ss1, ss2, ss3,
    o1s0, o1s1, o1s2, o1s3, o2s0, o2s1, o2s2, o2s3,
    CONJ: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < N
    i3 = idx % n3
    r = idx // n3
    i2 = r % n2
    r = r // n2
    i1 = r % n1
    i0 = r // n1
    x1 = tl.load(x1_ptr + i0 * x1s0 + i1 * x1s1 + i2 * x1s2 + i3 * x1s3, mask=m).to(ACC)
    x2 = tl.load(x2_ptr + i0 * x2s0 + i1 * x2s1 + i2 * x2s2 + i3 * x2s3, mask=m).to(ACC)
    c = tl.load(c_ptr + i0 * cs0 + i1 * cs1 + i2 * cs2 + i3 * cs3, mask=m).to(ACC)
    sn = tl.load(s_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3, mask=m).to(ACC)
    if CONJ:
        sn = -sn
    y1 = x1 * c - x2 * sn
    y2 = x1 * sn + x2 * c
    tl.store(o1_ptr + i0 * o1s0 + i1 * o1s1 + i2 * o1s2 + i3 * o1s3, _round(y1, RTNE_BF16).to(o1_ptr.dtype.element_ty), mask=m)
    tl.store(o2_ptr + i0 * o2s0 + i1 * o2s1 + i2 * o2s2 + i3 * o2s3, _round(y2, RTNE_BF16).to(o2_ptr.dtype.element_ty), mask=m)


def apply_rotary_elementwise(x1, x2, cos, sin, out1, out2, conj: bool) -> None:
    """flash-attn's elementwise rotation on 4-D tensors of one shape (cos/sin expanded)."""
    n = x1.numel()
    if n == 0:
        return
    block = 1024
    _launch(
        _elementwise_kernel, (triton.cdiv(n, block),),
        x1, x2, cos, sin, out1, out2, n,
        x1.shape[1], x1.shape[2], x1.shape[3],
        *x1.stride(), *x2.stride(), *cos.stride(), *sin.stride(), *out1.stride(), *out2.stride(),
        CONJ=conj, ACC=_acc_dtype(x1.dtype), BLOCK=block, RTNE_BF16=_emulate_rtne(out1.dtype),
    )
