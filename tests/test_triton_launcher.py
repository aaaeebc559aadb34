"""The Triton launchers called directly (no validation in front): edge cases of the kernels
themselves, under the interpreter on CPU (TRITON_INTERPRET=1, tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

from rotary_kernels import _dispatch
from rotary_kernels.reference import rotary_reference

T = _dispatch.TRITON
needs_triton = pytest.mark.skipif(
    T is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton backend not runnable here")
pytestmark = needs_triton

CPU_INTERP = not torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ref(x, cos, sin, interleaved=False):
    """Canonical x [A, S, H, D], cos/sin [A, S, R]."""
    return rotary_reference(x, cos, sin, unsqueeze_dim=2, interleaved=interleaved)


def _tables(A, S, R, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(A, S, R, generator=g) * 6.0
    return ang.cos().to(dtype).to(DEV), ang.sin().to(dtype).to(DEV)


# ---- zero q heads (next_power_of_2(0) was 0: ZeroDivisionError) -------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("hq,hk", [(0, 3), (3, 0)])
def test_zero_q_heads_with_k_heads(interleaved, hq, hk):
    A, S, D = 2, 3, 16
    q = torch.randn(A, S, hq, D, device=DEV)
    k = torch.randn(A, S, hk, D, device=DEV)
    cos, sin = _tables(A, S, D)
    qo, ko = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    T.rotary_triton(q, k, cos, sin, qo, ko, interleaved, False)
    torch.testing.assert_close(qo, _ref(q, cos, sin, interleaved), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ko, _ref(k, cos, sin, interleaved), rtol=2e-6, atol=2e-6)


# ---- out-of-range cache rows: nothing read out of bounds, NaN -----------------------------------


def _cache(P, R, seed=1):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(P, R, generator=g) * 6.0
    return ang.cos().to(DEV), ang.sin().to(DEV)


def _check_rows(out, x, cos_c, sin_c, rows, R, interleaved=False):
    """out [A, S, H, D] against x rotated with cache rows ``rows`` [A, S]: NaN where out of range."""
    P = cos_c.shape[0]
    ok = (rows >= 0) & (rows < P)
    safe = torch.where(ok, rows, torch.zeros_like(rows))
    exp = _ref(x, cos_c[safe], sin_c[safe], interleaved)
    bad = ~ok
    assert torch.isnan(out[bad][..., :R]).all(), "rotated dims of out-of-range tokens must be NaN"
    torch.testing.assert_close(out[bad][..., R:], x[bad][..., R:], rtol=0, atol=0)  # pass-through as usual
    torch.testing.assert_close(out[ok], exp[ok], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("bad", [10**6, 10**12, -1, -(10**12), 16])
def test_out_of_range_positions_give_nan(bad, interleaved):
    P, R, D = 16, 8, 12
    q = torch.randn(1, 3, 2, D, device=DEV)
    k = torch.randn(1, 3, 1, D, device=DEV)
    cos_c, sin_c = _cache(P, R)
    pos = torch.tensor([[[0, bad, 5]]], device=DEV)  # [X=1, A, S]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    T.rotary_triton(q, k, cos_c, sin_c, qo, ko, interleaved, False, positions=pos)
    rows = pos[0]
    _check_rows(qo, q, cos_c, sin_c, rows, R, interleaved)
    _check_rows(ko, k, cos_c, sin_c, rows, R, interleaved)


def test_out_of_range_from_cu_seqlens_and_offsets():
    """Positions derived from cu_seqlens (s - cu[b]), seqlen_offsets[b] and offset."""
    P, R, D = 8, 8, 8
    S = 7
    q = torch.randn(1, S, 2, D, device=DEV)
    cos_c, sin_c = _cache(P, R)
    cu = torch.tensor([0, 3, 7], device=DEV)
    off = torch.tensor([4, -2], device=DEV)  # seq 0: rows 4, 5, 6; seq 1: rows -2, -1, 0, 1
    qo = torch.empty_like(q)
    T.rotary_triton(q, None, cos_c, sin_c, qo, None, False, False, cu_seqlens=cu, seqlen_offsets=off, offset=1)
    rows = torch.tensor([[5, 6, 7, -1, 0, 1, 2]], device=DEV)
    _check_rows(qo, q, cos_c, sin_c, rows, R)
    # offsets alone (decode): one token per sequence
    q2 = torch.randn(3, 1, 2, D, device=DEV)
    qo2 = torch.empty_like(q2)
    off2 = torch.tensor([7, 8, 10**12], device=DEV)
    T.rotary_triton(q2, None, cos_c, sin_c, qo2, None, False, False, seqlen_offsets=off2)
    _check_rows(qo2, q2, cos_c, sin_c, off2[:, None], R)


def test_out_of_range_mrope_axis():
    """mrope: a token whose row is out of range on one axis has NaN in all its rotated dims (the
    CUDA kernel's rule), its pass-through dims and the other tokens untouched."""
    P, D = 16, 16
    half = D // 2
    sec = (2, 3, 3)
    q = torch.randn(1, 2, 1, D + 4, device=DEV)  # 4 pass-through dims
    cos_c, sin_c = _cache(P, D)
    pos = torch.tensor([[[1, 2]], [[3, 99]], [[5, 6]]], device=DEV)  # [3, A, S]: axis 1 of token 1 is bad
    qo = torch.empty_like(q)
    T.rotary_triton(q, None, cos_c, sin_c, qo, None, False, False, positions=pos, mrope_section=sec)
    assert torch.isnan(qo[0, 1, 0, :D]).all()
    assert torch.equal(qo[0, 1, 0, D:], q[0, 1, 0, D:])
    assert not torch.isnan(qo[0, 0]).any()
    del half


# ---- 64-bit offsets ------------------------------------------------------------------------------


def _huge_stride_q():
    """q [1, 1, 1, 4] with head-dim stride s = 2^31 / 3 + 16 (3 * s overflows int32) holding
    1, 2, 3, 4, and q_out interleaved with it one element on (NaN), in 4 GiB of *virtual*
    memory (torch.empty does not touch it; the test touches a few pages)."""
    s = 2**31 // 3 + 16
    try:
        buf = torch.empty(3 * s + 2, dtype=torch.bfloat16)
    except RuntimeError as e:  # no virtual memory for it
        pytest.skip(f"cannot reserve 4 GiB of address space: {e}")
    q = buf.as_strided((1, 1, 1, 4), (0, 0, 0, s), 0)
    qo = buf.as_strided((1, 1, 1, 4), (0, 0, 0, s), 1)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    q.copy_(vals.view(1, 1, 1, 4))
    qo.fill_(float("nan"))
    return q, qo, vals


@pytest.mark.skipif(not CPU_INTERP, reason="needs the interpreter on CPU (virtual memory trick)")
@pytest.mark.parametrize("interleaved", [False, True])
def test_offsets_beyond_int32(interleaved):
    """Head-dim stride s with 3 * s >= 2^31: offsets j * s overflow in 32-bit arithmetic.

    The storage is 4 GiB of *virtual* memory (torch.empty does not touch it), of which the test
    touches a few pages: q's 4 elements at 0, s, 2s, 3s and q_out's at 1, s + 1, ..."""
    q, qo, vals = _huge_stride_q()
    ang = torch.tensor([0.3, 1.1, 0.3, 1.1] if not interleaved else [0.3, 0.3, 1.1, 1.1])
    cos, sin = ang.cos().view(1, 1, 4), ang.sin().view(1, 1, 4)
    T.rotary_triton(q, None, cos, sin, qo, None, interleaved, False)
    exp = _ref(vals.view(1, 1, 1, 4), cos, sin, interleaved)
    assert torch.equal(qo.clone(), exp), (qo, exp)
    assert torch.equal(q.clone(), vals.view(1, 1, 1, 4))


@pytest.mark.skipif(not CPU_INTERP, reason="needs the interpreter on CPU (virtual memory trick)")
def test_pass_through_offsets_beyond_int32():
    """Partial rotary, out of place: the copied dims' offsets p * s are 64-bit too."""
    q, qo, vals = _huge_stride_q()
    cos, sin = torch.tensor([0.5, 0.5]).view(1, 1, 2), torch.tensor([0.25, 0.25]).view(1, 1, 2)
    T.rotary_triton(q, None, cos, sin, qo, None, False, False)
    exp = _ref(vals.view(1, 1, 1, 4), cos, sin)
    assert torch.equal(qo.clone(), exp), (qo, exp)


# ---- device context (multi-GPU) ------------------------------------------------------------------


def test_device_context_for_tensor_device():
    assert T._device_context(torch.device("cpu")) is None
    ctx = T._device_context(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    if hasattr(torch, "xpu"):
        ctx = T._device_context(torch.device("xpu", 2))
        assert isinstance(ctx, torch.xpu.device) and ctx.idx == 2


def test_launchers_use_the_tensors_device(monkeypatch):
    seen = []
    monkeypatch.setattr(T, "_device_context", lambda d: seen.append(d) or None)
    monkeypatch.setattr(T, "_launch", lambda *a, **k: None)
    q = torch.empty(1, 2, 2, 8, device=DEV)
    cos, sin = _tables(1, 2, 8)
    T.rotary_triton(q, None, cos, sin, q, None, False, False)
    x = torch.empty(1, 2, 2, 4, device=DEV)
    T.apply_rotary_triton(x, x, x, x, x, x, False)
    assert seen == [q.device, x.device]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_first_is_current():
    with torch.cuda.device(0):
        q = torch.randn(1, 4, 2, 16, device="cuda:1")
        cos, sin = _tables(1, 4, 16)
        cos, sin = cos.to("cuda:1"), sin.to("cuda:1")
        qo = torch.empty_like(q)
        T.rotary_triton(q, None, cos, sin, qo, None, False, False)
        torch.testing.assert_close(qo, _ref(q, cos, sin), rtol=2e-6, atol=2e-6)


# ---- interpreter conversions: exactly what GPUs compute ------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _convert_kernel(x_ptr, y_ptr, N, OUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    v = T._to_acc(tl.load(x_ptr + offs, mask=m), tl.float32, True)
    tl.store(y_ptr + offs, T._to_out(v, OUT, True), mask=m)


def _convert(x, out_dtype):
    y = torch.empty(x.shape, dtype=out_dtype)
    block = 65536
    T._launch(_convert_kernel, (triton.cdiv(x.numel(), block),), x, y, x.numel(),
              OUT={torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[out_dtype], BLOCK=block)
    return y


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same_bits(got, exp):
    nan = torch.isnan(exp)
    assert torch.equal(torch.isnan(got), nan), "NaN must stay NaN (and nothing else become NaN)"
    diff = (_bits(got) != _bits(exp)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} values differ, e.g. {got[diff][:4]} vs {exp[diff][:4]}"


@pytest.mark.skipif(not CPU_INTERP, reason="the emulation is for the interpreter")
def test_bf16_to_fp32_exact_all_patterns():
    """Every bf16 pattern (subnormals, NaN payloads included) widens exactly, as on GPUs."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    got = _convert(x, torch.float32)
    assert torch.equal(_bits(got), _bits(x.float()))  # bit for bit, NaN payloads too


@pytest.mark.skipif(not CPU_INTERP, reason="the emulation is for the interpreter")
def test_fp32_to_bf16_round_to_nearest_even_all_patterns():
    """fp32 values around every bf16 pattern (low halves: exact, below/at/above the tie, max)
    round to nearest even like GPUs (cvt.rn.bf16.f32) and torch; NaN stays NaN, subnormals
    included (the interpreter's own cast truncates and turns 6.79e-39 into 2.94e-39)."""
    hi = torch.arange(0, 2**16, dtype=torch.int64)
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC000])
    bits = (hi[:, None] << 16 | lows[None, :]).flatten()
    x = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    got = _convert(x, torch.bfloat16)
    _assert_same_bits(got, x.to(torch.bfloat16))
    # the examples from the issue
    sub = torch.tensor([6.79e-39], dtype=torch.float32)
    assert _convert(sub, torch.bfloat16).item() == sub.to(torch.bfloat16).item()
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, -(2**31) + 0x7F800001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(_convert(nans, torch.bfloat16)).all()


@pytest.mark.skipif(not CPU_INTERP, reason="the emulation is for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotation_bit_exact_all_patterns(dtype):
    """rotary_triton on every bf16/fp16 pattern of q: the kernel's fp32 math (x1*c1 - x2*s1, no
    contraction under the interpreter) rounded once, bit for bit; NaN payloads in cos
    (0x7FFFFFFF, 0xFFFFFFFF) give NaN, not +-0."""
    A, S, H, D = 1, 64, 8, 128
    q = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).view(A, S, H, D)
    g = torch.Generator().manual_seed(3)
    ang = torch.rand(A, S, D, generator=g) * 6.0
    cos, sin = ang.cos(), ang.sin()
    cos[0, 5, 3] = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    cos[0, 9, 70] = torch.tensor([-1], dtype=torch.int32).view(torch.float32)
    qo = torch.empty_like(q)
    T.rotary_triton(q, None, cos, sin, qo, None, False, False)
    exp = _ref(q, cos, sin)
    _assert_same_bits(qo, exp)
    assert torch.isnan(qo[0, 5, :, 3]).all() and torch.isnan(qo[0, 9, :, 70]).all()


# ---- recompiles: distinct specialisation keys over realistic call sequences ----------------------


def _key_counter(monkeypatch):
    """Records the launcher's launches (nothing runs) and returns a function giving the set of
    Triton specialisation keys they produce: the same binder JITFunction.run uses for its
    kernel cache (native specialisation: ints ==1 / %16, pointer alignment, do_not_specialize),
    plus the options (num_warps)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")
    calls = []
    monkeypatch.setattr(T, "_launch", lambda kernel, grid, *a, **kw: calls.append((kernel, a, kw)))
    binders = {}

    def keys():
        out = set()
        for kernel, a, kw in calls:
            if kernel not in binders:
                dns = getattr(T, "_QK_NO_SPEC", None) if kernel is T._rotary_qk_kernel else None
                jf = JITFunction(kernel.fn, do_not_specialize=dns)
                binders[kernel] = create_function_from_signature(jf.signature, jf.params, backend)
            _, spec, options = binders[kernel](*a, **kw)
            out.add((kernel.fn.__name__, str(spec), str(sorted(options.items()))))
        calls.clear()
        return out

    return keys


def test_specialisations_varlen_and_decode(monkeypatch):
    import rotary_kernels as rk

    keys = _key_counter(monkeypatch)
    bf = torch.bfloat16
    Hq, Hk, D, P = 32, 8, 128, 8192
    cos_c, sin_c = torch.empty(P, D, device=DEV), torch.empty(P, D, device=DEV)
    g = torch.Generator().manual_seed(0)
    # varlen prefill batches of 1..64 sequences of random lengths (cu_seqlens into a cache)
    for n in range(1, 65):
        lens = torch.randint(1, 64, (n,), generator=g)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(DEV, torch.int32)
        t = int(cu[-1])
        q, k = torch.empty(t, Hq, D, dtype=bf, device=DEV), torch.empty(t, Hk, D, dtype=bf, device=DEV)
        rk.apply_rotary_transformers(q, k, cos_c, sin_c, backend="triton", cu_seqlens=cu, max_seqlen=int(lens.max()))
    varlen = keys()
    assert len(varlen) <= 2, f"{len(varlen)} specialisations for varlen batches of 1..64 sequences"
    # decode: batch 1, offsets 0..N as an int, then as a tensor; batch sizes 1..64 with per-sequence offsets
    q, k = torch.empty(1, Hq, 1, D, dtype=bf, device=DEV), torch.empty(1, Hk, 1, D, dtype=bf, device=DEV)
    for off in range(0, 300, 7):
        rk.apply_rotary_transformers(q, k, cos_c, sin_c, backend="triton", seqlen_offsets=off)
    assert len(keys()) == 1
    for b in (1, 2, 3, 8, 16, 17, 33, 64):
        q, k = torch.empty(b, Hq, 1, D, dtype=bf, device=DEV), torch.empty(b, Hk, 1, D, dtype=bf, device=DEV)
        offs = torch.randint(0, P - 1, (b,), generator=g).to(DEV)
        rk.apply_rotary_transformers(q, k, cos_c, sin_c, backend="triton", seqlen_offsets=offs)
    assert len(keys()) == 1
    # prefill with positions, prompt lengths that are and are not multiples of 16
    for s in (1, 7, 16, 100, 128, 513, 1024):
        q, k = torch.empty(1, Hq, s, D, dtype=bf, device=DEV), torch.empty(1, Hk, s, D, dtype=bf, device=DEV)
        pos = torch.arange(s, device=DEV)[None]
        rk.apply_rotary_transformers(q, k, cos_c, sin_c, backend="triton", positions=pos)
    assert len(keys()) == 1


# ---- head groups (several programs per token) ------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_several_head_groups_per_token(interleaved):
    """Many heads of a wide head dim: each token's heads are split over several programs, each
    with a block of q heads and a block of k heads (the last ones partly or wholly masked)."""
    A, S, Hq, Hk, D, R = 1, 2, 70, 3, 256, 192
    q = torch.randn(A, S, Hq, D, device=DEV)
    k = torch.randn(A, S, Hk, D, device=DEV)
    cos, sin = _tables(A, S, R)
    assert T._plan(Hq, Hk, R // 2, 4, interleaved, True)[3] > 1
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    T.rotary_triton(q, k, cos, sin, qo, ko, interleaved, False)
    torch.testing.assert_close(qo, _ref(q, cos, sin, interleaved), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ko, _ref(k, cos, sin, interleaved), rtol=2e-6, atol=2e-6)


# ---- replayed launches (_dispatch._TRITON_LAUNCHES): a plain call's launch recorded per geometry --


def _qk(layout, S=5, Hq=4, Hk=2, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "view":  # transformers' transposed view of [B, S, H, D]
        return (torch.randn(2, S, Hq, D, generator=g).to(dtype).to(DEV).transpose(1, 2),
                torch.randn(2, S, Hk, D, generator=g).to(dtype).to(DEV).transpose(1, 2))
    return (torch.randn(2, Hq, S, D, generator=g).to(dtype).to(DEV),
            torch.randn(2, Hk, S, D, generator=g).to(dtype).to(DEV))


@pytest.fixture
def launches():
    _dispatch._TRITON_LAUNCHES.clear()
    yield _dispatch._TRITON_LAUNCHES
    _dispatch._TRITON_LAUNCHES.clear()


def _spy_planned(monkeypatch):
    """A list that grows by one for each launch planned by the full path (``rotary_triton``);
    a replayed launch adds nothing."""
    planned = []
    real = T.rotary_triton
    monkeypatch.setattr(T, "rotary_triton", lambda *a, **kw: (planned.append(1), real(*a, **kw))[1])
    return planned


@pytest.mark.parametrize("interleaved", [False, True])
def test_replayed_launch_is_the_recorded_one(launches, monkeypatch, interleaved):
    """The second call of a geometry replays the first's launch, with the same bits; each new
    geometry (layout, dtype, rotary dim, k or not) records its own."""
    import rotary_kernels as rk
    from rotary_kernels.reference import apply_rotary_transformers_reference as ref

    planned = _spy_planned(monkeypatch)
    cos, sin = (t[:, :, :12].contiguous() for t in _tables(2, 5, 16))  # partial rotary: copy pass
    for layout in ("view", "bhsd"):
        for dtype in (torch.float32, torch.bfloat16):
            q, k = _qk(layout, dtype=dtype)
            c, s = cos.to(dtype), sin.to(dtype)
            first = rk.apply_rotary_transformers(q, k, c, s, interleaved=interleaved, backend="triton")
            n = len(planned)
            again = rk.apply_rotary_transformers(q.clone(), k.clone(), c, s, interleaved=interleaved, backend="triton")
            assert len(planned) == n  # replayed (a clone has the same geometry)
            want = ref(q, k, c, s, interleaved=interleaved)
            for a, b, w, x in zip(first, again, want, (q, k)):
                assert torch.equal(a, b) and a.stride() == b.stride() == x.stride()
                torch.testing.assert_close(a, w, rtol=0, atol=0)
            x = rk.apply_rotary_emb(q, c, s, interleaved=interleaved, backend="triton")  # k None: its own
            n = len(planned)
            x2 = rk.apply_rotary_emb(q, c, s, interleaved=interleaved, backend="triton")
            assert torch.equal(x, first[0]) and torch.equal(x2, x) and len(planned) == n
    assert len(launches) == 8 and all(not launch.tensors for launch in launches.values())  # no tensors kept


def test_replay_keeps_validation_and_gradients(launches, monkeypatch):
    """After a good call has been recorded, calls of another geometry or with bad arguments are
    still validated (their errors), and the backward (recorded too) gives the reference's
    gradients."""
    import rotary_kernels as rk
    from rotary_kernels.reference import apply_rotary_transformers_reference as ref

    planned = _spy_planned(monkeypatch)
    q, k = _qk("view")
    cos, sin = _tables(2, 5, 16)
    rk.apply_rotary_transformers(q, k, cos, sin, backend="triton")
    with pytest.raises(TypeError, match="unsqueeze_dim"):
        rk.apply_rotary_transformers(q, k, cos, sin, True, backend="triton")  # (True == 1 as a key)
    with pytest.raises(ValueError):
        rk.apply_rotary_transformers(q, k, cos[:, :4], sin[:, :4], backend="triton")  # 4 tokens' tables for 5
    with pytest.raises(TypeError, match="interleaved"):
        rk.apply_rotary_transformers(q, k, cos, sin, interleaved=1, backend="triton")

    qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
    qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
    g = [torch.randn_like(q), torch.randn_like(k)]
    want = torch.autograd.grad(ref(qr, kr, cos, sin), (qr, kr), g)
    for _ in range(2):  # the second forward and backward replay
        n = len(planned)
        got = torch.autograd.grad(rk.apply_rotary_transformers(qq, kk, cos, sin, backend="triton"), (qq, kk), g)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=2e-6, atol=2e-6)
    assert len(planned) == n


def test_two_launches_are_not_replayed(launches):
    """q and k the kernel cannot take in one launch (different batch sizes through broadcasting
    cos/sin) launch twice: not recorded, still right."""
    import rotary_kernels as rk
    from rotary_kernels.reference import apply_rotary_transformers_reference as ref

    q = torch.randn(2, 4, 5, 16, device=DEV)
    k = torch.randn(1, 2, 5, 16, device=DEV)
    cos, sin = (t[:1] for t in _tables(1, 5, 16))
    for _ in range(2):
        got = rk.apply_rotary_transformers(q, k, cos, sin, backend="triton")
        for a, w in zip(got, ref(q, k, cos, sin)):
            torch.testing.assert_close(a, w, rtol=2e-6, atol=2e-6)
    assert not launches


def test_inplace_replay_checks_storages(launches, monkeypatch):
    """In place, a recorded launch is replayed only on q and k in storages of their own (apart
    from each other and cos/sin): overlaps of the same geometry still go to the full path's check
    and raise; a packed qkv's slices (one storage) still rotate right."""
    import rotary_kernels as rk
    from rotary_kernels.reference import apply_rotary_transformers_reference as ref

    planned = _spy_planned(monkeypatch)
    cos, sin = _tables(1, 3, 8)
    q, k = torch.randn(1, 4, 3, 8, device=DEV), torch.randn(1, 4, 3, 8, device=DEV)
    for _ in range(2):
        qi, ki = q.clone(), k.clone()
        rk.apply_rotary_transformers_(qi, ki, cos, sin, backend="triton")
        for x, w in zip((qi, ki), ref(q, k, cos, sin)):
            torch.testing.assert_close(x, w, rtol=0, atol=0)
    assert len(planned) == 1 and len(launches) == 1  # recorded, then replayed
    with pytest.raises(ValueError, match="overlaps"):
        rk.apply_rotary_transformers_(qi, qi, cos, sin, backend="triton")  # q and k the same memory
    buf = torch.randn(96, device=DEV)
    qb, cb = buf.view(1, 4, 3, 8), buf[:24].view(1, 3, 8)  # cos inside q (q's geometry, cos's)
    with pytest.raises(ValueError, match="overlaps"):
        rk.apply_rotary_transformers_(qb, ki, cb, sin, backend="triton")
    packed = torch.cat((q, k), 1)
    qs, ks = packed[:, :4], packed[:, 4:]  # one storage: the full path's exact check, then rotated
    rk.apply_rotary_transformers_(qs, ks, cos, sin, backend="triton")
    for x, w in zip((qs, ks), ref(q, k, cos, sin)):
        torch.testing.assert_close(x, w, rtol=0, atol=0)
    assert len(planned) == 2  # (the overlapping calls raised before launching)


@pytest.mark.parametrize("moved", ["k", "cos", "sin"])
def test_replay_needs_every_tensor_on_qs_device(launches, moved):
    """A recorded geometry is not replayed for a tensor on another device (the key held q's
    device alone: cos on another device was launched as q's, an out-of-bounds read on a GPU):
    the full path's error, out of place and in place."""
    import rotary_kernels as rk

    other = "meta" if DEV == "cpu" else "cpu"
    q, k = _qk("view")
    cos, sin = _tables(2, 5, 16)
    args = dict(k=k, cos=cos, sin=sin)
    rk.apply_rotary_transformers(q, **args, backend="triton")
    rk.apply_rotary_transformers_(q.clone(), k.clone(), cos, sin, backend="triton")
    assert len(launches) == 2
    args[moved] = args[moved].to(other)
    with pytest.raises(ValueError, match="same device"):
        rk.apply_rotary_transformers(q, **args, backend="triton")
    with pytest.raises(ValueError, match="same device"):
        rk.apply_rotary_transformers_(q.clone(), **args, backend="triton")
