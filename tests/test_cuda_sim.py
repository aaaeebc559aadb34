"""The CUDA kernels' logic, run on the CPU (tests/cuda_sim.cpp walks the grid thread by thread
with the real launch planning), against the reference: memory paths (16-byte vectors, strided
scalar, misaligned), launch shapes (decode split over grid.y, prefill blocks), partial rotary,
interleaved, conj, in place, token positions (out of range: NaN rows, nothing read out of
bounds), flash-attn's elementwise apply_rotary. Every launch is checked for 16-byte alignment
of vector accesses, reads/writes outside the tensors, and two threads touching one element;
plans too large to allocate are checked by planning alone.

Compiles a small CPU extension (~20 s, cached under ~/.cache/torch_extensions).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from rotary_kernels.reference import rotary_reference

from conftest import TOL
from test_cpp_ops import _conj_ref, canonical, tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name="rotary_cuda_sim",
            sources=[str(ROOT / "tests" / "cuda_sim.cpp")],
            extra_include_paths=[str(ROOT / "rotary_kernels"), str(ROOT / "torch-ext")],
            extra_cflags=["-O1"],
            verbose=False,
        )
    except Exception as e:  # no compiler: say so rather than fail every test obscurely
        pytest.skip(f"cannot build the CUDA-kernel simulation: {e}")


def padded_like(x, pad=64):
    """An output with x's shape and strides inside a NaN-filled buffer with guard regions."""
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride())) if x.numel() else 0
    buf = torch.full((span + 2 * pad,), float("nan"), dtype=x.dtype)
    return buf, torch.as_strided(buf, x.shape, x.stride(), pad)


def run(sim, q, k, cos, sin, interleaved=False, conj=False, sms=132, **kw):
    (bq, qo), (bk, ko) = padded_like(q), padded_like(k)
    info = sim.rotary_sim(q, k, cos, sin, qo, ko, interleaved, conj, sms, **kw)
    for buf, out in ((bq, qo), (bk, ko)):
        mask = torch.ones_like(buf, dtype=torch.bool)
        torch.as_strided(mask, out.shape, out.stride(), out.storage_offset()).fill_(False)
        assert torch.isnan(buf[mask]).all(), "the kernel wrote outside its output"
    return qo, ko, info


def want(x, cos, sin, interleaved, conj):
    return _conj_ref(x, cos, sin, interleaved) if conj else rotary_reference(x, cos, sin, 2, interleaved)


def close(got, ref):
    torch.testing.assert_close(got, ref.to(got.dtype), **TOL[got.dtype])


@pytest.mark.parametrize("layout", ["contig", "heads_outer", "strided_d", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 48), (40, 20), (8, 2), (128, 64)])
def test_sim_paths(sim, layout, dtype, interleaved, D, R):
    q = canonical(2, 3, 3, D, dtype, "cpu", layout)
    k = canonical(2, 3, 2, D, dtype, "cpu", layout, seed=2)
    cos, sin = tables(2, 3, R, torch.float32, "cpu")
    q0, k0 = q.clone(), k.clone()
    for conj in (False, True):
        qo, ko, info = run(sim, q, k, cos, sin, interleaved, conj)
        close(qo, want(q, cos, sin, interleaved, conj))
        close(ko, want(k, cos, sin, interleaved, conj))
        assert torch.equal(q, q0) and torch.equal(k, k0)
        vec = 16 // q.element_size()
        expect_vector = layout in ("contig", "heads_outer") and (R // 2) % vec == 0
        assert bool(info[5]) == expect_vector, info


@pytest.mark.parametrize(
    "A,S,Hq,Hk,sms",
    [(64, 1, 32, 8, 132), (1, 300, 8, 2, 4), (2, 64, 5, 5, 2), (1, 1, 1, 1, 132), (3, 7, 0, 2, 132)],
    ids=["decode", "prefill-big", "mha-odd-rows", "single", "no-q-heads"],
)
@pytest.mark.parametrize("interleaved", [False, True])
def test_sim_launch_shapes(sim, A, S, Hq, Hk, sms, interleaved):
    q = canonical(A, S, Hq, 128, torch.bfloat16, "cpu", "heads_outer")
    k = canonical(A, S, Hk, 128, torch.bfloat16, "cpu", "heads_outer", seed=3)
    cos, sin = tables(A, S, 128, torch.bfloat16, "cpu")
    qo, ko, info = run(sim, q, k, cos, sin, interleaved, False, sms)
    close(qo, want(q, cos, sin, interleaved, False))
    close(ko, want(k, cos, sin, interleaved, False))
    gx, gy, bx, by = info[:4]
    assert gx == A * S and bx == 8  # 64 pairs / 8 per thread
    assert bx * by <= 256 and gy <= Hq + Hk


def test_sim_inplace_and_cos_dtypes(sim):
    for cs_dtype in (torch.bfloat16, torch.float32, torch.float16):
        q = canonical(2, 4, 4, 64, torch.bfloat16, "cpu", "heads_outer")
        cos, sin = tables(1, 4, 64, cs_dtype, "cpu")
        cos, sin = cos.expand(2, 4, 64), sin.expand(2, 4, 64)  # broadcast over A: stride 0
        qi = q.clone()
        sim.rotary_sim(qi, None, cos, sin, qi, None, False, False, 132)
        close(qi, rotary_reference(q, cos, sin, 2))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["heads_outer", "strided_d"])
def test_sim_token_positions(sim, interleaved, layout):
    """Caches read at positions, packed sequences (binary search over cu_seqlens), offsets, mrope."""
    from rotary_kernels.reference import rotary_reference_indexed as ref_ix

    A, S, Hq, Hk, D, P = 2, 5, 3, 2, 64, 40
    q = canonical(A, S, Hq, D, torch.bfloat16, "cpu", layout)
    k = canonical(A, S, Hk, D, torch.bfloat16, "cpu", layout, seed=2)
    cos, sin = tables(1, P, D, torch.float32, "cpu")
    cos, sin = cos[0], sin[0]  # [P, R] caches
    pos = torch.randint(0, P, (A, S))
    for conj in (False, True):
        qo, ko, _ = run_ix(sim, q, k, cos, sin, interleaved, conj, positions=pos[None])
        c, s = cos[pos], sin[pos]
        close(qo, want(q, c, s, interleaved, conj))
        close(ko, want(k, c, s, interleaved, conj))
    # offsets per batch row plus a scalar offset
    qo, _, _ = run_ix(sim, q, k, cos, sin, interleaved, False, seqlen_offsets=torch.tensor([3, 9]), offset=2)
    close(qo, ref_ix(q, cos, sin, 2, interleaved, seqlen_offsets=torch.tensor([5, 11])))
    # packed sequences: A == 1, T tokens
    cu = torch.tensor([0, 2, 2, 7, 10])
    qp = canonical(1, 10, Hq, D, torch.bfloat16, "cpu", layout)
    kp = canonical(1, 10, Hk, D, torch.bfloat16, "cpu", layout, seed=4)
    offs = torch.tensor([1, 0, 4, 30])
    qo, ko, _ = run_ix(sim, qp, kp, cos, sin, interleaved, False, cu_seqlens=cu, seqlen_offsets=offs)
    close(qo[0], ref_ix(qp[0], cos, sin, 1, interleaved, cu_seqlens=cu, seqlen_offsets=offs))
    close(ko[0], ref_ix(kp[0], cos, sin, 1, interleaved, cu_seqlens=cu, seqlen_offsets=offs))
    # mrope: 3-axis positions into the cache, and per-axis tables [3, A, S, R]
    pos3 = torch.randint(0, P, (3, A, S))
    for mi, sec in ((False, [8, 12, 12]), (True, [12, 10, 10]), (False, [8, 16, 8])):
        qo, _, info = run_ix(sim, q, k, cos, sin, interleaved, False, positions=pos3, mrope_section=sec,
                             mrope_interleaved=mi)
        # mrope reads cos/sin element by element, or a vector a chunk where sections are whole chunks
        assert info[6] == (sec == [8, 16, 8] and layout == "heads_outer")
        close(qo, ref_ix(q, cos, sin, 2, interleaved, positions=pos3, mrope_section=sec, mrope_interleaved=mi))
        c3, s3 = cos[pos3], sin[pos3]
        qo, _, _ = run_ix(sim, q, k, c3, s3, interleaved, False, mrope_section=sec, mrope_interleaved=mi)
        close(qo, ref_ix(q, c3, s3, 2, interleaved, mrope_section=sec, mrope_interleaved=mi))


@pytest.mark.parametrize("layout", ["heads_outer", "strided_d"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_sim_position_out_of_range_nan(sim, layout, interleaved):
    """A token whose cache row is outside [0, P): its rotated dims are NaN, its pass-through dims
    copied, nothing read outside the cache (the bounds check would raise), other tokens exact;
    no device assert (which would lose the CUDA context on a GPU)."""
    D, R, P = 32, 16, 4
    q = canonical(1, 4, 2, D, torch.float32, "cpu", layout)
    k = canonical(1, 4, 1, D, torch.float32, "cpu", layout, seed=2)
    cos, sin = tables(1, P, R, torch.float32, "cpu")
    cos, sin = cos[0], sin[0]
    pos = torch.tensor([[[0, 4, 1, -1]]])  # tokens 1 and 3 out of range
    for mrope in (None, [2, 3, 3], [4, 4, 0]):  # ([4, 4, 0]: whole chunks, vector tables on heads_outer)
        ix = dict(positions=pos.expand(3, 1, 4)) if mrope else dict(positions=pos)
        if mrope:
            ix.update(mrope_section=mrope)
        qo, ko, info = run_ix(sim, q, k, cos, sin, interleaved, False, **ix)
        assert info[6] == (mrope != [2, 3, 3] and layout == "heads_outer")
        for x, out in ((q, qo), (k, ko)):
            good = [0, 2]
            c, s_ = cos[pos[0, 0, good]][None], sin[pos[0, 0, good]][None]
            close(out[:, good], want(x[:, good], c, s_, interleaved, False))
            assert torch.isnan(out[:, [1, 3], :, :R]).all()
            assert torch.equal(out[:, [1, 3], :, R:], x[:, [1, 3], :, R:])


def test_sim_plan_large_shapes(sim):
    """Plans for shapes too large to allocate: grid.y's 65535 clamp and the token limit."""
    rows = 10_000_000  # one token, a row a slice wanted: grid.y clamped, several rows a slice
    gx, gy, bx, by, rps = sim.plan(1, rows, 256, 10**9)
    assert (gx, bx, by) == (1, 256, 1) and rps == -(-rows // 65535) and gy <= 65535 and rps * gy >= rows
    gx, gy, bx, by, rps = sim.plan(2**31 - 1, 40, 8, 132)  # largest token count: one grid.x each
    assert (gx, gy, bx, by, rps) == (2**31 - 1, 1, 8, 20, 40)
    with pytest.raises(RuntimeError, match="too many tokens"):
        sim.plan(2**31, 40, 8, 132)
    with pytest.raises(RuntimeError, match="too many rows"):
        sim.plan(1, 2**31 - 1, 8, 132)


def test_sim_llama_prefill_plan(sim):
    """Llama-3-8B prefill (32 + 8 rows, 8 chunks of 16 bytes): two steps of 20 rows (8x20
    blocks), not 32 and then 8; fp32 (16 chunks) three of 14, 14 and 12."""
    assert sim.plan(4096, 40, 8, 132) == [4096, 1, 8, 20, 40]
    assert sim.plan(4096, 40, 16, 132) == [4096, 1, 16, 14, 40]


@pytest.mark.parametrize("D", [128, 256, 512])
def test_sim_wide_table_blocks(sim, D):
    """16-bit x with fp32 vector tables, half-split, take blocks of at most 224 threads (their
    __launch_bounds__: 72 registers, 5 blocks of Llama's 8x20 an SM rather than 4 at 77); the
    planner gives them no more (a real launch past the bound fails; the simulation checks every
    launch against it), the same values, and the other instances their 256."""
    q = canonical(1, 3, 6, D, torch.bfloat16, "cpu", "heads_outer")
    k = canonical(1, 3, 2, D, torch.bfloat16, "cpu", "heads_outer", seed=2)
    for cdt, il, most in ((torch.float32, False, 224), (torch.float32, True, 256), (torch.bfloat16, False, 256)):
        cos, sin = tables(1, 3, D, cdt, "cpu")
        qo, ko, info = run(sim, q, k, cos, sin, il)
        assert info[6] == 1 and info[8] == most and info[2] * info[3] <= most, (cdt, il, info)
        assert torch.equal(qo, rotary_reference(q, cos, sin, 2, il)) and torch.equal(ko, rotary_reference(k, cos, sin, 2, il))
    assert sim.plan(4096, 40, 8, 132, 224) == [4096, 1, 8, 20, 40]  # Llama: the same 8x20 blocks
    assert sim.plan(4096, 40, 16, 132, 224) == [4096, 1, 16, 14, 40]
    assert sim.plan(4096, 40, 32, 132, 224) == [4096, 1, 32, 7, 40]  # D = 512: 6 steps of 7 rows or fewer


@pytest.mark.parametrize("rows", [1, 3, 8, 32, 33, 40, 41, 72, 100, 257])
@pytest.mark.parametrize("nchunks", [1, 4, 8, 16, 40, 256])
def test_sim_plans_spread_rows_evenly(sim, rows, nchunks):
    """Large problems: the fewest steps a block of up to 256 threads allows, and a block's
    warps busy at nearly every step (threads x-fastest: a warp holds 32 / TX rows). The 8x32
    plan for 40 rows kept 10 of 16 warp-steps busy (62.5%)."""
    gx, gy, bx, by, rps = sim.plan(4096, rows, nchunks, 132)
    assert gy == 1 and rps == rows and bx == min(nchunks, 256) and bx * by <= 256
    steps = -(-rows // by)
    assert steps == -(-rows // min(max(1, 256 // bx), rows))  # fewest steps
    held = [min(by, rows - i) for i in range(0, rows, by)]
    warp_steps = sum(-(-n * bx // 32) for n in held)
    assert warp_steps >= 0.85 * steps * -(-bx * by // 32), (bx, by, held)


@pytest.mark.parametrize("tokens", [1, 8, 64, 256], ids=lambda t: f"batch{t}x1")
def test_sim_decode_plans(sim, tokens):
    """Llama-3-8B decode (batch x 1 token, 32 q + 8 k heads, D = 128: 8 chunks a row) on 132 SMs.
    Latency bound: every (token, row, chunk) gets its own thread, so each thread waits one
    memory round trip and no thread walks a second row; blocks are whole warps with no idle
    thread; grid.y splits the rows so a token is spread over 2 blocks (64 tokens: 128 blocks,
    one an SM). Finer splits (5 slices of 8 rows: 320 blocks of 2 warps) would reach the 4 idle
    SMs but not shorten the one round trip each thread waits, so the planner keeps 8x20."""
    rows, nchunks, sms = 40, 8, 132
    gx, gy, bx, by, rps = sim.plan(tokens, rows, nchunks, sms)
    assert (gx, bx) == (tokens, nchunks)
    assert rps == by and gy * rps == rows  # one row a thread, every thread busy
    assert (bx * by) % 32 == 0 and bx * by <= 256
    assert (gx, gy, bx, by) == (tokens, 2, 8, 20)
    assert gx * gy >= min(sms * 0.95, tokens * 2)  # 64 tokens: 128 blocks on 132 SMs


def test_sim_catches_misaligned_vectors(sim):
    """A vector access off a 16-byte boundary raises in the simulation (x86 would not fault)."""
    q = canonical(1, 2, 2, 16, torch.bfloat16, "cpu", "misaligned")
    cos, sin = tables(1, 2, 16, torch.float32, "cpu")
    sim.set_force_vector(True)
    try:
        with pytest.raises(RuntimeError, match="misaligned"):
            sim.rotary_sim(q, None, cos, sin, q.clone(), None, False, False, 132)
    finally:
        sim.set_force_vector(False)


def test_sim_catches_races_and_stray_writes(sim):
    """Two threads writing one element (an output whose heads alias) and a write outside the
    outputs raise in the simulation, where running threads one by one would hide them."""
    q = canonical(1, 2, 4, 16, torch.float32, "cpu")
    cos, sin = tables(1, 2, 16, torch.float32, "cpu")
    aliased = torch.empty(1, 2, 1, 16).expand(1, 2, 4, 16)  # every head writes one row
    with pytest.raises(RuntimeError, match="race"):
        sim.rotary_sim(q, None, cos, sin, aliased, None, False, False, 132)
    sim.set_checks(False)
    try:
        sim.rotary_sim(q, None, cos, sin, aliased, None, False, False, 132)  # unchecked: silent
    finally:
        sim.set_checks(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("cs_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["halves", "separate", "misaligned", "strided"])
def test_sim_elementwise(sim, dtype, cs_dtype, layout):
    """flash-attn's apply_rotary through the CUDA kernel: 16-byte vectors where every operand
    allows, else scalar; cos [S, 1, R/2] broadcast over heads; conj; in place."""
    from rotary_kernels.reference import apply_rotary_reference

    S, H, D = 5, 3, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, S, H, D + (2 if layout == "strided" else 0), generator=g).to(dtype)
    if layout == "strided":
        x = x[..., 1:D + 1]
    if layout == "misaligned":
        x = torch.randn(2 * S * H * D + 1, generator=g).to(dtype)[1:].view(2, S, H, D)
    if layout == "separate":
        x1, x2 = x[..., : D // 2].clone(), x[..., D // 2:].clone()
    else:
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
    cos, sin = tables(1, S, D // 2, cs_dtype, "cpu")
    c4, s4 = cos[0, :, None].expand_as(x1), sin[0, :, None].expand_as(x1)
    vec = 16 // x1.element_size()
    for conj in (False, True):
        r1, r2 = apply_rotary_reference(x1, x2, c4, s4, conj)
        o1, o2 = torch.full_like(x1, float("nan")), torch.full_like(x2, float("nan"))
        info = sim.apply_rotary_sim(x1, x2, c4, s4, o1, o2, conj)
        close(o1, r1)
        close(o2, r2)
        aligned = layout in ("halves", "separate") and (D // 2) % vec == 0 and x1.element_size() * 8 >= 16
        assert bool(info[5]) == (aligned and layout != "misaligned"), info
    a1, a2 = x1.clone(), x2.clone()  # in place
    sim.apply_rotary_sim(a1, a2, c4, s4, a1, a2, False)
    r1, r2 = apply_rotary_reference(x1, x2, c4, s4, False)
    close(a1, r1)
    close(a2, r2)


def test_elementwise_tables_not_materialized(sim):
    """16-bit tables expanded to x's shape are converted to fp32 at their own size, not x's
    (the x-sized copy cos.to(float) made of the expanded view)."""
    x1 = torch.empty(4, 256, 32, 64, dtype=torch.bfloat16)
    cos = torch.randn(256, 1, 64).to(torch.bfloat16)
    c, s = sim.elementwise_tables(x1, cos.expand_as(x1), cos.expand_as(x1))
    assert c.dtype == torch.float32 and c.shape == x1.shape
    assert c.untyped_storage().nbytes() == 256 * 64 * 4  # the table, not 4 * 256 * 32 * 64 floats
    torch.testing.assert_close(c, cos.float().expand_as(x1), rtol=0, atol=0)


def run_ix(sim, q, k, cos, sin, interleaved, conj, **ix):
    (_, qo), (_, ko) = padded_like(q), padded_like(k)
    info = sim.rotary_sim(q, k, cos, sin, qo, ko, interleaved, conj, 132, **ix)
    return qo, ko, info


@pytest.mark.parametrize("layout", ["heads_outer", "strided_d"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    "A,S,Hq,Hk,sms",
    [(8, 1, 6, 2, 132), (1, 12, 40, 8, 1), (2, 3, 5, 3, 132), (2, 3, 0, 2, 132)],
    ids=["decode-split", "prefill-threads-span-q-and-k", "mha-odd-rows", "no-q-heads"],
)
def test_sim_k_tables(sim, layout, interleaved, A, S, Hq, Hk, sms):
    """k's own tables (cos_k/sin_k) in q's launch: k's rows read them, q's read cos/sin, whether a
    thread's rows are all q's, all k's, or both (it reloads its cos/sin at its first k row);
    vector and element-by-element tables (fp32 / bf16 for bf16 x), conj, and caches read at
    positions (cos_k with fewer rows than cos)."""
    from rotary_kernels.reference import rotary_reference_indexed as ref_ix

    D = 128
    q = canonical(A, S, Hq, D, torch.bfloat16, "cpu", layout)
    k = canonical(A, S, Hk, D, torch.bfloat16, "cpu", layout, seed=2)
    cos, sin = tables(A, S, D, torch.float32, "cpu")
    if Hq == 40:  # one slice; thread y = Hq % TY walks q's row y, then k's first row Hq
        _, gy, _, by, _ = sim.plan(A * S, Hq + Hk, D // 2 // (8 if layout == "heads_outer" else 1), sms)
        assert gy == 1 and by <= Hq, (gy, by)
    for ck_dtype, bcast in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        cos_k, sin_k = tables(A, S, D, ck_dtype, "cpu", seed=5)
        if bcast:  # strides other than cos's (zero over A): the four tables are read as dense copies
            cos_k, sin_k = cos_k[:1].expand_as(cos_k), sin_k[:1].expand_as(sin_k)
        for conj in (False, True):
            qo, ko, _ = run(sim, q, k, cos, sin, interleaved, conj, sms, cos_k=cos_k, sin_k=sin_k)
            close(qo, want(q, cos, sin, interleaved, conj))
            close(ko, want(k, cos_k, sin_k, interleaved, conj))
    c_cache, s_cache = (t[0] for t in tables(1, 30, D, torch.float32, "cpu"))
    ck_cache, sk_cache = (t[0] for t in tables(1, 20, D, torch.float32, "cpu", seed=6))
    pos = torch.randint(0, 20, (1, A, S))
    qo, ko, _ = run(sim, q, k, c_cache, s_cache, interleaved, False, sms, positions=pos, cos_k=ck_cache,
                    sin_k=sk_cache)
    close(qo, ref_ix(q, c_cache, s_cache, 2, interleaved, positions=pos[0]))
    close(ko, ref_ix(k, ck_cache, sk_cache, 2, interleaved, positions=pos[0]))


def test_default_cuda_archs_reach_newer_gpus():
    """The default CUDA build has SASS up to sm_120 and PTX of the newest, so newer GPUs load it."""
    spec = importlib.util.spec_from_file_location("rotary_kernels_setup", ROOT / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # (setup() runs only as __main__)
    archs = setup_py._cuda_capabilities(setup_py._build_config()).split(";")
    assert {"8.0", "9.0", "10.0"} <= set(archs) and archs[-1] == "12.0+PTX", archs


def test_no_cuda_image_falls_back_to_triton(monkeypatch):
    """A GPU the build has no image for: the default backend is Triton, with one warning."""
    import warnings

    from rotary_kernels import _dispatch

    ops = _dispatch.COMPILED
    if ops is None or not ops.HAS_CUDA_EXT or _dispatch.TRITON is None:
        pytest.skip("needs the CUDA extension and triton")
    dev = torch.device("cuda", 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (a GPU, as far as the backends ask)
    monkeypatch.setitem(_dispatch._IMAGE_OK, 7, False)  # what cuda_image_ok(7) answers for such a GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (13, 0))
    monkeypatch.setattr(_dispatch, "_SELECTED", {})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _dispatch.select_backend(dev) == "triton"
        assert _dispatch.select_backend(dev) == "triton"  # cached: no second warning
    msgs = [str(x.message) for x in w if "no image" in str(x.message)]
    assert len(msgs) == 1 and "sm_130" in msgs[0], msgs
    ok, why = _dispatch.backend_available("cuda", dev)
    assert not ok and "no image" in why
    with pytest.raises(RuntimeError, match="no image"):
        _dispatch._select_backend(dev, "cuda")  # asked for explicitly: a clear error


@pytest.mark.parametrize("layout", ["contig", "heads_outer", "strided_d", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 48), (8, 2), (128, 64)])
def test_sim_pair_tables(sim, layout, dtype, interleaved, D, R):
    """Per-pair tables [..., R/2] (pair_tables): bit-equal to the same launch with the full-width
    tables, for vector and element-by-element x and tables (fp32 and x's dtype, strided views
    like Llama 4's freqs_cis.real; interleaved with vector x: a vector of VEC pair entries a
    chunk), conj, decode splits, caches at positions, k's own tables, mrope; every access
    checked for alignment, bounds and races as always."""
    from rotary_kernels.reference import full_width_tables as fw

    for A, S, Hq, Hk, sms in ((2, 3, 3, 2, 132), (8, 1, 6, 2, 132)):
        q = canonical(A, S, Hq, D, dtype, "cpu", layout)
        k = canonical(A, S, Hk, D, dtype, "cpu", layout, seed=2)
        for cs_dtype in (torch.float32, dtype):
            cos, sin = tables(A, S, R // 2, cs_dtype, "cpu")
            strided = torch.polar(torch.ones(A, S, R // 2), torch.rand(A, S, R // 2) * 6.3)  # .real: stride 2
            for c, s in ((cos, sin), (strided.real.to(cs_dtype), strided.imag.to(cs_dtype))
                         if cs_dtype != torch.float32 else (strided.real, strided.imag)):
                for conj in (False, True):
                    qo, ko, info = run(sim, q, k, c, s, interleaved, conj, sms, pair_tables=True)
                    qf, kf, info_f = run(sim, q, k, fw(c, interleaved), fw(s, interleaved), interleaved, conj, sms)
                    assert torch.equal(qo, qf) and torch.equal(ko, kf)
                    assert info[:6] == info_f[:6]  # the same launch and x path
                    # vector x, interleaved: one vector of pair entries a chunk, also from a complex
                    # table's real and imaginary parts (read as one vector, as Llama 4 passes them)
                    if interleaved and info[5] and (c is cos or cs_dtype == torch.float32):
                        assert info[6] == 1, info
                    qi, ki = q.clone(), k.clone()  # in place: the same bits
                    sim.rotary_sim(qi, ki, c, s, qi, ki, interleaved, conj, sms, pair_tables=True)
                    assert torch.equal(qi, qo) and torch.equal(ki, ko)
    # caches at positions, k's own per-pair tables, mrope (element by element)
    A, S, Hq, Hk, P = 2, 5, 3, 2, 40
    q = canonical(A, S, Hq, D, dtype, "cpu", layout)
    k = canonical(A, S, Hk, D, dtype, "cpu", layout, seed=2)
    c_cache, s_cache = (t[0] for t in tables(1, P, R // 2, torch.float32, "cpu"))
    ck_cache, sk_cache = (t[0] for t in tables(1, P - 10, R // 2, torch.float32, "cpu", seed=6))
    pos = torch.randint(0, P - 10, (1, A, S))
    for ix in (dict(positions=pos), dict(positions=pos, cos_k=ck_cache, sin_k=sk_cache),
               dict(positions=torch.randint(0, P, (3, A, S)), mrope_section=[R // 2 - 1, 1, 0]) if R >= 4 else {},
               dict(seqlen_offsets=torch.tensor([3, 7]))):
        if not ix:
            continue
        full = {n: fw(v, interleaved) if n in ("cos_k", "sin_k") else v for n, v in ix.items()}
        qo, ko, _ = run_ix(sim, q, k, c_cache, s_cache, interleaved, False, pair_tables=True, **ix)
        qf, kf, _ = run_ix(sim, q, k, fw(c_cache, interleaved), fw(s_cache, interleaved), interleaved, False, **full)
        assert torch.equal(qo, qf) and torch.equal(ko, kf), ix
    # a complex cache's real and imaginary parts at positions (Llama 4's layout, one vector read)
    cis = torch.polar(torch.ones(P, R // 2), torch.rand(P, R // 2) * 6.3)
    qo, ko, _ = run_ix(sim, q, k, cis.real, cis.imag, interleaved, False, pair_tables=True, positions=pos)
    qf, kf, _ = run_ix(sim, q, k, fw(cis.real.contiguous(), interleaved), fw(cis.imag.contiguous(), interleaved),
                       interleaved, False, positions=pos)
    assert torch.equal(qo, qf) and torch.equal(ko, kf)


@pytest.mark.parametrize("layout", ["contig", "heads_outer", "strided_d", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 48), (8, 2)])
def test_sim_swap_layout(sim, layout, dtype, interleaved, D, R):
    """swap_layout (DeepSeek-V3's MLA rope: interleaved in, half-split out; its backward the other
    way, conj): bit-equal to the same rotation without it, its pairs then moved to the other
    layout (reference.swap_pair_layout), with VEC pairs a chunk (16-byte x accesses) where x is
    contiguous and aligned, else one; partial rotary's tail passes through; decode splits,
    caches at positions and mrope (the element-by-element tables); every access checked."""
    from rotary_kernels.reference import swap_pair_layout

    for A, S, Hq, Hk, sms in ((2, 3, 3, 1, 132), (8, 1, 6, 2, 132), (1, 12, 40, 8, 1)):
        q = canonical(A, S, Hq, D, dtype, "cpu", layout)
        k = canonical(A, S, Hk, D, dtype, "cpu", layout, seed=2)
        for cs_dtype in (torch.float32, dtype):
            cos, sin = tables(A, S, R // 2, cs_dtype, "cpu")
            for conj in (False, True):
                qo, ko, info = run(sim, q, k, cos, sin, interleaved, conj, sms, pair_tables=True, swap_layout=True)
                qp, kp, _ = run(sim, q, k, cos, sin, interleaved, conj, sms, pair_tables=True)
                assert torch.equal(qo, swap_pair_layout(qp, R, interleaved))
                assert torch.equal(ko, swap_pair_layout(kp, R, interleaved))
                vec = 16 // q.element_size()
                vector = layout in ("contig", "heads_outer") and (R // 2) % vec == 0
                assert info[4:7] == ([vec, 1, 1] if vector else [1, 0, 0])  # VEC pairs a chunk, or one
    A, S, Hq, Hk, P = 2, 5, 3, 1, 40
    q = canonical(A, S, Hq, D, dtype, "cpu", layout)
    k = canonical(A, S, Hk, D, dtype, "cpu", layout, seed=2)
    c_cache, s_cache = (t[0] for t in tables(1, P, R // 2, torch.float32, "cpu"))
    bad = torch.randint(0, P, (1, A, S))
    bad[0, 1, 2] = P  # a row outside the cache: the token's rotated dims NaN (the vector path's own stores)
    bits = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731  (NaNs compared too)
    for ix in (dict(positions=torch.randint(0, P, (1, A, S))), dict(seqlen_offsets=torch.tensor([3, 7])),
               dict(positions=bad),
               dict(positions=torch.randint(0, P, (3, A, S)), mrope_section=[R // 2 - 1, 1, 0]) if R >= 4 else {}):
        if not ix:
            continue
        qo, ko, _ = run_ix(sim, q, k, c_cache, s_cache, interleaved, False, pair_tables=True, swap_layout=True, **ix)
        qp, kp, _ = run_ix(sim, q, k, c_cache, s_cache, interleaved, False, pair_tables=True, **ix)
        assert torch.equal(bits(qo), bits(swap_pair_layout(qp, R, interleaved))), ix
        assert torch.equal(bits(ko), bits(swap_pair_layout(kp, R, interleaved))), ix
