"""The CPU kernel's instruction-set paths give the same bits: every case run with the row
kernels capped by ROTARY_KERNELS_CPU_ISA (avx512: no AVX512-BF16 kernel; avx2: no AVX-512 one;
default: none) equals the run with all of this CPU's paths, bit for bit, and the reference."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from rotary_kernels import _compiled

pytestmark = pytest.mark.skipif(not _compiled.HAS_EXT, reason=f"extension not built: {_compiled.IMPORT_ERROR}")

# Run in a fresh process per cap (the instruction sets are read once per process): q/k in every
# layout walk (token-major, head-major, qkv slices), rows the row kernels take whole (R = 64, 128, 256;
# R = 160 of D = 192 through rotate_tokens_avx2 on AVX-512 too),
# with a last step that overlaps the one before or is masked (R = 80, 96, partial R = 24 of D = 64
# and 32 of D = 80: bf16_rows_tail, rotate_tokens_avx512's kLast) and partial R = 64 of D = 128,
# per-pair tables, swap_layout rows (MLA),
# several blocks of tokens (S = 300), same and different cos/sin halves, NaN / denormal /
# overflowing results, out of place and in place, large (streamed) prefills in every walk, 16-bit
# tables, and bf16 rows through vdpbf16ps (AVX512-BF16) on hostile values.
_SCRIPT = r"""
import sys, torch
from rotary_kernels import _compiled
torch.manual_seed(0)
outs = []
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for layout in ("bshd", "bhsd", "qkv"):
        for D, R in ((128, 128), (64, 64), (128, 64), (96, 96), (80, 80), (80, 32), (64, 24), (256, 256), (192, 160)):
            S, Hq, Hk = 300, 5, 3
            if layout == "bhsd":
                q = torch.randn(2, Hq, S, D).to(dtype).transpose(1, 2)
                k = torch.randn(2, Hk, S, D).to(dtype).transpose(1, 2)
            elif layout == "qkv":
                qkv = torch.randn(2, S, Hq + 2 * Hk, D).to(dtype)
                q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
            else:
                q, k = torch.randn(2, S, Hq, D).to(dtype), torch.randn(2, S, Hk, D).to(dtype)
            q[0, 0, 0, :8] = torch.tensor([float("nan"), 1e-39, -1e-40, float("inf"), 0.0, -0.0, 3e38, -3e38])
            q[1, 1, 0], q[1, 2, 0] = q[1, 1, 0] * 2.0 ** -64, q[1, 2, 0] * 2.0 ** 64  # (bf16_in_window's edges)
            for same in (True, False):
                ang = torch.rand(S, R // 2) * 6.3
                ang = torch.cat([ang, ang if same else 1.3 * ang], -1)
                cos, sin = ang.cos()[None].expand(2, S, R), ang.sin()[None].expand(2, S, R)
                qo, ko = torch.empty_like(q), torch.empty_like(k)
                _compiled.ops.rotary(q, k, cos, sin, qo, ko, False, False)
                qi, ki = q.clone(), k.clone()
                _compiled.ops.rotary_inplace(qi, ki, cos, sin, False, True)
                outs += [qo, ko, qi, ki]
# Large enough (q + k >= 16 MB) for the prefetching walks and, out of place, y's non-temporal
# stores (rows taken at once): in every walk, against every cap's plain stores; bf16 also with
# bf16 tables (vdpbf16ps steps streamed; the head-major groups check them once per token).
for dtype, S, cs_dtype in ((torch.bfloat16, 2048, torch.float32), (torch.bfloat16, 2048, torch.bfloat16),
                           (torch.float16, 2048, torch.float32), (torch.float32, 1024, torch.float32)):
    ang = torch.rand(S, 64) * 6.3
    cos = torch.cat([ang, ang], -1).cos()[None].to(cs_dtype)
    sin = torch.cat([ang, ang], -1).sin()[None].to(cs_dtype)
    for layout in ("bshd", "bhsd", "qkv"):
        if layout == "bhsd":
            q = torch.randn(1, 32, S, 128).to(dtype).transpose(1, 2)
            k = torch.randn(1, 8, S, 128).to(dtype).transpose(1, 2)
        elif layout == "qkv":
            qkv = torch.randn(1, S, 48, 128).to(dtype)
            q, k = qkv[:, :, :32], qkv[:, :, 32:40]
        else:
            q, k = torch.randn(1, S, 32, 128).to(dtype), torch.randn(1, S, 8, 128).to(dtype)
        q[0, 5, 3, :4] = torch.tensor([float("nan"), 1e-39, float("inf"), 3e38])
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        _compiled.ops.rotary(q, k, cos, sin, qo, ko, False, False)
        outs += [qo, ko]
# bf16 rows of R = 96 (a masked-tail row: bf16_rows_tail) as large: y is not streamed (aligned64).
ang = torch.rand(2304, 48) * 6.3
ang = torch.cat([ang, ang], -1)
cos, sin = ang.cos()[None].to(torch.bfloat16), ang.sin()[None].to(torch.bfloat16)
q, k = torch.randn(1, 2304, 32, 96).to(torch.bfloat16), torch.randn(1, 2304, 8, 96).to(torch.bfloat16)
qo, ko = torch.empty_like(q), torch.empty_like(k)
_compiled.ops.rotary(q, k, cos, sin, qo, ko, False, False)
outs += [qo, ko]
# Interleaved (GPT-J) pairs: rows taken at once (R = 64, 128; fp32 and fp16 also R = 80, 96), one by
# one (partial R = 100), token- and head-major, same and different cos/sin per pair, in place too;
# bf16 with bf16 tables through vdpbf16ps (bf16_interleaved_tokens: zeros, NaNs and infinities
# redone; tokens with a denormal or a value over 2 in their tables taken the exact way).
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for D, R in ((128, 128), (64, 64), (80, 80), (96, 96), (128, 100)):
        for x in (torch.randn(2, 70, 5, D), torch.randn(2, 5, 70, D).transpose(1, 2)):
            x = x.to(dtype)
            x[0, 0, 0, :8] = torch.tensor([float("nan"), 1e-39, -1e-40, float("inf"), 0.0, -0.0, 3e38, -3e38])
            ang = torch.rand(70, R // 2) * 6.3
            for cs_dtype, ang2, scale in ((torch.float32, ang, 1.0), (dtype, 1.3 * ang, 1.0), (dtype, ang, 2.5)):
                full = torch.stack([ang, ang2], -1).reshape(70, R)
                cos = (full.cos() * scale)[None].repeat(2, 1, 1).to(cs_dtype)
                sin = full.sin()[None].expand(2, 70, R).to(cs_dtype)
                if scale == 1.0:
                    cos[:, 3, 5] = 1e-39  # (a denormal: that token's table refused)
                xo = torch.empty_like(x)
                _compiled.ops.rotary(x, None, cos, sin, xo, None, True, False)
                xi = x.clone()
                _compiled.ops.rotary_inplace(xi, None, cos, sin, True, True)
                outs += [xo, xi]
# Per-pair tables (cos/sin of R / 2 values, one per pair: freqs_cis-style), interleaved and rotate-half,
# bf16 rows (vdpbf16ps lanes: bf16_pair_table) and fp32 ones, with and without conj, strided rows, a
# token's table refused (a denormal; cos scaled past 2), token- and head-major.
for dtype in (torch.bfloat16, torch.float32):
    for interleaved in (True, False):
        for x in (torch.randn(2, 70, 5, 128), torch.randn(2, 5, 70, 128).transpose(1, 2)):
            x = x.to(dtype)
            x[0, 0, 0, :8] = torch.tensor([float("nan"), 1e-39, -1e-40, float("inf"), 0.0, -0.0, 3e38, -3e38])
            ang = torch.rand(70, 64) * 6.3
            for scale in (1.0, 2.5):
                cos = (ang.cos() * scale)[None].repeat(2, 1, 1).to(dtype)
                sin = ang.sin()[None].repeat(2, 1, 1).to(dtype)
                sin[:, 4, 9] = -1e-39
                cs = torch.stack([cos, sin], -1)  # (strided rows: a complex table's parts, Llama 4's freqs_cis)
                for conj, (c, s) in ((False, (cos, sin)), (True, (cos, sin)), (False, (cs[..., 0], cs[..., 1]))):
                    xo = torch.empty_like(x)
                    _compiled.ops.rotary(x, None, c, s, xo, None, interleaved, conj, pair_tables=True)
                    xi = x.clone()
                    _compiled.ops.rotary_inplace(xi, None, c, s, interleaved, conj, pair_tables=True)
                    outs += [xo, xi]
# swap_layout rows (MLA's rope: interleaved read, half-split written, and back for the backward),
# bf16 (AVX512-BF16: bf16_interleaved_tokens' halves; AVX-512F: rotate_tokens_avx512's kSwap), fp32
# and fp16 (kSwap, R = 40 and 96 with a last overlapping step), bf16 R = 96 row by row, bf16 and
# fp32 tables, a token's table refused, token- and head-major.
for dtype in (torch.bfloat16, torch.float32, torch.float16):
    for R in (64, 128, 96, 40):
        for x in (torch.randn(2, 70, 5, R), torch.randn(2, 5, 70, R).transpose(1, 2)):
            x = x.to(dtype)
            x[0, 0, 0, :8] = torch.tensor([float("nan"), 1e-39, -1e-40, float("inf"), 0.0, -0.0, 3e38, -3e38])
            ang = torch.rand(70, R // 2) * 6.3
            for cs_dtype in (torch.float32, dtype):
                cos = ang.cos()[None].repeat(2, 1, 1).to(cs_dtype)
                sin = ang.sin()[None].repeat(2, 1, 1).to(cs_dtype)
                cos[:, 6, 2] = 2.5
                for interleaved, conj in ((True, False), (False, True)):
                    xo = torch.empty_like(x)
                    _compiled.ops.rotary(x, None, cos, sin, xo, None, interleaved, conj, pair_tables=True,
                                         swap_layout=True)
                    outs.append(xo)
# Tables in the input's 16-bit dtype (converted per token: fp16 through F16C where the CPU has it),
# with and without conj.
for dtype in (torch.float16, torch.bfloat16):
    q, k = torch.randn(2, 300, 5, 128).to(dtype), torch.randn(2, 300, 3, 128).to(dtype)
    ang = torch.rand(300, 64) * 6.3
    cos = torch.cat([ang, ang], -1).cos()[None].expand(2, 300, 128).to(dtype)
    sin = torch.cat([ang, ang], -1).sin()[None].expand(2, 300, 128).to(dtype)
    for conj in (False, True):
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        _compiled.ops.rotary(q, k, cos, sin, qo, ko, False, conj)
        outs += [qo, ko]
# bf16 rows with bf16 tables: the vdpbf16ps steps (AVX512-BF16) against the other caps' exact
# arithmetic. q holds random bit patterns (NaN, inf, denormals, every exponent), values near the
# 2^-97 bound and the checked window's edges (2^-64, 2^64) and a zero row; tables scaled to 1, 2
# (the largest taken), 2.5 (refused), 1e-30 (tiny products everywhere), with a denormal value and
# a zero row; same and different halves, R = 64, 128, 256 (the rows kernel's three shapes), R = 32,
# 40, 80, 96, 160, 190 (rows with a last step masked or overlapping: bf16_rows_tail), token-
# and head-major (groups of 4 heads: the unrolled rows, whose refused steps are redone after the
# group's stores; out of place, a token's steps are checked together and all redone), out of place
# and in place.
def bits16(n):
    return torch.randint(-32768, 32768, (n,), dtype=torch.int16).view(torch.bfloat16)
for R, scale, same in ((128, 1.0, True), (128, 2.0, False), (64, 2.5, True), (256, 1e-30, True), (128, 1.0, False),
                       (64, 1.0, False), (80, 1.0, True), (96, 2.0, False), (40, 1.0, True), (32, 1.0, False),
                       (160, 1.0, False), (190, 1e-30, True)):
    S = 97
    q = torch.randn(1, S, 6, R).to(torch.bfloat16)
    m = torch.rand(q.shape) < 0.3
    q[m] = bits16(int(m.sum()))
    m = torch.rand(q.shape) < 0.2
    q[m] = (torch.randn(int(m.sum())) * 2.0 ** -97).to(torch.bfloat16)
    for edge in (2.0 ** -64, 2.0 ** 64):  # the edges of the steps' window (bf16_in_window)
        m = torch.rand(q.shape) < 0.05
        q[m] = (torch.randn(int(m.sum())) * edge).to(torch.bfloat16)
    q[0, 3, 2] = 0
    ang = torch.rand(S, R // 2) * 6.3
    ang = torch.cat([ang, ang if same else 0.7 * ang], -1)
    cos, sin = (ang.cos() * scale)[None].to(torch.bfloat16), (ang.sin() * scale)[None].to(torch.bfloat16)
    cos[0, 7, 3] = 1e-39
    sin[0, 9] = 0
    for conj in (False, True):
        for x in (q, q.transpose(1, 2).contiguous().transpose(1, 2)):
            k = x[:, :, :2]
            qo, ko = torch.empty_like(x), torch.empty_like(k)
            _compiled.ops.rotary(x, k, cos, sin, qo, ko, False, conj)
            qi = x.clone()
            _compiled.ops.rotary_inplace(qi, None, cos, sin, False, conj)
            outs += [qo, ko, qi]
# bf16 rows with a last step overlapping the one before (R = 80, 96), ordinary values but a zero
# pair in the first step: that step fails the check and is redone while the last one passes (in
# a head-major group of 4, in place, the last step must then wait: it overlaps the redone pairs).
for R in (80, 96):
    x = torch.randn(1, 4, 50, R).to(torch.bfloat16).transpose(1, 2)
    x[:, ::3, :, 1] = x[:, ::3, :, R // 2 + 1] = 0  # (pair 1 rotates to zeros)
    ang = torch.rand(50, R // 2) * 6.3
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos()[None].to(torch.bfloat16), ang.sin()[None].to(torch.bfloat16)
    for cs in ((cos, sin), (cos.float(), sin.float())):
        xo = torch.empty_like(x)
        _compiled.ops.rotary(x, None, *cs, xo, None, False, False)
        xi = x.clone()
        _compiled.ops.rotary_inplace(xi, None, *cs, False, False)
        outs += [xo, xi]
torch.save(outs, sys.argv[1])
"""


def _run(tmp_path, cap):
    env = {k: v for k, v in os.environ.items() if k != "ROTARY_KERNELS_CPU_ISA"}
    if cap:
        env["ROTARY_KERNELS_CPU_ISA"] = cap
    out = tmp_path / f"{cap or 'all'}.pt"
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("isa"), None)


@pytest.mark.parametrize("cap", ["avx512", "avx2", "default"])
def test_capped_paths_give_the_same_bits(full, cap, tmp_path):
    capped = _run(tmp_path, cap)
    assert len(capped) == len(full)
    for i, (a, b) in enumerate(zip(capped, full)):
        bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
        assert torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)), f"output {i} differs under {cap}"


def test_unknown_cap_is_an_error(tmp_path):
    env = dict(os.environ, ROTARY_KERNELS_CPU_ISA="avx9000")
    code = "import torch, rotary_kernels as rk; x = torch.randn(1, 2, 1, 8); c = torch.randn(1, 1, 8); rk.apply_rotary_transformers(x, x, c, c)"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "ROTARY_KERNELS_CPU_ISA must be one of" in p.stderr


@pytest.mark.parametrize("source", ["rotary_cpu.cpp", "rotary_cpu_bf16.cpp", "rotary_cpu_f16.cpp"])
def test_sources_compile_without_the_x86_paths(source):
    """What an aarch64 or clang build compiles (the portable loops alone: RK_X86_SIMD unset, as
    ROTARY_KERNELS_NO_X86_SIMD forces here) compiles: no intrinsic outside the guard. (AVX-512 code
    once landed outside it, which broke every non-x86 build; no test here runs on one.)"""
    root = Path(__file__).resolve().parents[1] / "rotary_kernels"
    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), sysconfig.get_paths()["include"], root)]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-DROTARY_KERNELS_NO_X86_SIMD",
           *includes, str(root / "cpu" / source)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
