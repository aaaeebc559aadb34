"""The compiled ops themselves (torch.ops._rotary_kernels_C): schemas, checks, memory-layout paths.

The public API reaches these through the 'cpu' and 'cuda' backends (tested with every other
backend in test_rotary.py); here they are called directly on canonical tensors:
q [A, S, H, D], cos/sin [A, S, R]. CUDA cases run only where a GPU is visible.
"""

import re

import pytest
import torch

from rotary_kernels import _compiled
from rotary_kernels.reference import rotary_reference

from conftest import TOL

pytestmark = pytest.mark.skipif(not _compiled.HAS_EXT, reason=f"extension not built: {_compiled.IMPORT_ERROR}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _compiled.HAS_CUDA_EXT else [])


def _conj_ref(x, cos, sin, interleaved):
    """The conj (backward) map is the transpose of the forward one: a vector-Jacobian product."""
    z = torch.zeros(x.shape, dtype=torch.float64, device=x.device, requires_grad=True)
    y = rotary_reference(z, cos.double(), sin.double(), 2, interleaved)
    (g,) = torch.autograd.grad(y, z, x.double())
    return g


def canonical(A, S, H, D, dtype, device, layout="contig", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "contig":
        return torch.randn(A, S, H, D, generator=g).to(dtype).to(device)
    if layout == "heads_outer":  # [A, H, S, D] memory, viewed as [A, S, H, D] (transformers' q)
        return torch.randn(A, H, S, D, generator=g).to(dtype).to(device).transpose(1, 2)
    if layout == "strided_d":  # head dim not contiguous: the scalar path
        return torch.randn(A, S, H, 2 * D, generator=g).to(dtype).to(device)[..., ::2]
    if layout == "misaligned":  # data pointer one element off a 16-byte boundary
        return torch.randn(A * S * H * D + 1, generator=g).to(dtype).to(device)[1:].view(A, S, H, D)
    raise ValueError(layout)


def tables(A, S, R, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(A, S, R, generator=g) * 6.3
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def close(got, want):
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[got.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contig", "heads_outer", "strided_d", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 48), (40, 20), (8, 2)])
def test_rotary_op_paths(device, layout, dtype, interleaved, D, R):
    A, S, Hq, Hk = 2, 3, 3, 2
    q = canonical(A, S, Hq, D, dtype, device, layout)
    k = canonical(A, S, Hk, D, dtype, device, layout, seed=2)
    cos, sin = tables(A, S, R, torch.float32, device)
    q0, k0 = q.clone(), k.clone()
    for conj in (False, True):
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        _compiled.ops.rotary(q, k, cos, sin, qo, ko, interleaved, conj)
        want_q = _conj_ref(q, cos, sin, interleaved) if conj else rotary_reference(q, cos, sin, 2, interleaved)
        want_k = _conj_ref(k, cos, sin, interleaved) if conj else rotary_reference(k, cos, sin, 2, interleaved)
        close(qo, want_q)
        close(ko, want_k)
        assert torch.equal(q, q0) and torch.equal(k, k0)
        # In place gives the same bits.
        qi, ki = q.clone(), k.clone()
        _compiled.ops.rotary_inplace(qi, ki, cos, sin, interleaved, conj)
        assert torch.equal(qi, qo) and torch.equal(ki, ko)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cs_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_op_cos_dtypes_and_broadcast(device, cs_dtype):
    # bf16 q with fp32, bf16 (same) and fp16 (converted) tables; tables broadcast over A (stride 0).
    q = canonical(3, 5, 4, 32, torch.bfloat16, device)
    cos, sin = tables(1, 5, 32, cs_dtype, device)
    cos, sin = cos.expand(3, 5, 32), sin.expand(3, 5, 32)
    qo = torch.empty_like(q)
    _compiled.ops.rotary(q, None, cos, sin, qo, None, False, False)
    close(qo, rotary_reference(q, cos, sin, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_op_empty(device):
    for shape in [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)]:
        q = torch.randn(shape, device=device)
        cos = torch.randn(shape[0], shape[1], 8, device=device)
        qo = torch.empty_like(q)
        _compiled.ops.rotary(q, None, cos, cos, qo, None, False, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conj", [False, True])
def test_apply_rotary_op(device, conj):
    x = torch.randn(2, 5, 3, 16, device=device, dtype=torch.bfloat16)
    x1, x2 = x[..., :8], x[..., 8:]
    cos, sin = tables(1, 5, 8, torch.float32, device)
    cos, sin = cos[0, :, None], sin[0, :, None]  # [S, 1, R/2] broadcast over batch and heads
    o1, o2 = torch.empty_like(x1), torch.empty_like(x2)
    _compiled.ops.apply_rotary(x1, x2, cos, sin, o1, o2, conj)
    s = -sin if conj else sin
    f1, f2 = x1.float(), x2.float()
    close(o1, f1 * cos - f2 * s)
    close(o2, f1 * s + f2 * cos)
    # In place (out aliases x) gives the same result.
    _compiled.ops.apply_rotary(x1, x2, cos, sin, x1, x2, conj)
    assert torch.equal(x1, o1) and torch.equal(x2, o2)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q = canonical(2, 3, 4, 16, torch.float32, device, "heads_outer")
    k = canonical(2, 3, 2, 16, torch.float32, device)
    cos, sin = tables(2, 3, 8, torch.float32, device)
    ops = _compiled.ops
    torch.library.opcheck(ops.rotary, (q, k, cos, sin, torch.empty_like(q), torch.empty_like(k), False, False))
    torch.library.opcheck(ops.rotary, (q, None, cos, sin, torch.empty_like(q), None, True, True))
    torch.library.opcheck(ops.rotary_inplace, (q.clone(), k.clone(), cos, sin, False, False))
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # [A, H, S, D]: transformers' unsqueeze_dim=1
    torch.library.opcheck(ops.rotary_transformers, (qt, kt, cos, sin, 1, False, False))
    torch.library.opcheck(ops.rotary_transformers, (q, None, cos, sin, 2, True, True))
    x1, x2 = torch.randn(2, 3, 4, 8, device=device), torch.randn(2, 3, 4, 8, device=device)
    torch.library.opcheck(ops.apply_rotary, (x1, x2, cos[0, :, None], sin[0, :, None], torch.empty_like(x1),
                                             torch.empty_like(x2), False))


def test_op_checks_raise():
    # The messages' sizes, dtypes and devices are formatted by rotary_ops.h's message() (no
    # iostreams; see RK_CHECK there), like PyTorch's own.
    q = torch.randn(2, 3, 4, 16)
    cos = torch.randn(2, 3, 16)
    ops = _compiled.ops
    cases = [
        (lambda: ops.rotary(q[0], None, cos, cos, q[0], None, False, False),
         re.escape("q must be 4-D [A, S, H, D], got [3, 4, 16]")),
        (lambda: ops.rotary(q, None, cos[..., :7], cos[..., :7], q.clone(), None, False, False),
         "must be even, positive and <= D=16, got 7"),
        (lambda: ops.rotary(q, None, cos[:, :2], cos[:, :2], q.clone(), None, False, False),
         re.escape("q's A, S: q [2, 3, 4, 16], cos [2, 2, 16]")),
        (lambda: ops.rotary(q, None, cos, cos, q.clone().double(), None, False, False),
         re.escape("q_out must have its input's shape, dtype and device: expected [2, 3, 4, 16] Float on cpu, "
                   "got [2, 3, 4, 16] Double on cpu")),
        (lambda: ops.rotary(q.int(), None, cos, cos, q.int(), None, False, False), "q must be float32.*, got Int$"),
        (lambda: ops.rotary(q, None, cos[None, :1].expand(3, 1, 3, 16), cos[None, :1].expand(3, 1, 3, 16),
                            q.clone(), None, False, False, mrope_section=[4, 2, 1]),
         "mrope_section must be 3 non-negative sizes summing to R/2 = 8"),
        (lambda: ops.rotary(q, q[..., :8], cos, cos, q.clone(), q[..., :8].clone(), False, False), "k must be"),
        (lambda: ops.rotary(q, q, cos, cos, q.clone(), None, False, False), "both be given"),
        (lambda: ops.apply_rotary(q, q[..., :8], cos, cos, q, q, False), "same shape"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and the CUDA extension")
@pytest.mark.parametrize("A,S,Hq,Hk", [(64, 1, 32, 8), (1, 4096, 32, 8), (2, 1024, 40, 40), (1, 7, 1, 1)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_cuda_launch_shapes(A, S, Hq, Hk, interleaved):
    # Decode (rows split over grid.y), long prefill (two rows per thread), MHA, tiny.
    q = canonical(A, S, Hq, 128, torch.bfloat16, "cuda", "heads_outer")
    k = canonical(A, S, Hk, 128, torch.bfloat16, "cuda", "heads_outer", seed=3)
    cos, sin = tables(A, S, 128, torch.bfloat16, "cuda")
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    _compiled.ops.rotary(q, k, cos, sin, qo, ko, interleaved, False)
    close(qo, rotary_reference(q, cos, sin, 2, interleaved))
    close(ko, rotary_reference(k, cos, sin, 2, interleaved))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R", [128, 64])
def test_cuda_matches_triton(dtype, interleaved, R):
    # Two independent GPU implementations, fp32 math, one rounding: equal within one ulp.
    import rotary_kernels as rk

    q = torch.randn(2, 96, 32, 128, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 96, 8, 128, device="cuda", dtype=dtype).transpose(1, 2)
    cos, sin = tables(2, 96, R, torch.float32, "cuda")
    outs = {}
    for backend in ("cuda", "triton"):
        qq, kk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        qe, ke = rk.apply_rotary_transformers(qq, kk, cos, sin, interleaved=interleaved, backend=backend)
        (qe.float().square().sum() + ke.float().sum()).backward()
        outs[backend] = (qe, ke, qq.grad, kk.grad)
    for a, b in zip(outs["cuda"], outs["triton"]):
        torch.testing.assert_close(a, b, **TOL[dtype])
