"""Triton kernels: fused q/k rotation (forward = rotation, backward = conj) and the
flash-attn style elementwise ``apply_rotary``.

The launchers take *canonical* tensors (see ``_canon.py``): ``x`` as ``[A, S, H, D]`` and
``cos``/``sin`` as ``[A, S, R]``, both with arbitrary strides (zero strides included).
Nothing is copied: every load and store goes through the strides, and every offset is
computed in 64-bit integers.

Each program handles one token ``(a, s)`` and one group of heads: a block of q heads *and*
a block of k heads (with the usual shapes, all of them: one program per token, one launch).
A program issues its q and k loads first, then reads the token's cos/sin once for both, so
it waits for one memory round trip (two with a cos/sin cache: the position, then the row).
The head dim is read in rows: two contiguous half rows per head (half-split pairs
``(i, i + R/2)``) or one contiguous row split into pairs in registers (interleaved pairs
``(2i, 2i + 1)``), so with a unit head-dim stride every access is as wide as the alignment
allows (128 bits). ``num_warps`` is chosen so that a thread holds at least 16 bytes of the
smaller (k) block.

Math per rotary pair ``(j1, j2)``, in fp32 (fp64 for fp64 inputs), rounded once at the store::

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2        with (s1, s2) := (-s2, -s1) when CONJ (the backward)

each product rounded on its own (launched with ``enable_fp_fusion=False``: no FMA contraction, as
in the CUDA kernel's ``mul_rn`` and the CPU kernel's ``-ffp-contract=off``), so every backend gives
the same bits, equal to PyTorch's fp32 ops.

Per-pair tables (``pair_tables``, last dim ``R/2``): pair ``i`` reads entry ``i`` once, for both
of its elements (``c2 = c1``, ``s2 = s1``): half the table loads.

``swap_layout`` (DeepSeek-V3's MLA rope, ``reference.py``): pairs are loaded in x's layout and
stored in the other one (``OUT_INTERLEAVED``), each access still a whole row; per-pair tables.

Cache rows out of range: a token whose cos/sin row (``position``, see ``_index.py``) is
outside ``[0, P)`` reads nothing out of bounds and its rotated dims are written as NaN
(pass-through dims as usual): memory safe, no host sync (CUDA-graph safe) and visible.
Host-side checks, where enabled, raise before the launch.

Launches: under the tensors' device (``_device_context``), so multi-GPU calls use the right
device and its current stream. Specialisation: values that change from call to call
(sequence length, number of sequences, offsets, cache size, index strides) are not
specialised, and the binary search over ``cu_seqlens`` has a bucketed step count, so a
serving workload compiles a handful of variants; head counts and head dim (model constants)
are constexprs. ``tests/test_codegen_triton.py`` checks the generated code (128-bit q/k
accesses, no spills, 64-bit offsets) for sm_90 and sm_80.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements of one rotary half of q (or of k) one program holds; keeps register use bounded.
_TILE_ELEMS = 4096
# Elements of one rotary half per thread we aim for at most (registers: no spills).
_MAX_PER_THREAD = 64


# ----------------------------------------------------------------------------------------------
# Exact bf16 conversions for the interpreter
# ----------------------------------------------------------------------------------------------
# Triton's CPU interpreter converts bf16 <-> fp32 with a bit-manipulating routine that
# truncates instead of rounding to nearest even, mangles subnormals (6.79e-39 -> 2.94e-39)
# and turns NaN payloads into zeros or infinities. GPUs convert exactly (bf16 -> fp32) and
# round to nearest even (fp32 -> bf16). With EMU (set only when interpreting) the kernels
# convert through the bits instead, which is exactly what the GPU computes.


@triton.jit
def _to_acc(x, ACC: tl.constexpr, EMU: tl.constexpr):
    """Load-side conversion to the accumulation type."""
    if EMU:
        if x.dtype == tl.bfloat16:
            x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(ACC)


@triton.jit
def _to_out(y, OUT: tl.constexpr, EMU: tl.constexpr):
    """Store-side conversion to the output type (round to nearest even)."""
    if EMU:
        if OUT == tl.bfloat16:
            bits = y.to(tl.float32).to(tl.uint32, bitcast=True)
            rne = bits + 0x7FFF + ((bits >> 16) & 1)
            nan = (bits & 0x7FFFFFFF) > 0x7F800000
            bits = tl.where(nan, bits | 0x400000, rne) >> 16  # NaN stays NaN (quiet), sign kept
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(OUT)


# ----------------------------------------------------------------------------------------------
# Fused q/k kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_pairs(x_ptr, tok, h0, H, sxh, sxd,
                HALF: tl.constexpr, BH: tl.constexpr, BHALF: tl.constexpr,
                INTERLEAVED: tl.constexpr, ACC: tl.constexpr, EMU: tl.constexpr):
    """x1, x2 ``[BH, BHALF]`` of heads ``h0 ..`` of one token (``tok``: its element offset)."""
    offs_h = h0 + tl.arange(0, BH)
    row = x_ptr + tok + offs_h.to(tl.int64)[:, None] * sxh
    if INTERLEAVED:  # one contiguous row, pairs split in registers
        offs_r = tl.arange(0, 2 * BHALF)
        m = (offs_h[:, None] < H) & (offs_r[None, :] < 2 * HALF)
        x = tl.load(row + offs_r.to(tl.int64)[None, :] * sxd, mask=m, other=0.0)
        x1, x2 = tl.split(tl.reshape(x, (BH, BHALF, 2)))
    else:  # two contiguous half rows
        offs_i = tl.arange(0, BHALF)
        m = (offs_h[:, None] < H) & (offs_i[None, :] < HALF)
        x1 = tl.load(row + offs_i.to(tl.int64)[None, :] * sxd, mask=m, other=0.0)
        x2 = tl.load(row + (offs_i + HALF).to(tl.int64)[None, :] * sxd, mask=m, other=0.0)
    return _to_acc(x1, ACC, EMU), _to_acc(x2, ACC, EMU)


@triton.jit
def _store_pairs(y_ptr, tok, h0, H, syh, syd, y1, y2,
                 HALF: tl.constexpr, BH: tl.constexpr, BHALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, EMU: tl.constexpr):
    out_ty: tl.constexpr = y_ptr.dtype.element_ty
    offs_h = h0 + tl.arange(0, BH)
    row = y_ptr + tok + offs_h.to(tl.int64)[:, None] * syh
    y1 = _to_out(y1, out_ty, EMU)
    y2 = _to_out(y2, out_ty, EMU)
    if INTERLEAVED:
        offs_r = tl.arange(0, 2 * BHALF)
        m = (offs_h[:, None] < H) & (offs_r[None, :] < 2 * HALF)
        y = tl.reshape(tl.join(y1, y2), (BH, 2 * BHALF))
        tl.store(row + offs_r.to(tl.int64)[None, :] * syd, y, mask=m)
    else:
        offs_i = tl.arange(0, BHALF)
        m = (offs_h[:, None] < H) & (offs_i[None, :] < HALF)
        tl.store(row + offs_i.to(tl.int64)[None, :] * syd, y1, mask=m)
        tl.store(row + (offs_i + HALF).to(tl.int64)[None, :] * syd, y2, mask=m)


@triton.jit
def _copy_pass(x_ptr, y_ptr, tx, ty, h0, H, sxh, sxd, syh, syd, R, D,
               BH: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Partial rotary, out of place: dims [R, D) pass through unchanged."""
    offs_h = h0 + tl.arange(0, BH)
    xrow = x_ptr + tx + offs_h.to(tl.int64)[:, None] * sxh
    yrow = y_ptr + ty + offs_h.to(tl.int64)[:, None] * syh
    for p0 in range(R, D, BLOCK_PASS):
        offs_p = p0 + tl.arange(0, BLOCK_PASS)
        pmask = (offs_h[:, None] < H) & (offs_p[None, :] < D)
        v = tl.load(xrow + offs_p.to(tl.int64)[None, :] * sxd, mask=pmask)
        tl.store(yrow + offs_p.to(tl.int64)[None, :] * syd, v, mask=pmask)


@triton.jit
def _position(pos_ptr, cu_ptr, off_ptr, a, s, axis, spx, spa, sps, n_seqs, soff, offset,
              CU_STEPS: tl.constexpr):
    """The cache row of token (a, s) on mrope axis ``axis`` (reference.py, "Token positions")."""
    b = a
    if cu_ptr is not None:  # the packed token's sequence: the last b with cu[b] <= s (binary search)
        lo = tl.zeros_like(s)
        hi = lo + n_seqs
        for _ in tl.static_range(CU_STEPS):
            mid = (lo + hi) // 2
            go = tl.load(cu_ptr + mid) <= s  # once hi == lo + 1, mid == lo and nothing moves
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        b = lo
    if pos_ptr is not None:
        p = tl.load(pos_ptr + axis * spx + a * spa + s * sps)
    elif cu_ptr is not None:
        p = s - tl.load(cu_ptr + b)
    else:
        p = s
    if off_ptr is not None:
        p += tl.load(off_ptr + b * soff)
    return p + offset


@triton.jit
def _cs_offsets(pair, j, a, s, p, scx, sca, scs, scp, scr, MROPE: tl.constexpr,
                SEC0: tl.constexpr, SEC1: tl.constexpr, SEC2: tl.constexpr, CACHED: tl.constexpr):
    """Element offsets of cos (or sin, with its strides) for pairs ``pair`` at dims ``j``."""
    if MROPE == 1:  # sectioned (Qwen2-VL)
        axis = tl.where(pair < SEC0, 0, tl.where(pair < SEC0 + SEC1, 1, 2)).to(tl.int64)
    elif MROPE == 2:  # interleaved (Qwen3-VL)
        r3 = pair % 3
        axis = tl.where((r3 == 1) & (pair < 3 * SEC1), 1, tl.where((r3 == 2) & (pair < 3 * SEC2), 2, 0))
        axis = axis.to(tl.int64)
    else:
        axis = 0
    off = axis * scx + a * sca + s * scs + j.to(tl.int64) * scr
    if CACHED:
        off += p * scp
    return off


@triton.jit
def _load_cs(ptr, pair, j, m, a, s, p, ok, scx, sca, scs, scp, scr,
             MROPE: tl.constexpr, SEC0: tl.constexpr, SEC1: tl.constexpr, SEC2: tl.constexpr,
             CACHED: tl.constexpr, ACC: tl.constexpr, EMU: tl.constexpr):
    off = _cs_offsets(pair, j, a, s, p, scx, sca, scs, scp, scr, MROPE, SEC0, SEC1, SEC2, CACHED)
    if CACHED:  # rows out of range: nothing read, NaN
        v = _to_acc(tl.load(ptr + off, mask=m & ok, other=0.0), ACC, EMU)
        v = tl.where(ok, v, float("nan"))
    else:
        v = _to_acc(tl.load(ptr + off, mask=m, other=0.0), ACC, EMU)
    return v


@triton.jit
def _pair_tables(cos_ptr, sin_ptr, pair, j, m, a, s, p, ok, scx, sca, scs, scp, scr, ssx, ssa, sss, ssp, ssr,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, CONJ: tl.constexpr,
                 MROPE: tl.constexpr, SEC0: tl.constexpr, SEC1: tl.constexpr, SEC2: tl.constexpr,
                 CACHED: tl.constexpr, ACC: tl.constexpr, EMU: tl.constexpr, PER_PAIR: tl.constexpr):
    """c1, c2, s1, s2 ``[1, BLOCK_HALF]``: one token's pairs read from one cos/sin pair, CONJ applied.
    ``PER_PAIR``: the tables hold one entry per pair (``j`` is the pair), for both its elements."""
    if PER_PAIR:
        c1 = _load_cs(cos_ptr, pair, j, m, a, s, p, ok, scx, sca, scs, scp, scr,
                      MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
        s1 = _load_cs(sin_ptr, pair, j, m, a, s, p, ok, ssx, ssa, sss, ssp, ssr,
                      MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
        c2 = c1
        s2 = s1
    elif INTERLEAVED:
        c = _load_cs(cos_ptr, pair, j, m, a, s, p, ok, scx, sca, scs, scp, scr,
                     MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
        sn = _load_cs(sin_ptr, pair, j, m, a, s, p, ok, ssx, ssa, sss, ssp, ssr,
                      MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
        c1, c2 = tl.split(tl.reshape(c, (BLOCK_HALF, 2)))
        s1, s2 = tl.split(tl.reshape(sn, (BLOCK_HALF, 2)))
    else:
        c1 = _load_cs(cos_ptr, pair, j, m, a, s, p, ok, scx, sca, scs, scp, scr,
                      MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
        c2 = _load_cs(cos_ptr, pair, j + HALF, m, a, s, p, ok, scx, sca, scs, scp, scr,
                      MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
        s1 = _load_cs(sin_ptr, pair, j, m, a, s, p, ok, ssx, ssa, sss, ssp, ssr,
                      MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
        s2 = _load_cs(sin_ptr, pair, j + HALF, m, a, s, p, ok, ssx, ssa, sss, ssp, ssr,
                      MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU)
    if CONJ:
        s1, s2 = -s2, -s1
    return c1[None, :], c2[None, :], s1[None, :], s2[None, :]


_QK_NO_SPEC = ("S", "NPOS", "n_seqs", "offset", "spx", "spa", "sps", "soff")
# The constexprs of _rotary_qk_kernel, passed as one tuple (CFG): Triton's launcher binds each
# keyword constexpr separately (~0.3 us a piece per launch), a tuple once.
_QK_CFG = ("HQ", "HK", "D", "HALF", "BLOCK_HQ", "BLOCK_HK", "BLOCK_HALF", "BLOCK_PASS", "INTERLEAVED", "CONJ",
           "COPY_PASS", "ACC", "EMU", "CACHED", "CU_STEPS", "MROPE", "SEC0", "SEC1", "SEC2", "K_TABLES", "PER_PAIR",
           "SWAP_LAYOUT")


@triton.jit(do_not_specialize=_QK_NO_SPEC)
def _rotary_qk_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, cosk_ptr, sink_ptr, pos_ptr, cu_ptr, off_ptr,
    S, NPOS, n_seqs, offset,
    sq, so, sk, sl,  # element strides (a, s, h, d) of q, q_out, k, k_out
    sc, ss, sck, ssk,  # (x, a, s, p, r) of cos, sin, cos_k, sin_k (_table_strides)
    spx, spa, sps, soff,  # strides of positions (x, a, s) and seqlen_offsets: separate, as
    # do_not_specialize does not reach into tuples (a stride of 1 would be a new variant)
    CFG: tl.constexpr,  # the values named by _QK_CFG
):
    HQ: tl.constexpr = CFG[0]  # head counts and head dim: model constants (masks fold away)
    HK: tl.constexpr = CFG[1]
    D: tl.constexpr = CFG[2]
    HALF: tl.constexpr = CFG[3]
    BLOCK_HQ: tl.constexpr = CFG[4]
    BLOCK_HK: tl.constexpr = CFG[5]
    BLOCK_HALF: tl.constexpr = CFG[6]
    BLOCK_PASS: tl.constexpr = CFG[7]
    INTERLEAVED: tl.constexpr = CFG[8]  # x's pair layout
    CONJ: tl.constexpr = CFG[9]
    COPY_PASS: tl.constexpr = CFG[10]
    ACC: tl.constexpr = CFG[11]
    EMU: tl.constexpr = CFG[12]
    CACHED: tl.constexpr = CFG[13]
    CU_STEPS: tl.constexpr = CFG[14]
    MROPE: tl.constexpr = CFG[15]
    SEC0: tl.constexpr = CFG[16]
    SEC1: tl.constexpr = CFG[17]
    SEC2: tl.constexpr = CFG[18]
    K_TABLES: tl.constexpr = CFG[19]  # k reads its own tables (cos_k/sin_k), else cos/sin
    PER_PAIR: tl.constexpr = CFG[20]  # tables [..., HALF], one entry per pair (pair_tables)
    # the outputs' pair layout: x's, or with swap_layout the other one (MLA, PER_PAIR)
    OUT_INTERLEAVED: tl.constexpr = INTERLEAVED != CFG[21]
    sqa, sqs, sqh, sqd = sq
    soa, sos, soh, sod = so
    ska, sks, skh, skd = sk
    sla, sls, slh, sld = sl
    scx, sca, scs, scp, scr = sc
    ssx, ssa, sss, ssp, ssr = ss

    pid_t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    a = pid_t // S
    s = pid_t % S
    hq0 = g * BLOCK_HQ
    hk0 = g * BLOCK_HK
    tq = a * sqa + s * sqs
    tk = a * ska + s * sks

    # 1. q and k (nothing they need depends on a load)
    q1, q2 = _load_pairs(q_ptr, tq, hq0, HQ, sqh, sqd, HALF, BLOCK_HQ, BLOCK_HALF, INTERLEAVED, ACC, EMU)
    if k_ptr is not None:
        k1, k2 = _load_pairs(k_ptr, tk, hk0, HK, skh, skd, HALF, BLOCK_HK, BLOCK_HALF, INTERLEAVED, ACC, EMU)
    # Keeps the compiler from scheduling a q/k load after the first use of cos/sin (their
    # layout conversion waits for them): every q/k load is in flight before anything waits.
    tl.debug_barrier()

    # 2. the token's cos/sin, once for q and k (and k's own, with K_TABLES): table entry j of pair
    # `pair` (full-width interleaved tables: both elements' entries, split in registers)
    if INTERLEAVED and not PER_PAIR:
        j = tl.arange(0, 2 * BLOCK_HALF)
        pair = j // 2
        m = j < 2 * HALF
    else:
        pair = tl.arange(0, BLOCK_HALF)
        j = pair
        m = pair < HALF
    p = 0
    ok = True
    if CACHED:  # a token with any cache row out of range reads none and gets NaN rotated dims
        if MROPE != 0 and pos_ptr is not None:
            p0 = _position(pos_ptr, cu_ptr, off_ptr, a, s, 0, spx, spa, sps, n_seqs, soff, offset, CU_STEPS)
            p1 = _position(pos_ptr, cu_ptr, off_ptr, a, s, 1, spx, spa, sps, n_seqs, soff, offset, CU_STEPS)
            p2 = _position(pos_ptr, cu_ptr, off_ptr, a, s, 2, spx, spa, sps, n_seqs, soff, offset, CU_STEPS)
            if MROPE == 1:
                p = tl.where(pair < SEC0, p0, tl.where(pair < SEC0 + SEC1, p1, p2))
            else:
                r3 = pair % 3
                p = tl.where((r3 == 1) & (pair < 3 * SEC1), p1, tl.where((r3 == 2) & (pair < 3 * SEC2), p2, p0))
            ok = (tl.minimum(tl.minimum(p0, p1), p2) >= 0) & (tl.maximum(tl.maximum(p0, p1), p2) < NPOS)
        else:
            p = _position(pos_ptr, cu_ptr, off_ptr, a, s, 0, spx, spa, sps, n_seqs, soff, offset, CU_STEPS)
            ok = (p >= 0) & (p < NPOS)
        p = tl.where(ok, p.to(tl.int64), 0)
    c1, c2, s1, s2 = _pair_tables(cos_ptr, sin_ptr, pair, j, m, a, s, p, ok, scx, sca, scs, scp, scr,
                                  ssx, ssa, sss, ssp, ssr, HALF, BLOCK_HALF, INTERLEAVED, CONJ,
                                  MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU, PER_PAIR)
    if K_TABLES:
        kcx, kca, kcs, kcp, kcr = sck
        ksx, ksa, kss, ksp, ksr = ssk
        kc1, kc2, ks1, ks2 = _pair_tables(cosk_ptr, sink_ptr, pair, j, m, a, s, p, ok, kcx, kca, kcs, kcp, kcr,
                                          ksx, ksa, kss, ksp, ksr, HALF, BLOCK_HALF, INTERLEAVED, CONJ,
                                          MROPE, SEC0, SEC1, SEC2, CACHED, ACC, EMU, PER_PAIR)
    else:
        kc1, kc2, ks1, ks2 = c1, c2, s1, s2

    # 3. rotate and store
    _store_pairs(qo_ptr, a * soa + s * sos, hq0, HQ, soh, sod, q1 * c1 - q2 * s1, q2 * c2 + q1 * s2,
                 HALF, BLOCK_HQ, BLOCK_HALF, OUT_INTERLEAVED, EMU)
    if k_ptr is not None:
        _store_pairs(ko_ptr, a * sla + s * sls, hk0, HK, slh, sld, k1 * kc1 - k2 * ks1, k2 * kc2 + k1 * ks2,
                     HALF, BLOCK_HK, BLOCK_HALF, OUT_INTERLEAVED, EMU)
    if COPY_PASS:
        _copy_pass(q_ptr, qo_ptr, tq, a * soa + s * sos, hq0, HQ, sqh, sqd, soh, sod, 2 * HALF, D,
                   BLOCK_HQ, BLOCK_PASS)
        if k_ptr is not None:
            _copy_pass(k_ptr, ko_ptr, tk, a * sla + s * sls, hk0, HK, skh, skd, slh, sld, 2 * HALF, D,
                       BLOCK_HK, BLOCK_PASS)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


# Whether triton.jit made interpreted functions (TRITON_INTERPRET=1): decided when this module
# was imported (_dispatch._interpret reads it too).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton's CPU interpreter patches triton.language globally while it runs a kernel, so two
# threads interpreting at once break each other; compiled launches on GPUs need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _device_context(device: torch.device):
    """The context that makes ``device`` current for a launch, or None when nothing is to be done.

    Triton launches on the current device and its current stream; tensors on another device
    (multi-GPU) need their own device made current. Works for any accelerator torch has a
    device module for (cuda, which ROCm shares, xpu, ...); CPU tensors (the interpreter) need
    nothing.
    """
    if device.type == "cpu" or device.index is None:
        return None
    return torch.get_device_module(device.type).device(device.index)


# Compile options of every launch (the codegen test compiles with them too): no FMA contraction
# (the module docstring's "Math").
COMPILE_OPTIONS = dict(enable_fp_fusion=False)


def _launch(kernel, grid, *args, **kwargs):
    if _INTERPRET:
        with _INTERPRETER_LOCK:
            kernel[grid](*args, **kwargs, **COMPILE_OPTIONS)
    else:
        kernel[grid](*args, **kwargs, **COMPILE_OPTIONS)


def _launch_on(device, kernel, grid, *args, **kwargs):
    ctx = _device_context(device)
    if ctx is None:
        _launch(kernel, grid, *args, **kwargs)
    else:
        with ctx:
            _launch(kernel, grid, *args, **kwargs)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _table_strides(t):
    """(x, a, s, p, r) element strides of a cos/sin table: [A, S, R], [3, A, S, R] or a [P, R] cache."""
    st = t.stride()
    if len(st) == 2:
        return 0, 0, 0, st[0], st[1]
    if len(st) == 3:
        return 0, st[0], st[1], 0, st[2]
    return st[0], st[1], st[2], 0, st[3]


def _cu_steps(n_seqs: int) -> int:
    """Binary-search steps for n_seqs sequences, bucketed (multiples of 4) so that batches of
    different sizes share a compiled kernel; extra steps change nothing."""
    return max(4, -(-n_seqs.bit_length() // 4) * 4)


def _plan(HQ, HK, half, esize, interleaved, has_k):
    """(BLOCK_HQ, BLOCK_HK, BLOCK_HALF, groups, num_warps) for one token's heads."""
    block_half = triton.next_power_of_2(half)
    groups = max(1, triton.cdiv(HQ * block_half, _TILE_ELEMS), triton.cdiv(HK * block_half, _TILE_ELEMS))
    block_hq = triton.next_power_of_2(max(triton.cdiv(HQ, groups), 1))
    block_hk = triton.next_power_of_2(max(triton.cdiv(HK, groups), 1)) if has_k else 1
    # Widest accesses: a thread of every load holds >= 16 bytes of the smaller block ...
    row = 2 * block_half if interleaved else block_half  # elements per load and head
    small = (min(block_hq, block_hk) if has_k else block_hq) * row
    warps = max(1, small * esize // (32 * 16))
    # ... unless that leaves a thread too many elements (registers): then fewer, wider programs
    per_thread = (block_hq + (block_hk if has_k else 0)) * 2 * block_half
    warps = max(warps, triton.next_power_of_2(triton.cdiv(per_thread, 32 * 2 * _MAX_PER_THREAD)))
    return block_hq, block_hk, block_half, groups, min(warps, 8)


_PLANS: dict = {}


def rotary_triton(q, k, cos, sin, q_out, k_out, interleaved: bool, conj: bool, positions=None, cu_seqlens=None,
              seqlen_offsets=None, offset: int = 0, mrope_section=(), mrope_interleaved: bool = False,
              cos_k=None, sin_k=None, pair_tables: bool = False, swap_layout: bool = False):
    """Rotate canonical q ``[A, S, Hq, D]`` (and optional k ``[A, S, Hk, D]``) into
    ``q_out``/``k_out`` (which may be q/k themselves: in place). cos/sin: ``[A, S, R]``,
    ``[3, A, S, R]`` (mrope) or ``[P, R]`` caches read at each token's position (``_index.py``);
    cos_k/sin_k (optional, in cos/sin's form): k's own tables. ``pair_tables``: every table's
    last dim is ``R/2``, one entry per pair. ``swap_layout``: outputs in the other pair layout
    (out of place, per-pair tables). Returns the launch (``QKLaunch``; None: nothing to rotate)."""
    A, S, HQ, D = q.shape
    HK = k.shape[2] if k is not None else 0
    if HK == 0:
        k = k_out = cos_k = sin_k = None
    elif HQ == 0:  # only k heads: rotate k as "q"
        q, q_out, k, k_out, HQ, HK = k, k_out, None, None, HK, 0
        if cos_k is not None:
            cos, sin, cos_k, sin_k = cos_k, sin_k, None, None
    R = cos.shape[-1] * (2 if pair_tables else 1)
    if A * S == 0 or HQ * D == 0:
        return
    half = R // 2
    rows_whole = interleaved and not swap_layout  # (every access a whole row: else half rows decide the width)
    key = (HQ, HK, half, q.dtype, rows_whole, k is not None)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(HQ, HK, half, q.element_size(), rows_whole, k is not None)
    block_hq, block_hk, block_half, groups, warps = plan
    copy_pass = R < D and (q_out.data_ptr() != q.data_ptr() or (k is not None and k_out.data_ptr() != k.data_ptr()))
    cached = cos.dim() == 2
    k_tables = cos_k is not None
    if not k_tables:
        cos_k, sin_k = cos, sin
    if positions is not None:
        pos_strides = positions.stride()
    else:
        pos_strides = (0, 0, 0)
    n_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1
    sec = tuple(mrope_section) if mrope_section else (0, 0, 0)
    if k is not None:
        kst, lst = k.stride(), k_out.stride()
    else:
        kst = lst = (0, 0, 0, 0)
    tensors = (q, q_out, k, k_out, cos, sin, cos_k, sin_k, positions, cu_seqlens, seqlen_offsets)
    scalars = (
        S, min(cos.shape[0], sin.shape[0], cos_k.shape[0], sin_k.shape[0]) if cached else 0, n_seqs, offset,
        q.stride(), q_out.stride(), kst, lst, _table_strides(cos), _table_strides(sin),
        _table_strides(cos_k), _table_strides(sin_k),
        *pos_strides, seqlen_offsets.stride(0) if seqlen_offsets is not None else 0,
        (HQ, HK, D, half, block_hq, block_hk, block_half,
         min(triton.next_power_of_2(max(D - R, 1)), 128) if copy_pass else 1,
         interleaved, conj, copy_pass, _acc_dtype(q.dtype), _INTERPRET, cached,
         _cu_steps(n_seqs) if cu_seqlens is not None else 0,
         (2 if mrope_interleaved else 1) if mrope_section else 0, *sec, k_tables, pair_tables, swap_layout),
    )
    launch = QKLaunch((A * S, groups), tensors, scalars, warps)
    relaunch(launch, tensors)
    return launch


class QKLaunch(NamedTuple):
    """One launch of ``_rotary_qk_kernel`` as ``rotary_triton`` made it: its grid, its tensor
    arguments (q, q_out, k, k_out, cos, sin, cos_k, sin_k, positions, cu_seqlens,
    seqlen_offsets), the rest (sizes, strides, constexprs: what the tensors' shapes and strides
    decide) and its warps. ``_dispatch`` replays it on other tensors of the same geometry."""

    grid: tuple
    tensors: tuple
    scalars: tuple
    warps: int


def relaunch(launch: QKLaunch, tensors: tuple) -> None:
    """Launch ``launch``'s kernel on ``tensors`` (in its tensors' order) with its other arguments."""
    _launch_on(tensors[0].device, _rotary_qk_kernel, launch.grid, *tensors, *launch.scalars,
               num_warps=launch.warps)


# ----------------------------------------------------------------------------------------------
# Elementwise kernel (flash-attn's apply_rotary)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("n1", "n2"))
def _elementwise_kernel(
    x1_ptr, x2_ptr, c_ptr, s_ptr, o1_ptr, o2_ptr, N,
    n1, n2, n3,  # sizes of dims 1..3 (n3, the innermost, stays specialised: it decides vectorisation)
    x1s, x2s, cst, sst, o1s, o2s,  # strides, 4 each
    CFG: tl.constexpr,  # (CONJ, ACC, BLOCK, EMU)
):
    CONJ: tl.constexpr = CFG[0]
    ACC: tl.constexpr = CFG[1]
    BLOCK: tl.constexpr = CFG[2]
    EMU: tl.constexpr = CFG[3]
    x1s0, x1s1, x1s2, x1s3 = x1s
    x2s0, x2s1, x2s2, x2s3 = x2s
    cs0, cs1, cs2, cs3 = cst
    ss0, ss1, ss2, ss3 = sst
    o1s0, o1s1, o1s2, o1s3 = o1s
    o2s0, o2s1, o2s2, o2s3 = o2s
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < N
    i3 = idx % n3
    r = idx // n3
    i2 = r % n2
    r = r // n2
    i1 = r % n1
    i0 = r // n1
    x1 = _to_acc(tl.load(x1_ptr + i0 * x1s0 + i1 * x1s1 + i2 * x1s2 + i3 * x1s3, mask=m), ACC, EMU)
    x2 = _to_acc(tl.load(x2_ptr + i0 * x2s0 + i1 * x2s1 + i2 * x2s2 + i3 * x2s3, mask=m), ACC, EMU)
    c = _to_acc(tl.load(c_ptr + i0 * cs0 + i1 * cs1 + i2 * cs2 + i3 * cs3, mask=m), ACC, EMU)
    sn = _to_acc(tl.load(s_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3, mask=m), ACC, EMU)
    if CONJ:
        sn = -sn
    y1 = x1 * c - x2 * sn
    y2 = x1 * sn + x2 * c
    tl.store(o1_ptr + i0 * o1s0 + i1 * o1s1 + i2 * o1s2 + i3 * o1s3,
             _to_out(y1, o1_ptr.dtype.element_ty, EMU), mask=m)
    tl.store(o2_ptr + i0 * o2s0 + i1 * o2s1 + i2 * o2s2 + i3 * o2s3,
             _to_out(y2, o2_ptr.dtype.element_ty, EMU), mask=m)


def apply_rotary_triton(x1, x2, cos, sin, out1, out2, conj: bool) -> None:
    """flash-attn's elementwise rotation on 4-D tensors of one shape (cos/sin expanded)."""
    n = x1.numel()
    if n == 0:
        return
    block = 1024
    _launch_on(
        x1.device, _elementwise_kernel, (triton.cdiv(n, block),),
        x1, x2, cos, sin, out1, out2, n,
        x1.shape[1], x1.shape[2], x1.shape[3],
        x1.stride(), x2.stride(), cos.stride(), sin.stride(), out1.stride(), out2.stride(),
        (conj, _acc_dtype(x1.dtype), block, _INTERPRET),
    )
