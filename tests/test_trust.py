"""Issue 7: adversarial input, requires_grad combinations, determinism, thread safety, opcheck of
the compiled ops, CUDA-graph capture (GPU), and index math past 2^31 elements (slow)."""

import threading

import pytest
import torch

import rotary_kernels as rk
from rotary_kernels import _compiled
from rotary_kernels.reference import apply_rotary_transformers_reference, rotary_reference

from conftest import TOL


def qkcs(B=2, S=3, Hq=4, Hk=2, D=16, R=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=g).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(B, S, Hk, D, generator=g).to(dtype).to(device).transpose(1, 2)
    ang = torch.rand(B, S, R, generator=g) * 6.3
    return q, k, ang.cos().to(device), ang.sin().to(device)


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (3, 1, 1, 2), (1, 7, 1, 2), (1, 1, 9, 4)],
                         ids=["one-element-pair", "batch-S1", "S7-single-head", "one-token-many-heads"])
def test_degenerate_shapes(dev_backend, shape):
    device, backend = dev_backend
    B, H, S, D = shape
    q, k, cos, sin = qkcs(B, S, H, 1, D, D, device=device)
    got = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    for g, w in zip(got, apply_rotary_transformers_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_nan_inf_in_cos_propagate(dev_backend):
    device, backend = dev_backend
    q, k, cos, sin = qkcs(device=device)
    cos[0, 1, 2] = float("nan")
    sin[1, 2, 5] = float("inf")
    sin[1, 0, 3] = float("-inf")
    got = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    for g, w in zip(got, apply_rotary_transformers_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, w, equal_nan=True, **TOL[torch.float32])
        assert torch.equal(torch.isnan(g), torch.isnan(w)) and torch.equal(torch.isinf(g), torch.isinf(w))


@pytest.mark.parametrize("needs", ["q", "k", "cos", "sin", "q+cos", "none"])
def test_requires_grad_combinations(dev_backend, needs):
    device, backend = dev_backend
    q, k, cos, sin = qkcs(device=device)
    ts = dict(q=q, k=k, cos=cos, sin=sin)
    for name in needs.split("+"):
        if name in ts:
            ts[name].requires_grad_()
    got = rk.apply_rotary_transformers(ts["q"], ts["k"], ts["cos"], ts["sin"], backend=backend)
    want = apply_rotary_transformers_reference(ts["q"], ts["k"], ts["cos"], ts["sin"])
    assert all(g.requires_grad == w.requires_grad for g, w in zip(got, want))
    if needs == "none":
        return
    params = [ts[n] for n in needs.split("+")]
    live = [i for i in (0, 1) if want[i].requires_grad]
    grads = [torch.randn_like(got[i]) for i in live]
    ga = torch.autograd.grad([got[i] for i in live], params, grads, allow_unused=True)
    gb = torch.autograd.grad([want[i] for i in live], params, grads, allow_unused=True)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_func_grad_and_double_backward(dev_backend):
    """torch.func.grad (functorch) and create_graph double backward match the reference."""
    device, backend = dev_backend
    q, k, cos, sin = (t.double() for t in qkcs(device=device))

    def loss(impl):
        def f(q, k):
            qe, ke = impl(q, k, cos, sin)
            return (qe.pow(2) * torch.arange(qe.shape[-1], device=device)).sum() + ke.pow(3).sum()
        return f

    ours = lambda *a: rk.apply_rotary_transformers(*a, backend=backend)  # noqa: E731
    for a, b in zip(torch.func.grad(loss(ours), argnums=(0, 1))(q, k),
                    torch.func.grad(loss(apply_rotary_transformers_reference), argnums=(0, 1))(q, k)):
        torch.testing.assert_close(a, b)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    hv = []
    for impl in (ours, apply_rotary_transformers_reference):
        g = torch.autograd.grad(loss(impl)(qg, kg), (qg, kg), create_graph=True)
        hv.append(torch.autograd.grad(sum(x.sum() for x in g), (qg, kg)))
    for a, b in zip(*hv):
        torch.testing.assert_close(a, b)
    # eager mode records the one-function twin (host time: _autograd.rotary), and so does its
    # create_graph backward; torch.func saw Rotary itself above
    out = ours(qg, kg, cos, sin)[0]
    assert type(out.grad_fn).__name__ == "RotaryEagerBackward"
    g = torch.autograd.grad(out.pow(2).sum(), qg, create_graph=True)[0]
    assert type(g.grad_fn).__name__ == "RotaryEagerBackward"


def test_rejects_partial_overlap_accepts_exact(dev_backend):
    device, backend = dev_backend
    buf = torch.randn(2, 3, 6, 16, device=device)  # [B, S, H, D]
    q, k = buf[:, :, :4].transpose(1, 2), buf[:, :, 4:].transpose(1, 2)  # disjoint heads of one buffer: fine
    cos, sin = qkcs(device=device)[2:]
    want = apply_rotary_transformers_reference(q, k, cos, sin)
    with torch.no_grad():
        rk.apply_rotary_transformers_(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(q, want[0], **TOL[torch.float32])
    torch.testing.assert_close(k, want[1], **TOL[torch.float32])
    x = torch.randn(40, device=device)
    with pytest.raises(ValueError, match="out1 overlaps x1"):  # out1 shifted by one element over x1
        rk.apply_rotary(x[:16].view(2, 8), x[16:32].view(2, 8), torch.ones(8, device=device),
                        torch.zeros(8, device=device), x[1:17].view(2, 8), x[16:32].view(2, 8), backend=backend)
    k2 = buf[:, :, 3:5].transpose(1, 2).contiguous()
    with pytest.raises(ValueError, match="q overlaps k"):  # k is a window of q's memory
        qq = torch.randn(2, 4, 3, 16, device=device)
        rk.apply_rotary_transformers_(qq, qq.view(-1)[8 : 8 + qq[:, :2].numel()].view(2, 2, 3, 16), cos, sin,
                                      backend=backend)
    del k2
    with pytest.raises(ValueError, match="q overlaps cos"):  # cos is a window of q's memory
        qq = torch.randn(2, 4, 3, 16, device=device)
        c = qq.view(-1)[4 : 4 + cos.numel()].view(cos.shape)
        rk.apply_rotary_transformers_(qq, torch.randn(2, 1, 3, 16, device=device), c, torch.ones_like(c),
                                      backend=backend)


def test_deterministic_run_to_run(dev_backend):
    device, backend = dev_backend
    q, k, cos, sin = qkcs(4, 33, 8, 2, 64, 64, dtype=torch.bfloat16, device=device)
    a = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    for _ in range(3):
        b = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_thread_safety(dev_backend):
    """Concurrent calls from Python threads (dispatch, Triton caches, the compiled ops)."""
    device, backend = dev_backend
    cases = [qkcs(2, 5 + i, 4, 2, 32, 32 if i % 2 else 16, dtype=torch.bfloat16, device=device, seed=i)
             for i in range(6)]
    want = [rk.apply_rotary_transformers(*c, backend="reference") for c in cases]
    errors = []

    def work(i):
        try:
            for _ in range(3):
                got = rk.apply_rotary_transformers(*cases[i], backend=backend)
                for g, w in zip(got, want[i]):
                    torch.testing.assert_close(g, w, **TOL[torch.bfloat16])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.skipif(not _compiled.HAS_EXT, reason="extension not built")
def test_opcheck_compiled_ops():
    ops = _compiled.ops
    q, k, cos, sin = qkcs(D=16, R=12)
    from rotary_kernels._canon import canonical_cs, canonical_view, x_axes

    axes = x_axes("q", q, cos, 1)
    q4, k4 = canonical_view(q, axes), canonical_view(k, x_axes("k", k, cos, 1))
    c3, s3 = canonical_cs(cos, q, axes), canonical_cs(sin, q, axes)
    torch.library.opcheck(ops.rotary.default, (q4, k4, c3, s3, torch.empty_like(q4), torch.empty_like(k4), False, True))
    torch.library.opcheck(ops.rotary_inplace.default, (q4.clone(), k4.clone(), c3, s3, True, False))
    cache_c, cache_s = torch.randn(9, 12), torch.randn(9, 12)
    pos = torch.randint(0, 9, (1, *q4.shape[:2]))
    torch.library.opcheck(ops.rotary.default, (q4, None, cache_c, cache_s, torch.empty_like(q4), None, False, False),
                          dict(positions=pos, offset=0))
    x1, x2 = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    torch.library.opcheck(ops.apply_rotary.default, (x1, x2, torch.randn(3, 1, 8), torch.randn(3, 1, 8),
                                                     torch.empty_like(x1), torch.empty_like(x2), False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_and_replay(backend):
    if backend not in rk.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    q, k, cos, sin = qkcs(2, 64, 8, 2, 128, 128, dtype=torch.bfloat16, device="cuda")
    pos = torch.randint(0, 64, (2, 64), device="cuda")
    cache_c, cache_s = cos[0], sin[0]
    rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)  # warm up (compile Triton) outside capture
    rk.apply_rotary_transformers(q, k, cache_c, cache_s, positions=pos, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
        out_pos = rk.apply_rotary_transformers(q, k, cache_c, cache_s, positions=pos, backend=backend)
    q.copy_(torch.randn_like(q))  # new inputs in the same buffers
    pos.copy_(torch.randint(0, 64, (2, 64), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(out, apply_rotary_transformers_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, w, **TOL[torch.bfloat16])
    for g, x in zip(out_pos, (q, k)):
        torch.testing.assert_close(g, rotary_reference(x, cache_c[pos], cache_s[pos]), **TOL[torch.bfloat16])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_decode_with_tensor_offsets(backend):
    """Decode under a CUDA graph: a tensor seqlen_offsets is read at replay (an int would be a
    launch constant frozen into the graph, as the README says)."""
    if backend not in rk.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    q, k, _, _ = qkcs(4, 1, 8, 2, 128, 128, dtype=torch.bfloat16, device="cuda")
    ang = torch.rand(64, 128, device="cuda") * 6.3
    cache_c, cache_s = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    off = torch.zeros(4, dtype=torch.int64, device="cuda")
    rk.apply_rotary_transformers(q, k, cache_c, cache_s, seqlen_offsets=off, backend=backend)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rk.apply_rotary_transformers(q, k, cache_c, cache_s, seqlen_offsets=off, backend=backend)
    for step in (5, 17, 63):
        off.copy_(torch.tensor([step, step - 1, step - 2, step - 3]))
        graph.replay()
        torch.cuda.synchronize()
        for g, x in zip(out, (q, k)):
            rows = off[:, None].expand(4, 1)
            torch.testing.assert_close(g, rotary_reference(x, cache_c[rows], cache_s[rows]), **TOL[torch.bfloat16])


@pytest.mark.slow
@pytest.mark.skipif(not _compiled.HAS_EXT, reason="extension not built")
def test_index_math_past_2_31_elements_cpu():
    """A bf16 q of just over 2^31 elements (4.3 GB; ~4.4 GB peak, in place): the last tokens,
    whose element offsets exceed int32, must be rotated correctly (int64 index math end to end)."""
    B, H, D, tail = 1, 8, 128, 4096
    S = (2**31 + 2**20) // (B * H * D)
    q = torch.ones(B, H, S, D, dtype=torch.bfloat16)
    assert q.numel() > 2**31 and q[:, -1:, -1:].storage_offset() > 2**31
    g = torch.Generator().manual_seed(0)
    q[:, :, -tail:] = torch.randn(B, H, tail, D, generator=g).to(torch.bfloat16)
    before = q[:, :, -tail:].clone()
    cos, sin = torch.ones(1, S, D), torch.zeros(1, S, D)  # identity except on the tail
    ang = torch.rand(tail, D, generator=g) * 6.3
    cos[0, -tail:], sin[0, -tail:] = ang.cos(), ang.sin()
    with torch.no_grad():
        rk.apply_rotary_emb_(q, cos, sin, backend="cpu")
    torch.testing.assert_close(q[:, :, -tail:], rotary_reference(before, cos[:, -tail:], sin[:, -tail:]),
                               **TOL[torch.bfloat16])
    assert torch.all(q[:, :, :16] == 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounded_once_at_least_as_accurate_as_eager(dev_backend, dtype):
    """Against a float64 evaluation: ours is within half an ulp of the terms' magnitude (fp32 math,
    one rounding) and never worse than transformers' eager formula (three roundings)."""
    device, backend = dev_backend
    q, k, cos, sin = qkcs(1, 64, 8, 2, 64, 64, dtype=dtype, device=device)
    cos, sin = cos.to(dtype), sin.to(dtype)  # as transformers passes them
    truth = apply_rotary_transformers_reference(q.double(), k.double(), cos.double(), sin.double())
    ours = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    from rotary_kernels.reference import rotate_half

    eager = [x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1) for x in (q, k)]
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    for o, e, t, x in zip(ours, eager, truth, (q, k)):
        scale = x.double().abs() * cos.double().abs().unsqueeze(1) + rotate_half(x.double()).abs() * sin.double().abs().unsqueeze(1)
        ulp = torch.exp2(torch.floor(torch.log2(scale.clamp_min(torch.finfo(dtype).tiny))) - mant)
        assert ((o.double() - t).abs() / ulp).max() <= 0.5 + 1e-3
        assert (o.double() - t).abs().max() <= (e.double() - t).abs().max()
