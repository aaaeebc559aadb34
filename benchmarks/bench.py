"""Side-by-side RoPE benchmark: every implementation, realistic shapes, forward / backward /
forward+backward, out of place and in place; time, GB/s, fraction of the measured copy
bandwidth, speedup vs eager, peak memory. Writes a Markdown report, JSON and PNG plots.

    python benchmarks/bench.py [--device cuda|cpu] [--quick] [--out benchmarks/results/<device>]
                               [--layouts ...] [--shapes ...] [--dtypes ...] [--impls ...] [--no-features]
                               [--stat min] [--threads N] [--rounds N] [--keep-freed-memory]

Layouts (the q/k memory layouts the API accepts; the same bytes in each, so a layout that is
slower than the others shows as such): transformers' transposed view of [B, S, H, D] (the
default; every shape), and on the llama3-8b shape also contiguous [B, H, S, D], contiguous
[B, S, H, D] (unsqueeze_dim=2), packed tokens [T, H, D] and slices of a packed qkv
[B, S, Hq + 2 Hk, D] (unsqueeze_dim=2). The report has a table per layout and a layout summary
(worst and best layout per case).

Timing: GPU: CUDA events around each call, with the L2 flushed (256 MB written) before it and
the GPU held busy while the host enqueues the call (rotary_kernels.demo.gpu_hold), so a row is
the GPU's time alone (the host time of a call, what eager decoding also pays, is measured on its
own: scripts/gpu_session.sh's host step); median and interquartile range of the per-call times.
CPU: wall clock per call (the machine's caches may hold the tensors: that is the CPU's real
working condition for these sizes); out of place calls there include first-touch page faults of
their freshly allocated outputs, which eager and torch.compile pay as well (a plain clone()
too): glibc maps a block of 32 MB or more afresh unless the top of its heap has room, which
depends on what ran before, so one layout's row may pay ~8k faults a 32 MB output (10+ ms on a
VM) and the next none. --keep-freed-memory makes glibc keep freed memory (no mmap, no trimming,
like the caching allocators jemalloc and tcmalloc): outputs reuse touched pages and the rows
time the kernels alone. --rounds N measures every case N times, a round after another, and keeps
each row's best time (and the best copy time per case): on a shared machine the cases of one
round run seconds apart, under different neighbours, which a single round reports as differences
between layouts. On CPU each case's tensors are placed anew each round (placement_pad), so that
a row's best is over N placements, not one.

Bytes (the minimum one call must move, each tensor read or written once):
    forward, in place, backward: 2 * (|q| + |k|) * itemsize + |cos| + |sin|   (|x| = bytes of x)
    forward+backward: twice that.
GB/s = bytes / median time (best time with --stat min); "% copy" = GB/s / the bandwidth of a plain tensor copy of q + k's
size measured in the same run (bytes read + written; same sizes, so the same caches). The large
copy (1 GiB on GPU) is reported too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
from pathlib import Path

import torch

import rotary_kernels as rk
from rotary_kernels.demo import time_fn
from rotary_kernels.reference import rotate_half

# name: (Hq, Hk, D, R)
SHAPES = {
    "llama3-8b": (32, 8, 128, 128),
    "llama3-70b": (64, 8, 128, 128),
    "qwen-partial": (32, 8, 128, 64),  # rotary on the first half of the head dim
    "phi-d80": (32, 32, 80, 80),
    "gemma-d256": (16, 8, 256, 256),  # Gemma 2/3 9B: head dim 256
}


def token_sets(device, quick):
    """(label, B, S): decode (one token for one sequence: the per-call overhead; for a batch of
    64) and prefill/training (B*S tokens)."""
    decode = [("decode-1", 1, 1), ("decode", 64, 1)]
    if device.type == "cpu":
        return decode + ([("2k", 1, 2048)] if quick else [("512", 1, 512), ("2k", 1, 2048)])
    return decode + ([("16k", 4, 4096)] if quick else [("4k", 1, 4096), ("16k", 4, 4096), ("64k", 8, 8192)])


# name: description (the report's table headings). The first is transformers' own layout.
LAYOUTS = {
    "bhsd_view": "transposed view [B, H, S, D] of [B, S, H, D] (transformers)",
    "bhsd": "contiguous [B, H, S, D] (heads outer)",
    "bshd": "contiguous [B, S, H, D] (unsqueeze_dim=2)",
    "thd": "packed tokens [T, H, D] (T = B*S)",
    "qkv": "slices of a packed qkv [B, S, Hq+2Hk, D] (unsqueeze_dim=2)",
}
LAYOUT_SHAPES = ("llama3-8b",)  # shapes measured in every layout (the others: transformers' view only)


def make(B, S, Hq, Hk, D, R, dtype, cs_dtype, device):
    """q/k as transformers' transposed views, cos/sin [B, S, R]."""
    return make_layout(B, S, Hq, Hk, D, R, dtype, cs_dtype, device)[:4]


def make_layout(B, S, Hq, Hk, D, R, dtype, cs_dtype, device, layout="bhsd_view"):
    """(q, k, cos, sin, unsqueeze_dim) with q/k in `layout` (see LAYOUTS); the same values in
    every layout."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, S, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, S, Hk, D, generator=g).to(dtype)
    pos = torch.arange(S, dtype=torch.float32)[None, :, None] + torch.randint(0, 1000, (B, 1, 1), generator=g)
    inv = 1.0 / 500000.0 ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    ang = torch.cat([pos * inv, pos * inv], -1)
    cos, sin = ang.cos().to(cs_dtype).to(device), ang.sin().to(cs_dtype).to(device)
    if layout == "bhsd_view":
        return q.to(device).transpose(1, 2), k.to(device).transpose(1, 2), cos, sin, 1
    if layout == "bhsd":
        return q.transpose(1, 2).contiguous().to(device), k.transpose(1, 2).contiguous().to(device), cos, sin, 1
    if layout == "bshd":
        return q.to(device), k.to(device), cos, sin, 2
    if layout == "thd":
        return q.flatten(0, 1).to(device), k.flatten(0, 1).to(device), cos.flatten(0, 1), sin.flatten(0, 1), 1
    if layout == "qkv":
        qkv = torch.cat([q, k, torch.zeros_like(k)], 2).to(device)  # v's values do not matter
        return qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk], cos, sin, 2
    raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")


def as_bhsd(q, k, cos, sin, unsqueeze_dim):
    """Views (no copies) of any layout as transformers' [B, H, S, D] with cos/sin [B, S, R], for
    the peers that take only that form."""
    if q.dim() == 3:  # packed tokens [T, H, D], cos [T, R]
        q, k, cos, sin, unsqueeze_dim = q[None], k[None], cos[None], sin[None], unsqueeze_dim + 1
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q, k, cos, sin


def in_layout(fn):
    """A peer that takes transformers' [B, H, S, D] only (fn on as_bhsd's views), called on any
    layout: its outputs viewed back in the caller's layout, which the benchmark's gradients have."""
    def call(q, k, cos, sin, unsqueeze_dim):
        ud = unsqueeze_dim + (q.dim() == 3)
        outs = fn(*as_bhsd(q, k, cos, sin, unsqueeze_dim))
        outs = [o.transpose(1, 2) if ud == 2 else o for o in outs]
        return tuple(o[0] if q.dim() == 3 else o for o in outs)
    return call


def eager(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb (with the caller-side split partial-rotary models do)."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if r == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    qr, kr = q[..., :r], k[..., :r]
    return (torch.cat([qr * cos + rotate_half(qr) * sin, q[..., r:]], -1),
            torch.cat([kr * cos + rotate_half(kr) * sin, k[..., r:]], -1))


def peers(device):
    """name -> (forward fn(q, k, cos, sin, unsqueeze_dim) -> (q_embed, k_embed)) or a string
    saying why missing."""
    out = {"eager (transformers)": eager}  # first: the baseline every speedup refers to
    for be in rk.available_backends(device):
        if be != "reference":
            out[f"rotary_kernels[{be}]"] = (lambda be: lambda q, k, c, s, ud: rk.apply_rotary_transformers(
                q, k, c, s, ud, backend=be))(be)
    try:
        # Every (shape, dtype) is its own graph: allow them all rather than falling back to eager.
        torch._dynamo.config.cache_size_limit = 1024
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 1024
        compiled = torch.compile(eager, dynamic=False)
        out["torch.compile(eager)"] = compiled
    except Exception as e:  # pragma: no cover
        out["torch.compile(eager)"] = f"torch.compile failed: {e}"
    if device.type != "cuda":
        for name in ("liger rope", "flash-attn triton rotary", "kernels-community/rotary"):
            out[name] = "GPU only"
        return out
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        out["liger rope"] = in_layout(LigerRopeFunction.apply)
    except Exception as e:
        out["liger rope"] = f"not installed ({type(e).__name__})"
    try:
        from flash_attn.layers.rotary import apply_rotary_emb as fa_rotary

        def fa(q, k, c, s):  # [B, S, H, D] layout, cos/sin [S, R/2] (one position row per token)
            r = c.shape[-1] // 2
            return (fa_rotary(q.transpose(1, 2), c[0, :, :r], s[0, :, :r]).transpose(1, 2),
                    fa_rotary(k.transpose(1, 2), c[0, :, :r], s[0, :, :r]).transpose(1, 2))

        out["flash-attn triton rotary"] = in_layout(fa)
    except Exception as e:
        out["flash-attn triton rotary"] = f"not installed ({type(e).__name__})"
    try:
        import kernels

        hub = kernels.get_kernel("kernels-community/rotary", version=2)
        out["kernels-community/rotary"] = lambda q, k, c, s, ud: hub.apply_rotary_transformers(q, k, c, s, ud)
    except Exception as e:
        out["kernels-community/rotary"] = f"not loadable offline ({type(e).__name__})"
    return out


def keep_freed_memory():
    """glibc: serve every block from the heap and never give freed memory back to the OS
    (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GB), so that reused outputs fault no pages."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(-4, 0) != 1 or libc.mallopt(-1, 2**31 - 1) != 1:
        raise RuntimeError("mallopt failed (not glibc?)")


# "median" (default) or "min": the statistic of the per-call times each row reports (and the copy
# it is compared with). "min" (best of the calls) for machines shared with other work, where a
# call whose thread was descheduled takes a whole scheduler slice (4-16 ms) and medians measure
# the neighbours.
STAT = "median"
ROUNDS = 1  # --rounds


def _stat(times):
    return min(times) if STAT == "min" else statistics.median(times)


def copy_bandwidth(device, numel=None, dtype=torch.float32) -> float:
    """GB/s (read + written) of a tensor copy: a large one by default, else one of `numel`
    elements (the size of a case's q + k, so that both see the same caches)."""
    numel = numel or ((1 << 28) if device.type == "cuda" else (1 << 26))
    src = torch.empty(numel, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _stat(time_fn(lambda: dst.copy_(src), device, reps=20 if STAT == "min" else 10))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def measure(fn, device):
    times = time_fn(fn, device)
    q1, med, q3 = statistics.quantiles(times, n=4)
    return (min(times) if STAT == "min" else med), q3 - q1


def peak_mb(fn, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(device, quick, dtypes, cs_modes, layouts=tuple(LAYOUTS), shapes=None, impl_filter=None):
    impls = peers(device)
    if impl_filter:
        impls = {n: f for n, f in impls.items() if n.startswith("eager") or any(x in n for x in impl_filter)}
    copy_gbs = copy_bandwidth(device)
    rows, missing = [], {n: f for n, f in impls.items() if isinstance(f, str)}
    impls = {n: f for n, f in impls.items() if not isinstance(f, str)}
    shapes = shapes or (("llama3-8b", "qwen-partial") if quick else tuple(SHAPES))
    for shape in shapes:
        Hq, Hk, D, R = SHAPES[shape]
        for label, B, S in token_sets(device, quick):
            for dtype in dtypes:
                for cs_mode in cs_modes:
                    cs_dtype = torch.float32 if cs_mode == "fp32" else dtype
                    for layout in (layouts if shape in LAYOUT_SHAPES else layouts[:1]):
                        rows += _run_case(device, impls, missing, shape, label, B, S, Hq, Hk, D, R, dtype, cs_dtype,
                                          cs_mode, layout)
                    print(f"  {shape} {label} {dtype} cos={cs_mode}: done", file=sys.stderr)
    return rows, missing, copy_gbs


_PLACEMENT = random.Random(0)


def placement_pad(device):
    """CPU: a buffer of random size (under 1 MB, a multiple of 64 bytes), allocated before a
    case's tensors and held while it runs, so that each round places them elsewhere in the heap.
    On a shared 2-core VM the same call on the same bytes (512 tokens, [B, S, H, D], six
    placements side by side, order rotated) took 0.61-1.02 ms in fp32 and 0.22-0.26 ms in bf16
    by where its buffers lay: with one placement per case that shows as a difference between
    layouts. None on GPUs (the caching allocator; L2 flushed before each call)."""
    if device.type != "cpu":
        return None
    return torch.empty(_PLACEMENT.randrange(0, 1 << 20, 64), dtype=torch.uint8)


def _run_case(device, impls, missing, shape, label, B, S, Hq, Hk, D, R, dtype, cs_dtype, cs_mode, layout):
    """Every implementation and pass on one case; the copy it is compared with is measured
    alongside (same size, so the same caches)."""
    pad = placement_pad(device)  # noqa: F841 (held until the case ends)
    q, k, cos, sin, ud = make_layout(B, S, Hq, Hk, D, R, dtype, cs_dtype, device, layout)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * cos.element_size()
    gq, gk = torch.randn_like(q), torch.randn_like(k)  # the layout of the outputs
    case_copy = copy_bandwidth(device, q.numel() + k.numel(), dtype)
    rows, base = [], {}
    for name, fn in impls.items():
        for pss in ("fwd", "bwd", "fwd+bwd", "inplace"):
            if pss == "inplace" and not name.startswith("rotary_kernels"):
                continue
            call = _call(pss, name, fn, q, k, cos, sin, ud, gq, gk)
            try:
                call()
                med, iqr = measure(call, device)
                mem = peak_mb(call, device)
            except Exception as e:
                missing.setdefault(name, f"failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            b = nbytes * (2 if pss == "fwd+bwd" else 1)
            if name.startswith("eager"):
                base[pss] = med
            ref = base.get("fwd" if pss == "inplace" else pss)
            rows.append(dict(shape=shape, tokens=label, B=B, S=S, dtype=str(dtype)[6:], cos=cs_mode,
                             layout=layout, pass_=pss, impl=name, ms=med, iqr=iqr,
                             gbs=b / med / 1e6, frac=b / med / 1e6 / case_copy,
                             copy_gbs=case_copy, speedup=(ref / med) if ref else None,
                             peak_mb=mem))
    return rows


def best_of_rounds(rounds):
    """One row per case, implementation and pass: the best time over the rounds, with GB/s,
    % copy (against the case's best copy) and speedup (against eager's best) recomputed."""
    key = lambda r: (r["shape"], r["tokens"], r["dtype"], r["cos"], r["layout"], r["pass_"], r["impl"])
    case = lambda r: key(r)[:5]
    best, copy = {}, {}
    for r in (r for rows in rounds for r in rows):
        copy[case(r)] = max(copy.get(case(r), 0.0), r["copy_gbs"])
        if key(r) not in best or r["ms"] < best[key(r)]["ms"]:
            best[key(r)] = dict(r, nbytes=r["gbs"] * r["ms"] * 1e6)
    eager = {key(r)[:6]: r["ms"] for r in best.values() if r["impl"].startswith("eager")}
    rows = []
    for r in best.values():
        ref = eager.get(case(r) + ("fwd" if r["pass_"] == "inplace" else r["pass_"],))
        b = r.pop("nbytes")
        rows.append(dict(r, gbs=b / r["ms"] / 1e6, frac=b / r["ms"] / 1e6 / copy[case(r)], copy_gbs=copy[case(r)],
                         speedup=(ref / r["ms"]) if ref else None))
    return rows


def _call(pss, name, fn, q, k, cos, sin, ud, gq, gk):
    if pss == "fwd":
        return lambda: fn(q, k, cos, sin, ud)
    if pss == "inplace":  # in the layout itself (a packed qkv: its q and k slices rotated in place)
        base = q._base if q._base is not None and q._base is k._base else None
        if base is not None:
            buf = base.clone()
            qi, ki = buf.as_strided(q.shape, q.stride(), q.storage_offset()), buf.as_strided(
                k.shape, k.stride(), k.storage_offset())
        else:
            qi, ki = q.clone(), k.clone()

        def inplace():
            with torch.no_grad():
                rk.apply_rotary_transformers_(qi, ki, cos, sin, ud, backend=name[len("rotary_kernels["):-1])
        return inplace
    qq, kk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    if pss == "fwd+bwd":  # autograd.grad: fresh gradients, no accumulation into .grad
        return lambda: torch.autograd.grad(fn(qq, kk, cos, sin, ud), (qq, kk), (gq, gk))
    outs = fn(qq, kk, cos, sin, ud)  # bwd: the backward pass alone, graph kept
    return lambda: torch.autograd.grad(outs, (qq, kk), (gq, gk), retain_graph=True)


def run_features(device, quick):
    """Features on the llama3-8b shape, bf16 q/k, fp32 cos/sin: ours (each backend) against the
    eager way to get the same result (token positions: gather cos/sin rows with PyTorch, then
    transformers' rotation; table conventions: the peer model's own formula on gathered tables).
    Bytes: q and k read and written once, plus one cos and one sin row per token (and per mrope
    axis; half rows for per-pair tables) and the int64 positions."""
    Hq, Hk, D, R = SHAPES["llama3-8b"]
    B, S = (1, 2048) if device.type == "cpu" else (4, 4096)
    P = 8192
    dtype = torch.bfloat16
    q, k, _, _ = make(B, S, Hq, Hk, D, R, dtype, torch.float32, device)
    inv = rk.freqs.rope_inv_freq(R, 500000.0)[0].to(device)
    cos, sin = rk.freqs.rope_cos_sin_cache(inv, P)
    g = torch.Generator(device="cpu").manual_seed(0)
    pos = torch.randint(0, P, (B, S), generator=g).to(device)
    pos3 = torch.randint(0, P, (3, B, S), generator=g).to(device)
    section = (16, 24, 24)
    cu = torch.tensor([0, S // 2, S, 3 * S // 2, 2 * S][: B + 1] if B > 1 else [0, S // 3, S], dtype=torch.int32,
                      device=device)
    T = int(cu[-1])
    qt = q.transpose(1, 2).reshape(B * S, Hq, D)[:T]
    kt = k.transpose(1, 2).reshape(B * S, Hk, D)[:T]
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, generator=g).to(dtype).to(device)
    qk_bytes = 2 * (q.numel() + k.numel()) * q.element_size()
    row_bytes = 2 * R * 4

    def eager_positions():
        return eager(q, k, cos[pos], sin[pos])

    def eager_varlen():
        t = torch.arange(T, device=device)
        seq = torch.searchsorted(cu[1:].long(), t, right=True)
        p = t - cu.long()[seq]
        c, s = cos[p][:, None], sin[p][:, None]
        return qt * c + rotate_half(qt) * s, kt * c + rotate_half(kt) * s

    def eager_qkv_():
        qq, kk = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
        c, s = cos[pos][:, :, None], sin[pos][:, :, None]
        qq.copy_(qq * c + rotate_half(qq) * s)
        kk.copy_(kk * c + rotate_half(kk) * s)

    half_c, half_s = cos[pos][..., : R // 2].unsqueeze(1), sin[pos][..., : R // 2].unsqueeze(1)  # per pair
    full_c, full_s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    freqs_cis = torch.polar(torch.ones_like(cos[pos][..., : R // 2]), torch.atan2(sin, cos)[pos][..., : R // 2])

    def eager_pair_tables():  # gpt-oss's _apply_rotary_emb on [B, S, R/2] tables
        def one(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * half_c - x2 * half_s, x2 * half_c + x1 * half_s), dim=-1)
        return one(q), one(k)

    def eager_mla():  # DeepSeek-V3's apply_rotary_pos_emb_interleave
        def one(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat((x1 * half_c - x2 * half_s, x2 * half_c + x1 * half_s), dim=-1)
        return one(q), one(k)

    qs, ks = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D] as Llama 4 passes them

    def eager_complex():  # Llama 4's apply_rotary_emb
        def one(x):
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs_cis[:, :, None, :]).flatten(3).type_as(x)
        return one(qs), one(ks)

    angles = torch.outer(torch.arange(P, device=device, dtype=torch.float32), inv)
    te_freqs = torch.cat((angles, angles), -1)[:, None, None, :]  # TransformerEngine's [S2, 1, 1, R]
    q_sbhd = q.permute(2, 0, 1, 3)  # [S, B, H, D] views, TE's default layout

    def eager_te():  # TransformerEngine's unfused apply_rotary_pos_emb (fp32 cos/sin, as its fused kernel)
        f = te_freqs[:S]
        return q_sbhd * f.cos() + rotate_half(q_sbhd) * f.sin()

    cos_k, sin_k = rk.freqs.rope_cos_sin_cache(inv * 0.5, P)  # k's own tables (another frequency scale)

    def eager_k_tables():  # flash-attn's cos_k/sin_k: q and k each with their own gathered rows
        c, s, ck, sk = (t[pos].unsqueeze(1) for t in (cos, sin, cos_k, sin_k))
        return q * c + rotate_half(q) * s, k * ck + rotate_half(k) * sk

    def eager_mrope():
        sel = [torch.cat([m[i % 3] for i, m in enumerate(t[pos3].split(list(section) * 2, dim=-1))], dim=-1)
               for t in (cos, sin)]
        return eager(q, k, *sel)

    cases = {  # name: (eager fn, ours fn(backend), bytes)
        "positions gather": (eager_positions,
                             lambda be: rk.apply_rotary_transformers(q, k, cos, sin, positions=pos, backend=be),
                             qk_bytes + B * S * (row_bytes + 8)),
        "varlen cu_seqlens": (eager_varlen,
                              lambda be: rk.apply_rotary_transformers(qt, kt, cos, sin, cu_seqlens=cu, backend=be),
                              2 * (qt.numel() + kt.numel()) * 2 + T * row_bytes),
        "packed qkv in place": (eager_qkv_,
                                lambda be: rk.apply_rotary_qkv_(qkv, cos, sin, Hq, Hk, positions=pos, backend=be),
                                2 * B * S * (Hq + Hk) * D * 2 + B * S * (row_bytes + 8)),
        "mrope positions": (eager_mrope,
                            lambda be: rk.apply_rotary_transformers(q, k, cos, sin, positions=pos3,
                                                                    mrope_section=section, backend=be),
                            qk_bytes + B * S * 3 * (row_bytes + 8)),
        "separate k tables": (eager_k_tables,
                              lambda be: rk.apply_rotary_transformers(q, k, cos, sin, positions=pos, cos_k=cos_k,
                                                                      sin_k=sin_k, backend=be),
                              qk_bytes + B * S * (2 * row_bytes + 8)),
        "per-pair tables (gpt-oss)": (eager_pair_tables,
                                      lambda be: rk.apply_rotary_transformers(q, k, half_c[:, 0], half_s[:, 0],
                                                                              pair_tables=True, backend=be),
                                      qk_bytes + B * S * row_bytes // 2),
        "MLA interleave (DeepSeek-V3)": (eager_mla,
                                         lambda be: rk.apply_rotary_pos_emb_interleave(q, k, full_c[:, 0], full_s[:, 0],
                                                                                       backend=be),
                                         qk_bytes + B * S * row_bytes // 2),
        "TransformerEngine sbhd, angle table": (eager_te,
                                                lambda be: rk.apply_rotary_pos_emb_te(q_sbhd, te_freqs, "sbhd",
                                                                                      backend=be),
                                                q.numel() * 4 + S * R * 4),
        "complex freqs_cis (Llama 4)": (eager_complex,
                                        lambda be: rk.apply_rotary_emb_complex(qs, ks, freqs_cis, backend=be),
                                        qk_bytes + B * S * row_bytes // 2),
    }
    rows = []
    with torch.no_grad():
        for feature, (eager_fn, ours, nbytes) in cases.items():
            impls = {"eager (gather + transformers)": eager_fn}
            for be in rk.available_backends(device):
                if be != "reference":
                    impls[f"rotary_kernels[{be}]"] = (lambda be: lambda: ours(be))(be)
            base = None
            for name, fn in impls.items():
                fn()
                med, iqr = measure(fn, device)
                base = base or med
                rows.append(dict(feature=feature, tokens=B * S, impl=name, ms=med, iqr=iqr, gbs=nbytes / med / 1e6,
                                 speedup=base / med))
            print(f"  feature {feature}: done", file=sys.stderr)
    return rows


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, isa = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        isa = [f.upper() for f in ("avx512f", "avx2", "f16c") if f in flags]
    except (OSError, StopIteration):
        pass
    return f"{model} CPU ({', '.join(isa) or 'no AVX'}), {torch.get_num_threads()} threads"


def layout_summary(rows):
    """Markdown lines: for each of our implementations and each case measured in several
    layouts, the best and the worst layout (median ms, % copy) and worst / best."""
    cases = {}
    for r in rows:
        if r["impl"].startswith("rotary_kernels"):
            key = (r["impl"], r["shape"], r["tokens"], r["dtype"], r["cos"], r["pass_"])
            cases.setdefault(key, []).append(r)
    cases = {k: v for k, v in cases.items() if len(v) > 1}
    if not cases:
        return []
    lines = ["## Layout summary", "",
             f"The same case (same bytes) in every layout measured; worst / best is the ratio of their {STAT} times. "
             "Layout names: " + "; ".join(f"`{k}` = {v}" for k, v in LAYOUTS.items()) + ".", "",
             "| implementation | shape | tokens | dtype | cos | pass | best layout | ms | % copy | worst layout | ms "
             "| % copy | worst / best |",
             "|---|---|---|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    for (impl, shape, tokens, dtype, cs, pss), rs in cases.items():
        best, worst = min(rs, key=lambda r: r["ms"]), max(rs, key=lambda r: r["ms"])
        lines.append(f"| {impl} | {shape} | {tokens} | {dtype} | {cs} | {pss} | {best['layout']} | {best['ms']:.3f} | "
                     f"{100 * best['frac']:.0f}% | {worst['layout']} | {worst['ms']:.3f} | {100 * worst['frac']:.0f}% | "
                     f"{worst['ms'] / best['ms']:.2f} |")
    return lines + [""]


def write_report(rows, missing, copy_gbs, device, out: Path, features=(), malloc=None):
    out.mkdir(parents=True, exist_ok=True)
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "-"

    meta = dict(device=device_name(device), date=datetime.date.today().isoformat(), stat=STAT + (
                f" (best of {ROUNDS} rounds)" if ROUNDS > 1 else ""), torch=torch.__version__,
                triton=ver("triton"), rotary_kernels=rk.__version__, transformers=ver("transformers"),
                cuda=torch.version.cuda, copy_gbs=copy_gbs, python=platform.python_version())
    if malloc:
        meta["malloc"] = malloc
    (out / "results.json").write_text(json.dumps(dict(meta=meta, missing=missing, rows=rows, features=list(features)),
                                                  indent=1))
    lines = [f"# RoPE benchmark: {meta['device']}", "",
             " | ".join(f"{k} {v}" for k, v in meta.items() if k != "copy_gbs"), "",
             f"Large-copy bandwidth: **{copy_gbs:.0f} GB/s** (bytes read + written). "
             "GB/s counts the minimum bytes of each call; % copy compares with a plain copy of q + k's size "
             "(see benchmarks/bench.py); speedup is vs eager transformers for the same pass (in place: vs "
             "its forward).", ""]
    if missing:
        lines += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in missing.items()), ""]
    lines += layout_summary(rows)
    for layout in dict.fromkeys(r.get("layout", "bhsd_view") for r in rows):
        lines += [f"## Layout: {LAYOUTS.get(layout, layout)}", "",
                  f"| shape | tokens | dtype | cos | pass | implementation | {STAT} ms | IQR ms | GB/s | % copy "
                  "| vs eager | peak MB |",
                  "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r.get("layout", "bhsd_view") != layout:
                continue
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            pm = "-" if r["peak_mb"] != r["peak_mb"] else f"{r['peak_mb']:.0f}"
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['dtype']} | {r['cos']} | {r['pass_']} | {r['impl']} | "
                         f"{r['ms']:.4f} | {r['iqr']:.4f} | {r['gbs']:.1f} | {100 * r['frac']:.0f}% | {sp} | {pm} |")
        lines.append("")
    if features:
        lines += ["", "## Features (llama3-8b, bf16 q/k, fp32 [8192, 128] cos/sin cache, forward)", "",
                  "Eager = gather the cos/sin rows with PyTorch ops, then transformers' rotation (table "
                  "conventions: the peer model's own formula on the gathered tables). GB/s counts q, k and one "
                  "cos/sin row (+ positions) per token (see `run_features`).", "",
                  "| feature | tokens | implementation | median ms | IQR ms | GB/s | vs eager |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in features:
            lines.append(f"| {r['feature']} | {r['tokens']} | {r['impl']} | {r['ms']:.4f} | {r['iqr']:.4f} | "
                         f"{r['gbs']:.1f} | {r['speedup']:.2f}x |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    try:
        plot(rows, out, meta)
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
    return out / "README.md"


def plot(rows, out, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for pss in ("fwd", "fwd+bwd"):
        sel = [r for r in rows if r["shape"] == "llama3-8b" and r["pass_"] == pss and r["cos"] == rows[0]["cos"]
               and r["dtype"] == rows[0]["dtype"] and r.get("layout", "bhsd_view") == "bhsd_view"]
        if not sel:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = [r for r in sel if r["impl"] == impl]
            x = [r["B"] * r["S"] for r in pts]
            ax1.plot(x, [r["gbs"] for r in pts], "o-", label=impl)
            ax2.plot(x, [100 * r["frac"] for r in pts], "o-", label=impl)
        for ax, yl in ((ax1, "GB/s"), (ax2, "% of measured copy bandwidth")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens (B*S)")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
        ax1.legend(fontsize=7)
        fig.suptitle(f"llama3-8b {sel[0]['dtype']} {pss} - {meta['device']} ({meta['date']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"llama3-8b_{pss.replace('+', '_')}.png", dpi=110)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma-separated q/k layouts for the {', '.join(LAYOUT_SHAPES)} shape, of: "
                        f"{', '.join(LAYOUTS)} (default: all; other shapes run the first one)")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of: {', '.join(SHAPES)} (default: all)")
    p.add_argument("--dtypes", default=None, help="comma-separated, of: bfloat16, float16, float32")
    p.add_argument("--cos", default=None, help="comma-separated cos/sin dtype modes, of: same, fp32")
    p.add_argument("--impls", default=None,
                   help="comma-separated substrings: measure only the implementations that contain one "
                        "(eager, the baseline, always)")
    p.add_argument("--no-features", action="store_true", help="skip the token-position feature table")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="per-call statistic reported (min: best of the calls, for a shared machine)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every case this many times and keep each row's best (see Timing)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: glibc keeps freed memory, so out-of-place rows pay no first-touch page faults "
                        "(see Timing in this file's docstring)")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    global STAT, ROUNDS
    STAT, ROUNDS = args.stat, args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = [torch.bfloat16, torch.float32] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    cs_modes = args.cos.split(",") if args.cos else (["same"] if args.quick else ["same", "fp32"])
    layouts = tuple(args.layouts.split(","))
    for name in layouts:
        if name not in LAYOUTS:
            p.error(f"unknown layout {name!r}")
    shapes = tuple(args.shapes.split(",")) if args.shapes else None
    rounds = [run(device, args.quick, dtypes, cs_modes, layouts, shapes, args.impls.split(",") if args.impls else None)
              for _ in range(args.rounds)]
    rows = best_of_rounds([r[0] for r in rounds]) if args.rounds > 1 else rounds[0][0]
    missing, copy_gbs = rounds[0][1], max(r[2] for r in rounds)
    features = [] if args.no_features else run_features(device, args.quick)
    out = args.out or Path(__file__).parent / "results" / ("cuda-" + torch.cuda.get_device_name(device).replace(" ", "_")
                                                          if device.type == "cuda" else "cpu")
    malloc = "keeps freed memory (--keep-freed-memory)" if args.keep_freed_memory else None
    print(f"wrote {write_report(rows, missing, copy_gbs, device, out, features, malloc)}")


if __name__ == "__main__":
    main()
