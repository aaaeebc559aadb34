"""The CUDA rotary kernel's logic, run on the CPU (tests/cuda_sim.cpp walks its grid thread by
thread with the real launch planning), against the reference: memory paths (16-byte vectors,
strided scalar, misaligned), launch shapes (decode split over grid.y, prefill with two rows per
thread), partial rotary, interleaved, conj, in place, and no write outside the outputs.

Compiles a small CPU extension (~20 s, cached under ~/.cache/torch_extensions).
"""

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


def run(sim, q, k, cos, sin, interleaved=False, conj=False, sms=132):
    (bq, qo), (bk, ko) = padded_like(q), padded_like(k)
    info = sim.rotary_sim(q, k, cos, sin, qo, ko, interleaved, conj, sms)
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
    assert gy * by * 2 >= Hq + Hk  # every row covered


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
    for mi, sec in ((False, [8, 12, 12]), (True, [12, 10, 10])):
        qo, _, info = run_ix(sim, q, k, cos, sin, interleaved, False, positions=pos3, mrope_section=sec,
                             mrope_interleaved=mi)
        assert info[6] == 0  # mrope reads cos/sin element by element
        close(qo, ref_ix(q, cos, sin, 2, interleaved, positions=pos3, mrope_section=sec, mrope_interleaved=mi))
        c3, s3 = cos[pos3], sin[pos3]
        qo, _, _ = run_ix(sim, q, k, c3, s3, interleaved, False, mrope_section=sec, mrope_interleaved=mi)
        close(qo, ref_ix(q, c3, s3, 2, interleaved, mrope_section=sec, mrope_interleaved=mi))


def test_sim_position_out_of_range_traps(sim):
    q = canonical(1, 3, 2, 16, torch.float32, "cpu")
    cos, sin = tables(1, 4, 16, torch.float32, "cpu")
    with pytest.raises(IndexError, match="outside the cos/sin cache"):
        sim.rotary_sim(q, None, cos[0], sin[0], q.clone(), None, False, False, 132,
                       positions=torch.tensor([[[0, 4, 1]]]))


def run_ix(sim, q, k, cos, sin, interleaved, conj, **ix):
    (_, qo), (_, ko) = padded_like(q), padded_like(k)
    info = sim.rotary_sim(q, k, cos, sin, qo, ko, interleaved, conj, 132, **ix)
    return qo, ko, info
