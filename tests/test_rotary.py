"""Every kernel backend against the reference: forward, backward, in place, layouts."""

import pytest
import torch

import rotary_kernels as rk
from rotary_kernels.reference import apply_rotary_transformers_reference, rotary_reference

from conftest import TOL


def make_qk(B, S, Hq, Hk, D, dtype, device, layout, seed=0):
    """q/k as transformers hands them over: 'bhsd_view' is the transpose of a [B, S, H, D]
    projection output (non-contiguous), 'bhsd' contiguous [B, H, S, D], 'bshd' for
    unsqueeze_dim=2."""
    g = torch.Generator().manual_seed(seed)

    def one(H):
        t = torch.randn(B, S, H, D, generator=g, dtype=torch.float32).to(dtype)
        if layout == "bhsd_view":
            return t.transpose(1, 2).to(device)
        if layout == "bhsd":
            return t.transpose(1, 2).contiguous().to(device)
        return t.to(device)

    return one(Hq), one(Hk)


def make_cs(B, S, R, dtype, device, seed=1, batched=True):
    g = torch.Generator().manual_seed(seed)
    # Real RoPE tables: cos/sin of angles, halves duplicated like transformers builds them.
    pos = torch.arange(S, dtype=torch.float32)[:, None] + torch.randint(0, 100, (B, 1, 1), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    ang = pos * inv
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)
    return (cos, sin) if batched else (cos[0], sin[0])


def assert_close(a, b, dtype=None):
    torch.testing.assert_close(a, b, **TOL[dtype or a.dtype])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,R", [(64, 64), (80, 80), (128, 128), (256, 256), (128, 64), (80, 32)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_forward_grid(dev_backend, dtype, D, R, interleaved):
    device, backend = dev_backend
    for layout, (Hq, Hk) in [("bhsd_view", (4, 2)), ("bshd", (3, 1))]:
        ud = 2 if layout == "bshd" else 1
        q, k = make_qk(2, 3, Hq, Hk, D, dtype, device, layout)
        cos, sin = make_cs(2, 3, R, torch.float32, device)
        q0, k0 = q.clone(), k.clone()
        got = rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, backend=backend)
        want = apply_rotary_transformers_reference(q, k, cos, sin, ud, interleaved)
        for g, w, x in zip(got, want, (q, k)):
            assert g.dtype == x.dtype and g.shape == x.shape and g.device == x.device
            assert g.stride() == x.stride()  # output keeps the input's memory layout
            assert_close(g, w)
        assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched


@pytest.mark.parametrize("cs_dtype", ["same", torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cos_sin_dtypes(dev_backend, dtype, cs_dtype):
    device, backend = dev_backend
    q, k = make_qk(2, 4, 2, 1, 32, dtype, device, "bhsd_view")
    cos, sin = make_cs(2, 4, 32, dtype if cs_dtype == "same" else cs_dtype, device)
    got = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    want = apply_rotary_transformers_reference(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, w)


@pytest.mark.parametrize(
    "case",
    ["decode_S1", "cos_2d", "mqa", "single_head", "D2", "contig_bhsd", "3d_input", "sliced", "expand_batch",
     "odd_cos_halves", "q_k_different_D", "q_k_different_dtype", "partial"],
)
def test_shapes_and_layouts(backend, case):
    device, backend = backend
    dtype = torch.float32
    B, S, Hq, Hk, D, R, ud, layout = 2, 3, 4, 2, 16, 16, 1, "bhsd_view"
    if case == "decode_S1":
        S = 1
    if case == "mqa":
        Hk = 1
    if case == "single_head":
        Hq = Hk = 1
    if case == "D2":
        D = R = 2
    if case == "partial":
        R = D // 2
    if case == "contig_bhsd":
        layout = "bhsd"
    q, k = make_qk(B, S, Hq, Hk, D, dtype, device, layout)
    cos, sin = make_cs(B, S, R, dtype, device)
    if case == "cos_2d":  # [S, R] cos with unsqueeze_dim=0 -> broadcast over batch and heads
        cos, sin, ud = cos[0], sin[0], 0
    if case == "3d_input":  # [H, S, D] with [S, R] cos
        q, k, cos, sin, ud = q[0], k[0], cos[0], sin[0], 0
    if case == "sliced":  # non-dense views: every other head, and a slice of the head dim
        big_q, big_k = make_qk(B, S, 2 * Hq, Hk, D + 8, dtype, device, "bhsd_view")
        q, k = big_q[:, ::2, :, 4 : 4 + D], big_k[..., :D]
    if case == "expand_batch":  # cos shared by the batch through a zero stride
        cos, sin = cos[:1].expand(B, S, R), sin[:1].expand(B, S, R)
    if case == "odd_cos_halves":  # arbitrary tables: each element uses its own cos/sin
        cos, sin = torch.randn_like(cos), torch.randn_like(sin)
    if case == "q_k_different_D":  # k with a larger head dim than q: two launches, same result
        k = make_qk(B, S, Hq, Hk, D + 8, dtype, device, layout, seed=5)[1]
    if case == "q_k_different_dtype":
        k = k.to(torch.bfloat16)
    got = rk.apply_rotary_transformers(q, k, cos, sin, ud, backend=backend)
    want = apply_rotary_transformers_reference(q, k, cos, sin, ud)
    def layout(t):
        return [st for st, n in zip(t.stride(), t.shape) if n > 1]  # (size-1 dims' strides are free)

    for g, w, x in zip(got, want, (q, k)):
        assert_close(g, w)
        if case != "sliced":  # outputs in the inputs' memory layout, on every backend (partial rotary too)
            assert layout(g) == layout(x)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R", [32, 16])
def test_single_tensor_and_inplace(dev_backend, interleaved, R):
    device, backend = dev_backend
    q, k = make_qk(2, 3, 4, 2, 32, torch.bfloat16, device, "bhsd_view")
    cos, sin = make_cs(2, 3, R, torch.float32, device)
    x0 = q.clone()
    out = rk.apply_rotary_emb(q, cos, sin, 1, interleaved, backend=backend)
    assert_close(out, rotary_reference(q, cos, sin, 1, interleaved))
    assert torch.equal(q, x0)
    # in place: bitwise the out-of-place result, same tensor returned, pass-through dims untouched
    qo, ko = rk.apply_rotary_transformers(q, k, cos, sin, interleaved=interleaved, backend=backend)
    q2, k2 = q.clone().transpose(1, 2).contiguous().transpose(1, 2), k.clone()
    rq, rk_ = rk.apply_rotary_transformers_(q2, k2, cos, sin, interleaved=interleaved, backend=backend)
    assert rq is q2 and rk_ is k2
    assert torch.equal(q2, qo) and torch.equal(k2, ko)
    x = q.clone()
    assert rk.apply_rotary_emb_(x, cos, sin, 1, interleaved, backend=backend) is x
    assert torch.equal(x, out)


def test_zero_size(dev_backend):
    device, backend = dev_backend
    cos, sin = make_cs(2, 0, 8, torch.float32, device)
    q = torch.empty(2, 4, 0, 8, device=device)
    k = torch.empty(2, 2, 0, 8, device=device)
    qo, ko = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape


def test_nan_inf_propagate_like_reference(dev_backend):
    device, backend = dev_backend
    q, k = make_qk(1, 2, 2, 1, 8, torch.float32, device, "bhsd_view")
    q[0, 0, 0, 0] = float("nan")
    q[0, 1, 1, 3] = float("inf")
    cos, sin = make_cs(1, 2, 8, torch.float32, device)
    got = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    want = apply_rotary_transformers_reference(q, k, cos, sin)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, **TOL[torch.float32])


# ---------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R", [32, 16])
def test_backward_matches_reference(dev_backend, dtype, interleaved, R):
    device, backend = dev_backend
    q, k = make_qk(2, 3, 4, 2, 32, dtype, device, "bhsd_view")
    cos, sin = make_cs(2, 3, R, torch.float32, device)
    gq, gk = (torch.randn(x.shape, dtype=torch.float32).to(dtype).to(device) for x in (q, k))

    def grads(fn):
        qq, kk = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        oq, ok = fn(qq, kk)
        torch.autograd.backward((oq, ok), (gq, gk))
        return qq.grad, kk.grad

    got = grads(lambda a, b: rk.apply_rotary_transformers(a, b, cos, sin, interleaved=interleaved, backend=backend))
    want = grads(lambda a, b: apply_rotary_transformers_reference(a, b, cos, sin, 1, interleaved))
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(dev_backend, interleaved):
    """Full (slow-mode) gradcheck of q, k, cos and sin on a tiny shape, partial rotary, GQA,
    transposed q, [S, R] cos (unsqueeze_dim=0), and gradgradcheck of the q/k path."""
    device, backend = dev_backend
    opts = dict(dtype=torch.float64, device=device)
    q = torch.randn(1, 3, 2, 6, **opts).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 1, 3, 6, **opts).requires_grad_()
    cos = torch.randn(3, 4, **opts).requires_grad_()
    sin = torch.randn(3, 4, **opts).requires_grad_()

    def fn(q, k, cos, sin):
        return rk.apply_rotary_transformers(q, k, cos, sin, 0, interleaved=interleaved, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, cos, sin))
    assert torch.autograd.gradgradcheck(fn, (q, k, cos.detach(), sin.detach()), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda x, c, s: rk.apply_rotary_emb(x, c, s, 0, interleaved, backend=backend), (q, cos, sin), fast_mode=True
    )


def test_cos_sin_grads_bf16(dev_backend):
    """Learned/differentiated frequencies: cos/sin grads (fp32) from bf16 activations."""
    device, backend = dev_backend
    q, k = make_qk(2, 3, 4, 2, 16, torch.bfloat16, device, "bhsd_view")
    cos0, sin0 = make_cs(2, 3, 16, torch.float32, device)

    def grads(fn):
        c, s = cos0.clone().requires_grad_(), sin0.clone().requires_grad_()
        oq, ok = fn(q, k, c, s)
        (oq.float().square().sum() + ok.float().sum()).backward()
        return c.grad, s.grad

    got = grads(lambda *a: rk.apply_rotary_transformers(*a, backend=backend))
    want = grads(apply_rotary_transformers_reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_only_one_output_used(dev_backend):
    device, backend = dev_backend
    q, k = make_qk(1, 2, 2, 1, 8, torch.float32, device, "bhsd_view")
    cos, sin = make_cs(1, 2, 8, torch.float32, device)
    q.requires_grad_()
    oq, _ = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    oq.sum().backward()
    qr = q.detach().clone().requires_grad_()
    apply_rotary_transformers_reference(qr, k, cos, sin)[0].sum().backward()
    assert_close(q.grad, qr.grad)


# ---------------------------------------------------------------- transformers itself

def test_matches_transformers_formula(dev_backend):
    """The literal transformers formula (eager, three bf16 roundings) vs ours (one rounding)."""
    device, backend = dev_backend

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)

    for dtype in (torch.float32, torch.bfloat16):
        q, k = make_qk(2, 5, 4, 2, 64, dtype, device, "bhsd_view")
        cos, sin = make_cs(2, 5, 64, dtype, device)
        got = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
        want = hf_apply_rotary_pos_emb(q, k, cos, sin)
        # eager bf16 rounds q*cos, rotate_half(q)*sin and their sum: up to ~2 ulp apart from us
        tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=3 * 2**-8, atol=3 * 2**-8)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tol)


def test_default_backend_and_listing():
    assert "reference" in rk.available_backends("cpu")
    if not torch.cuda.is_available():  # (asked about a GPU this machine lacks: an answer, not the driver's error)
        assert rk.available_backends("cuda") == rk.available_backends("cuda:1") == ["reference"]
    q, k = make_qk(1, 2, 2, 1, 8, torch.float32, "cpu", "bhsd")
    cos, sin = make_cs(1, 2, 8, torch.float32, "cpu")
    for g, w in zip(rk.apply_rotary_transformers(q, k, cos, sin), apply_rotary_transformers_reference(q, k, cos, sin)):
        assert_close(g, w)
    for b in ("reference",):
        assert_close(rk.apply_rotary_emb(q, cos, sin, backend=b), rotary_reference(q, cos, sin))


# ---------------------------------------------------------------- per-pair tables, conj

def gpt_oss_formula(x, cos, sin, interleaved):
    """gpt-oss's rotation (transformers' modeling_gpt_oss._apply_rotary_emb): per-pair tables
    [..., R/2] on the first R dims; openai_privacy_filter's form for interleaved pairs."""
    r = 2 * cos.shape[-1]
    xr, xp = x[..., :r].double(), x[..., r:]
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
    c, s = cos.double(), sin.double()
    y1, y2 = a * c - b * s, b * c + a * s
    y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((y.to(x.dtype), xp), -1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_pair_tables_and_conj(dev_backend, interleaved):
    device, backend = dev_backend
    q, k = make_qk(2, 5, 4, 2, 40, torch.float32, device, "bhsd_view")  # partial: R = 32 of D = 40
    g = torch.Generator().manual_seed(3)
    ang = (torch.rand(2, 5, 16, generator=g) * 6.3).to(device)
    cos, sin = ang.cos(), ang.sin()
    got = rk.apply_rotary_transformers(q, k, cos, sin, interleaved=interleaved, pair_tables=True, backend=backend)
    for a, x in zip(got, (q, k)):
        assert_close(a, gpt_oss_formula(x, cos.unsqueeze(1), sin.unsqueeze(1), interleaved))
    # conj: the rotation by -theta (nanochat's rotate_half sign), and the inverse of the rotation
    back = rk.apply_rotary_transformers(*got, cos, sin, interleaved=interleaved, pair_tables=True, conj=True,
                                        backend=backend)
    for a, x in zip(back, (q, k)):
        torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)
    full = [rk.reference.full_width_tables(t, interleaved) for t in (cos, sin)]
    want = apply_rotary_transformers_reference(q, k, full[0], -full[1], 1, interleaved)
    for a, b in zip(rk.apply_rotary_transformers(q, k, *full, interleaved=interleaved, conj=True, backend=backend),
                    want):
        assert_close(a, b)
    # gradients wrt q, k and the per-pair tables against the formula's autograd
    qg, kg = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    cg, sg = cos.double().requires_grad_(), sin.double().requires_grad_()
    for conj in (False, True):
        ours = rk.apply_rotary_transformers(qg, kg, cg, sg, interleaved=interleaved, pair_tables=True, conj=conj,
                                            backend=backend)
        ref = [gpt_oss_formula(x, cg.unsqueeze(1), (-sg if conj else sg).unsqueeze(1), interleaved) for x in (qg, kg)]
        gq = [torch.randn_like(t) for t in ours]
        d_ours = torch.autograd.grad(ours, (qg, kg, cg, sg), gq)
        d_ref = torch.autograd.grad(ref, (qg, kg, cg, sg), gq)
        for a, b in zip(d_ours, d_ref):
            torch.testing.assert_close(a, b)
    # in place, single tensor, packed qkv and a per-pair cache with positions
    qi = q.clone()
    with torch.no_grad():
        rk.apply_rotary_emb_(qi, cos, sin, interleaved=interleaved, pair_tables=True, conj=True, backend=backend)
    assert_close(qi, rk.apply_rotary_emb(q, cos, sin, 1, interleaved, pair_tables=True, conj=True, backend="reference"))
    pos = torch.randint(0, 9, (2, 5), generator=g).to(device)
    cache = (torch.rand(9, 16, generator=g) * 6.3).to(device)
    got = rk.apply_rotary_emb(q, cache.cos(), cache.sin(), interleaved=interleaved, pair_tables=True, positions=pos,
                              backend=backend)
    assert_close(got, gpt_oss_formula(q, cache.cos()[pos].unsqueeze(1), cache.sin()[pos].unsqueeze(1), interleaved))
    with pytest.raises(TypeError, match="pair_tables must be a bool"):
        rk.apply_rotary_emb(q, cos, sin, pair_tables=1, backend=backend)


def test_llama4_complex_freqs_cis(dev_backend):
    """rk.apply_rotary_emb_complex against transformers' Llama 4 apply_rotary_emb (complex product)."""
    device, backend = dev_backend
    pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        xq = torch.randn(2, 6, 4, 32, generator=g).to(dtype).to(device)
        xk = torch.randn(2, 6, 2, 32, generator=g).to(dtype).to(device)
        freqs_cis = torch.polar(torch.ones(2, 6, 16), torch.rand(2, 6, 16, generator=g) * 6.3).to(device)
        want = apply_rotary_emb(xq, xk, freqs_cis)
        got = rk.apply_rotary_emb_complex(xq, xk, freqs_cis, backend=backend)
        for a, b in zip(got, want):
            if dtype == torch.float32:
                assert_close(a, b)
            else:  # transformers rounds the fp32 complex product once, like the kernels
                torch.testing.assert_close(a, b, **TOL[dtype])
    with pytest.raises(TypeError, match="freqs_cis must be a complex tensor"):
        rk.apply_rotary_emb_complex(xq, xk, freqs_cis.real, backend=backend)


def test_vllm_cos_sin_cache_and_context_parallel_positions(dev_backend):
    device, backend = dev_backend
    g = torch.Generator().manual_seed(6)
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2) / 32))
    ang = torch.arange(64)[:, None] * inv
    cos_sin_cache = torch.cat((ang.cos(), ang.sin()), -1).to(device)  # vLLM's layout [max_pos, R]
    x = torch.randn(1, 16, 3, 32, generator=g).to(device)  # [B, S, H, D], the whole sequence
    full = rk.apply_rotary_emb(x, *rk.freqs.split_cos_sin_cache(cos_sin_cache), 2, pair_tables=True,
                               positions=torch.arange(16, device=device)[None], backend=backend)
    want = rotary_reference(x, torch.cat((ang.cos(), ang.cos()), -1)[:16].to(device),
                            torch.cat((ang.sin(), ang.sin()), -1)[:16].to(device), 1)
    assert_close(full, want)
    # context parallelism: each rank rotates its two chunks at their global positions
    for rank in range(2):
        pos = rk.freqs.context_parallel_positions(16, 2, rank, device=device)
        assert pos.tolist() == [*range(4 * rank, 4 * rank + 4), *range(12 - 4 * rank, 16 - 4 * rank)]
        got = rk.apply_rotary_emb(x[:, pos], *rk.freqs.split_cos_sin_cache(cos_sin_cache), 2, pair_tables=True,
                                  positions=pos[None], backend=backend)
        assert_close(got, full[:, pos])
    with pytest.raises(ValueError, match="multiple of 2 \\* cp_size"):
        rk.freqs.context_parallel_positions(10, 4, 0)


@pytest.mark.parametrize("compiled", [False, True])
def test_inplace_with_autograd(dev_backend, compiled):
    """flash-attn's differentiable in place: x is rotated in place (version bumped, history
    rebased, also for views such as a packed qkv's heads), gradients are the conj rotation."""
    device, backend = dev_backend
    g = torch.Generator().manual_seed(9)
    cos, sin = make_cs(2, 5, 16, torch.float64, device)
    a = torch.randn(2, 5, 4 + 2 * 2, 16, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(a.shape, generator=g, dtype=torch.float64).to(device)

    def inplace(a):
        qkv = a * 1
        rk.apply_rotary_qkv_(qkv, cos, sin, 4, 2, backend=backend)
        x = a[:, :, :3].transpose(1, 2) * 1  # a transposed view, as transformers passes q
        rk.apply_rotary_emb_(x, cos, sin, backend=backend)
        return qkv, x

    def reference(a):
        q, k = apply_rotary_transformers_reference(a[:, :, :4], a[:, :, 4:6], cos, sin, 2)
        return torch.cat((q, k, a[:, :, 6:]), 2), rotary_reference(a[:, :, :3].transpose(1, 2), cos, sin)

    f = torch.compile(inplace, fullgraph=True) if compiled else inplace
    got, want = f(a), reference(a)
    for x, y in zip(got, want):
        assert_close(x, y)
    d_got = torch.autograd.grad((got[0] * w).sum() + got[1].sum(), a)
    d_want = torch.autograd.grad((want[0] * w).sum() + want[1].sum(), a)
    torch.testing.assert_close(d_got, d_want)
    if not compiled:
        with pytest.raises(RuntimeError, match="x is a leaf tensor that requires grad"):  # torch's own rule
            rk.apply_rotary_emb_(a, cos, sin, 2, backend=backend)
        with pytest.raises(RuntimeError, match="no gradients wrt cos/sin"):
            rk.apply_rotary_emb_(a * 1, cos.requires_grad_(), sin, 2, backend=backend)


def test_inplace_refuses_table_gradients_without_qk_gradients(dev_backend):
    """In place, cos/sin that require gradients raise whether or not q and k do: the one-call
    path took such a call when q and k did not, and cos/sin then silently got no gradient."""
    device, backend = dev_backend
    q, k = torch.randn(1, 4, 3, 8, device=device), torch.randn(1, 2, 3, 8, device=device)
    cos, sin = torch.randn(1, 3, 8, device=device, requires_grad=True), torch.randn(1, 3, 8, device=device)
    for _ in range(2):  # (the second call as the first: nothing recorded lets it through)
        with pytest.raises(RuntimeError, match="no gradients wrt cos/sin"):
            rk.apply_rotary_transformers_(q, k, cos, sin, backend=backend)
        with pytest.raises(RuntimeError, match="no gradients wrt cos/sin"):
            rk.apply_rotary_emb_(q, sin, cos, backend=backend)
    with torch.no_grad():  # (no gradients recorded: rotated)
        got = rk.apply_rotary_transformers_(q.clone(), k.clone(), cos, sin, backend=backend)
    for x, y in zip(got, apply_rotary_transformers_reference(q, k, cos.detach(), sin)):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)


def test_five_dim_packed_qkv_and_kv(dev_backend):
    """flash-attn's packed layouts [B, S, 3, H, D] (qkv) and [B, S, 2, H, D] (kv): q and k
    rotated (one launch), v untouched, out of place, in place and with gradients."""
    device, backend = dev_backend
    g = torch.Generator().manual_seed(11)
    cos, sin = make_cs(2, 5, 12, torch.float32, device)  # partial: R = 12 of D = 16
    qkv = torch.randn(2, 5, 3, 4, 16, generator=g).to(device)
    want = [rotary_reference(qkv[:, :, i], cos, sin, 2) for i in (0, 1)]
    for a, b in zip(rk.apply_rotary_qkv(qkv, cos, sin, backend=backend), want):
        assert_close(a, b)
    x = qkv.clone()
    rk.apply_rotary_qkv_(x, cos, sin, backend=backend)
    assert_close(x[:, :, 0], want[0])
    assert_close(x[:, :, 1], want[1])
    assert torch.equal(x[:, :, 2], qkv[:, :, 2])
    kv = qkv[:, :, 1:].clone()
    assert_close(rk.apply_rotary_kv(kv, cos, sin, backend=backend), want[1])
    rk.apply_rotary_kv_(kv, cos, sin, backend=backend)
    assert_close(kv[:, :, 0], want[1])
    assert torch.equal(kv[:, :, 1], qkv[:, :, 2])
    a = qkv.clone().requires_grad_()
    (rk.apply_rotary_qkv(a, cos, sin, backend=backend)[0] * 2).sum().backward()
    assert torch.equal(a.grad[:, :, 1:], torch.zeros_like(a.grad[:, :, 1:]))
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, D\]"):
        rk.apply_rotary_qkv(qkv, cos, sin, 4, 2, backend=backend)
    with pytest.raises(ValueError, match=r"kv must be \[B, S, 2, H, D\]"):
        rk.apply_rotary_kv(qkv, cos, sin, backend=backend)


def test_deepseek_mla_interleave(dev_backend):
    """rk.apply_rotary_pos_emb_interleave against transformers' DeepSeek-V3 function: values
    (fp32 bit-equal; bf16: one rounding vs its three, within an ulp), gradients, torch.compile,
    on MLA's slice layout (q = the rope part of a [.., nope + rope] head, non-contiguous) with
    GQA/MQA (k with 1 head)."""
    device, backend = dev_backend
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    g = torch.Generator().manual_seed(12)
    cos, sin = make_cs(2, 5, 16, torch.float32, device)
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(2, 4, 5, 24, generator=g).to(dtype).to(device)
        q = base[..., 8:]  # the rope part of a [.., nope + rope] head, as MLA slices it
        k = torch.randn(2, 1, 5, 16, generator=g).to(dtype).to(device)
        want = apply_rotary_pos_emb_interleave(q, k, cos.to(dtype), sin.to(dtype))
        got = rk.apply_rotary_pos_emb_interleave(q, k, cos.to(dtype), sin.to(dtype), backend=backend)
        for a, b in zip(got, want):
            if dtype == torch.float32:  # (x1 c - x2 s in fp32 either way: the same bits)
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, **TOL[dtype])
            assert a.shape == b.shape and a.dtype == b.dtype
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device) for t in (q64, k64)]
    d_got = torch.autograd.grad(rk.apply_rotary_pos_emb_interleave(q64, k64, cos, sin, backend=backend), (q64, k64), w)
    d_want = torch.autograd.grad(apply_rotary_pos_emb_interleave(q64, k64, cos, sin), (q64, k64), w)
    for a, b in zip(d_got, d_want):
        torch.testing.assert_close(a, b)
    # gradients wrt cos/sin too (taken by the reference's PyTorch ops)
    c64, s64 = cos.double().requires_grad_(), sin.double().requires_grad_()
    d_got = torch.autograd.grad(rk.apply_rotary_pos_emb_interleave(q64, k64, c64, s64, backend=backend), (c64, s64), w)
    d_want = torch.autograd.grad(apply_rotary_pos_emb_interleave(q64, k64, c64, s64), (c64, s64), w)
    for a, b in zip(d_got, d_want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="backend must be one of"):  # (checked on that path too)
        rk.apply_rotary_pos_emb_interleave(q64, k64, c64, s64, backend="bogus")
    f = torch.compile(lambda q, k: rk.apply_rotary_pos_emb_interleave(q, k, cos, sin, backend=backend), fullgraph=True)
    for a, b in zip(f(q.float(), k.float()), apply_rotary_pos_emb_interleave(q.float(), k.float(), cos, sin)):
        assert_close(a, b)
    # compiled forward + backward (the transposed map: a custom-op node each way)
    qf, kf = q.float().requires_grad_(), k.float().requires_grad_()
    fg = torch.compile(lambda q, k: [t * 2 for t in rk.apply_rotary_pos_emb_interleave(q, k, cos, sin,
                                                                                           backend=backend)],
                       fullgraph=True)
    w32 = [t.float() for t in w]
    d_got = torch.autograd.grad(fg(qf, kf), (qf, kf), w32)
    d_want = torch.autograd.grad([t * 2 for t in apply_rotary_pos_emb_interleave(qf, kf, cos, sin)], (qf, kf), w32)
    for a, b in zip(d_got, d_want):
        assert_close(a, b)


def test_deepseek_mla_interleave_transforms(dev_backend):
    """torch.func.grad through the MLA rope (the kernel, its backward the transposed map), and
    the [B, S, H, D] layout (unsqueeze_dim=2) with per-token batched tables."""
    device, backend = dev_backend
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    g = torch.Generator().manual_seed(13)
    cos, sin = make_cs(2, 6, 64, torch.float64, device)
    q = torch.randn(2, 3, 6, 64, generator=g, dtype=torch.float64).to(device)
    k = torch.randn(2, 1, 6, 64, generator=g, dtype=torch.float64).to(device)

    def loss(fn):
        return lambda q, k: sum((o * o.detach().sign()).sum() for o in fn(q, k, cos, sin))

    ours = lambda q, k, c, s: rk.apply_rotary_pos_emb_interleave(q, k, c, s, backend=backend)  # noqa: E731
    got = torch.func.grad(loss(ours), argnums=(0, 1))(q, k)
    want = torch.func.grad(loss(apply_rotary_pos_emb_interleave), argnums=(0, 1))(q, k)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    qs, ks = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D] views
    got = rk.apply_rotary_pos_emb_interleave(qs, ks, cos, sin, unsqueeze_dim=2, backend=backend)
    want = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.transpose(1, 2))


def test_deepseek_mla_is_swapped_rotation(dev_backend):
    """The MLA rope is the interleaved rotation with per-pair tables, its pairs moved to the
    half-split layout (reference.swap_pair_layout): bit-equal on every backend (the same
    arithmetic per pair), bf16 with fp32 tables, MLA's rope dim 64."""
    from rotary_kernels.reference import swap_pair_layout

    device, backend = dev_backend
    cos, sin = make_cs(1, 7, 64, torch.float32, device)
    g = torch.Generator().manual_seed(14)
    q = torch.randn(1, 16, 7, 192, generator=g).to(torch.bfloat16).to(device)[..., 128:]
    k = torch.randn(1, 1, 7, 64, generator=g).to(torch.bfloat16).to(device)
    got = rk.apply_rotary_pos_emb_interleave(q, k, cos, sin, backend=backend)
    plain = rk.apply_rotary_transformers(q, k, cos[..., :32], sin[..., :32], interleaved=True, pair_tables=True,
                                         backend=backend)
    for a, b in zip(got, plain):
        assert torch.equal(a, swap_pair_layout(b, 64, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["bhsd", "bshd_view", "strided_d", "partial"])
def test_swap_layout_rows(dev_backend, dtype, layout):
    """swap_layout (``Plan``; MLA's rope and its transpose, interleaved -> half-split and back, with
    conj) on every row path: contiguous rows (the CPU's buffered shuffle), strided head dims (pair by
    pair), partial rotary (the tail copied); bit-equal to the rotation without it, moved to the
    other layout (reference.swap_pair_layout)."""
    from rotary_kernels._api import _rotate
    from rotary_kernels.reference import swap_pair_layout

    device, backend = dev_backend
    D, R = (80, 48) if layout == "partial" else (64, 64)
    g = torch.Generator().manual_seed(15)
    q = torch.randn(2, 3, 5, 2 * D if layout == "strided_d" else D, generator=g).to(dtype).to(device)
    k = torch.randn(2, 1, 5, q.shape[-1], generator=g).to(dtype).to(device)
    if layout == "strided_d":
        q, k = q[..., ::2], k[..., ::2]
    elif layout == "bshd_view":
        q, k = (torch.randn(2, 5, t.shape[1], D, generator=g).to(dtype).to(device).transpose(1, 2) for t in (q, k))
    cos, sin = (t[..., : R // 2] for t in make_cs(2, 5, R, torch.float32, device))
    q[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40])  # (the same bits too)
    bits = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731  (NaNs compared too)
    for interleaved in (True, False):
        for conj in (False, True):
            got = _rotate(q, k, cos, sin, 1, interleaved, conj, backend, {}, None, True, True)
            plain = _rotate(q, k, cos, sin, 1, interleaved, conj, backend, {}, None, True)
            for a, b in zip(got, plain):
                assert torch.equal(bits(a), bits(swap_pair_layout(b, R, interleaved))), (interleaved, conj)


def test_swap_layout_op_contract():
    """The compiled ops take swap_layout out of place only, with per-pair tables and no cos_k/sin_k
    (check_rotary): a pair's two places differ between the layouts."""
    from rotary_kernels import _compiled

    if not _compiled.HAS_EXT:
        pytest.skip("the compiled extension is not built")
    ops = _compiled.ops
    q = torch.randn(1, 4, 2, 16)
    c, s = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="out of place only"):
        ops.rotary_inplace(q, None, c, s, True, False, pair_tables=True, swap_layout=True)
    with pytest.raises(RuntimeError, match="per-pair tables"):
        ops.rotary(q, None, torch.randn(1, 4, 16), torch.randn(1, 4, 16), torch.empty_like(q), None, True, False,
                   swap_layout=True)
    with pytest.raises(RuntimeError, match="per-pair tables"):
        ops.rotary(q, q.clone(), c, s, torch.empty_like(q), torch.empty_like(q), True, False, cos_k=c, sin_k=s,
                   pair_tables=True, swap_layout=True)


def test_deepseek_mla_one_launch(dev_backend, monkeypatch):
    """q and k of the MLA rope are one kernel launch, forward and backward."""
    from test_cos_k import _count_launches

    device, backend = dev_backend
    if backend == "reference":
        pytest.skip("the reference launches no kernel")
    cos, sin = make_cs(2, 5, 16, torch.float32, device)
    q = torch.randn(2, 4, 5, 24, device=device)[..., 8:]
    k = torch.randn(2, 1, 5, 16, device=device)
    counter = _count_launches(monkeypatch, backend)
    with counter:
        rk.apply_rotary_pos_emb_interleave(q, k, cos, sin, backend=backend)
    assert counter.calls == 1, counter.calls
    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    outs = rk.apply_rotary_pos_emb_interleave(a, b, cos, sin, backend=backend)
    counter = _count_launches(monkeypatch, backend)  # (a fresh count)
    with counter:
        torch.autograd.grad(outs, (a, b), (torch.ones_like(q), torch.ones_like(k)))
    assert counter.calls == 1, counter.calls


def _te_formula(t, freqs, fmt, start, interleaved, cu, cp_size, cp_rank):
    """TransformerEngine's apply_rotary_pos_emb written out: each token at position p rotates its
    first R dims by freqs[p] (cos/sin in fp32, TE's fused kernel), positions per format."""
    R = freqs.shape[-1]
    ang = freqs.reshape(freqs.shape[0], R).double()

    def cp_pos(n):  # load-balanced chunks r and 2 cp - 1 - r of a sequence of n tokens
        c = n // (2 * cp_size)
        return torch.cat((torch.arange(cp_rank * c, (cp_rank + 1) * c),
                          torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)))

    if fmt == "thd":
        lengths = (cu[1:] - cu[:-1]).tolist()
        pos = torch.cat([cp_pos(n) if cp_size > 1 else torch.arange(n) + (0 if start is None else int(start[i]))
                         for i, n in enumerate(lengths)])  # [T]
    else:
        S, B = (t.shape[0], t.shape[1]) if fmt == "sbhd" else (t.shape[1], t.shape[0])
        p = cp_pos(S * cp_size) if cp_size > 1 else torch.arange(S)
        pos = p[:, None] + (0 if start is None else start.cpu()[None, :])  # [S, B]
        pos = pos if fmt == "sbhd" else pos.T
    a = ang[pos.to(ang.device)].unsqueeze(-2)  # [..., 1, R]
    x = t[..., :R].double()
    if interleaved:
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    else:
        rot = torch.cat((-x[..., R // 2:], x[..., : R // 2]), -1)
    return torch.cat(((x * a.cos() + rot * a.sin()).to(t.dtype), t[..., R:]), -1)


@pytest.mark.parametrize("fmt", ["sbhd", "bshd", "thd"])
def test_transformer_engine_apply_rotary_pos_emb(dev_backend, fmt):
    """rk.apply_rotary_pos_emb_te against TransformerEngine's formula: angle tables, the three
    formats, start_positions, context parallelism, interleaved, partial rotary; gradients."""
    device, backend = dev_backend
    g = torch.Generator().manual_seed(5)
    S, B, H, D, R, S2 = 8, 2, 3, 16, 12, 40
    freqs = (torch.rand(S2, 1, 1, R, generator=g) * 6).to(device)
    cu = torch.tensor([0, 8, 12], dtype=torch.int32, device=device)
    shape = {"sbhd": (S, B, H, D), "bshd": (B, S, H, D), "thd": (12, H, D)}[fmt]
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(shape, generator=g).to(dtype).to(device)
        for start, cp_size, cp_rank, inter in ((None, 1, 0, False), (torch.tensor([3, 7], device=device), 1, 0, True),
                                               (None, 2, 1, False), (None, 2, 0, True)):
            cu_local = cu // cp_size if fmt == "thd" else None
            tt = t[: int(cu_local[-1])] if fmt == "thd" else t
            got = rk.apply_rotary_pos_emb_te(tt, freqs, fmt, start, inter, cu_seqlens=cu if fmt == "thd" else None,
                                             cp_size=cp_size, cp_rank=cp_rank, backend=backend)
            want = _te_formula(tt, freqs, fmt, start, inter, cu, cp_size, cp_rank)
            assert got.shape == tt.shape and got.stride() == tt.contiguous().stride()
            torch.testing.assert_close(got, want, **TOL[dtype])
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    kw = dict(cu_seqlens=cu) if fmt == "thd" else {}
    d_got, = torch.autograd.grad(rk.apply_rotary_pos_emb_te(x, freqs, fmt, backend=backend, **kw), x, w)
    d_want, = torch.autograd.grad(_te_formula(x, freqs, fmt, None, False, cu, 1, 0), x, w)
    torch.testing.assert_close(d_got, d_want)


def test_transformer_engine_errors():
    t, freqs = torch.randn(4, 2, 3, 8), torch.randn(16, 1, 1, 8)
    with pytest.raises(ValueError, match="tensor_format must be one of"):
        rk.apply_rotary_pos_emb_te(t, freqs, "bhsd")
    with pytest.raises(ValueError, match=r"freqs must be TransformerEngine's \[S, 1, 1, R\]"):
        rk.apply_rotary_pos_emb_te(t, freqs[:, 0])
    for rot in (7, 16):  # odd, or wider than t's head dim 8
        with pytest.raises(ValueError, match=rf"the rotary dim, must be even and at most t.s head dim 8 .* got {rot}"):
            rk.apply_rotary_pos_emb_te(t, torch.randn(16, 1, 1, rot))
    with pytest.raises(ValueError, match="cu_seqlens is required with tensor_format='thd'"):
        rk.apply_rotary_pos_emb_te(t[0], freqs, "thd")
    with pytest.raises(ValueError, match="start_positions cannot be combined with cp_size > 1"):
        rk.apply_rotary_pos_emb_te(t, freqs, start_positions=torch.tensor([1, 2]), cp_size=2)
    with pytest.raises(ValueError, match="0 <= cp_rank < cp_size"):
        rk.apply_rotary_pos_emb_te(t, freqs, cp_size=2, cp_rank=2)
    with pytest.raises(IndexError, match="out of range for the cos/sin cache"):
        rk.apply_rotary_pos_emb_te(t, freqs[:3])
    for bad in (torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]), [1, 2]):  # (were reported as seqlen_offsets)
        with pytest.raises(ValueError, match=r"start_positions must be an int32/int64 tensor \[2\]"):
            rk.apply_rotary_pos_emb_te(t, freqs, start_positions=bad)
    with pytest.raises(ValueError, match="local sequence length must be even .*got 3"):
        rk.apply_rotary_pos_emb_te(t[:3], freqs, cp_size=2, cp_rank=1)
    with pytest.raises(TypeError, match="angles must be a float tensor"):
        rk.freqs.cos_sin_from_angles(torch.arange(4))


def _layout_qk(layout, B, S, Hq, Hk, D, dtype, seed):
    """q/k in one of the memory layouts the API accepts (issue 19), with their unsqueeze_dim."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if layout == "bhsd_view":  # transformers: transposed view of a [B, S, H, D] projection
        return r(B, S, Hq, D).transpose(1, 2), r(B, S, Hk, D).transpose(1, 2), 1
    if layout == "bhsd":  # contiguous, heads outer
        return r(B, Hq, S, D), r(B, Hk, S, D), 1
    if layout == "bshd":
        return r(B, S, Hq, D), r(B, S, Hk, D), 2
    if layout == "thd":  # packed tokens
        return r(B * S, Hq, D), r(B * S, Hk, D), 1
    qkv = r(B, S, Hq + 2 * Hk, D)  # slices of a packed qkv projection
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
    if layout == "qkv_view":
        return q.transpose(1, 2), k.transpose(1, 2), 1
    return q, k, 2


def _conj_sin(sin, interleaved):
    """sin of the backward (transposed) map: the reference with it is the kernel's conj pass."""
    h = sin.shape[-1] // 2
    if interleaved:
        return -sin.unflatten(-1, (h, 2)).flip(-1).flatten(-2)
    return -torch.cat((sin[..., h:], sin[..., :h]), -1)


@pytest.mark.parametrize("layout", ["bhsd_view", "bhsd", "bshd", "thd", "qkv", "qkv_view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R", [64, 32])
def test_cpu_layouts_bit_exact(layout, dtype, interleaved, R):
    """Every layout, forward, in place and backward, bit for bit the reference's result on the
    CPU kernel: enough tokens for several token blocks per thread (head-major blocks hold 256),
    both loop orders (head-major and token-major). (Software prefetch, which starts at 16 MB of
    q + k, changes no bits.)"""
    if "cpu" not in rk.available_backends("cpu"):
        pytest.skip("compiled CPU kernel not built")
    B, S, Hq, Hk, D = 2, 300, 5, 3, 64
    q, k, ud = _layout_qk(layout, B, S, Hq, Hk, D, dtype, seed=3)
    cos, sin = make_cs(B, S, R, dtype, "cpu")
    if layout == "thd":
        cos, sin = cos.flatten(0, 1), sin.flatten(0, 1)
    want = apply_rotary_transformers_reference(q, k, cos, sin, ud, interleaved)
    got = rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, backend="cpu")
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)
    qi, ki = q.clone(), k.clone()
    rk.apply_rotary_transformers_(qi, ki, cos, sin, ud, interleaved=interleaved, backend="cpu")
    assert torch.equal(qi, want[0]) and torch.equal(ki, want[1])
    # Backward, with incoming gradients in the same layout as q/k.
    gq, gk, _ = _layout_qk(layout, B, S, Hq, Hk, D, dtype, seed=4)
    qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
    outs = rk.apply_rotary_transformers(qq, kk, cos, sin, ud, interleaved=interleaved, backend="cpu")
    dq, dk = torch.autograd.grad(outs, (qq, kk), (gq, gk))
    wq, wk = apply_rotary_transformers_reference(gq, gk, cos, _conj_sin(sin, interleaved), ud, interleaved)
    assert torch.equal(dq, wq) and torch.equal(dk, wk)


@pytest.mark.parametrize("layout", ["bhsd_view", "bhsd"])
@pytest.mark.parametrize("dtype, cs_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_cpu_tables_per_token_bit_exact(layout, dtype, cs_dtype):
    """The CPU kernel decides per token whether cos/sin's two halves are equal (then it converts
    one half of each: table_row): blocks that mix such tokens with tokens whose
    cos halves, sin halves or both differ, forward and backward (conj), bit for bit the
    reference's; 600 tokens, so blocks of both walks hold each kind."""
    if "cpu" not in rk.available_backends("cpu"):
        pytest.skip("compiled CPU kernel not built")
    B, S, Hq, Hk, D = 1, 600, 5, 4, 128
    q, k, ud = _layout_qk(layout, B, S, Hq, Hk, D, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    ang = torch.rand(S, D // 2, generator=g) * 6.3
    cos = torch.cat([ang, ang], -1).cos()
    sin = torch.cat([ang, ang], -1).sin()
    kind = torch.randint(0, 4, (S,), generator=g)  # 0: equal halves, 1: cos differs, 2: sin, 3: both
    cos[kind % 2 == 1, D // 2 + 3] += 0.25
    sin[kind >= 2, D - 1] -= 0.25
    cos, sin = cos[None].to(cs_dtype), sin[None].to(cs_dtype)
    want = apply_rotary_transformers_reference(q, k, cos, sin, ud)
    got = rk.apply_rotary_transformers(q, k, cos, sin, ud, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    gq, gk, _ = _layout_qk(layout, B, S, Hq, Hk, D, dtype, seed=9)
    qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
    outs = rk.apply_rotary_transformers(qq, kk, cos, sin, ud, backend="cpu")
    got = torch.autograd.grad(outs, (qq, kk), (gq, gk))
    want = apply_rotary_transformers_reference(gq, gk, cos, _conj_sin(sin, False), ud)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cpu_bf16_special_values_bit_exact(layout):
    """bf16 rows with NaNs of both signs, infinities, results in fp32's denormal range and
    overflow, forward and backward: NaN where the reference has NaN (its payload differs: the
    kernel writes 0x7FC0 like c10's scalar conversion, PyTorch's vectorised one 0xFFFF), every
    other element bit for bit; 600 tokens, so head-major walks cross token blocks; head dim 128
    (the AVX512-BF16 rows where the CPU has them)."""
    if "cpu" not in rk.available_backends("cpu"):
        pytest.skip("compiled CPU kernel not built")
    B, S, Hq, Hk, D = 1, 300, 3, 2, 128
    q, k, ud = _layout_qk(layout, 2 * B, S, Hq, Hk, D, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(6)
    special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-38, -2e-39,
                            1e-44, 0.0, -0.0], dtype=torch.bfloat16)
    for x in (q, k):
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (flat.numel() // 50,), generator=g)
        flat[idx] = special[torch.randint(0, len(special), idx.shape, generator=g)]
    cos, sin = make_cs(2 * B, S, D, torch.bfloat16, "cpu")

    def same(got, want):
        for g_, w in zip(got, want):
            assert torch.equal(g_.isnan(), w.isnan())
            gb, wb = g_.contiguous().view(torch.int16), w.contiguous().view(torch.int16)
            assert torch.equal(gb[~g_.isnan()], wb[~w.isnan()])

    same(rk.apply_rotary_transformers(q, k, cos, sin, ud, backend="cpu"),
         apply_rotary_transformers_reference(q, k, cos, sin, ud))
    qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
    outs = rk.apply_rotary_transformers(qq, kk, cos, sin, ud, backend="cpu")
    same(torch.autograd.grad(outs, (qq, kk), (q, k)),
         apply_rotary_transformers_reference(q, k, cos, _conj_sin(sin, False), ud))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_cpu_inplace_heads_that_follow(layout, dtype):
    """In place, k's heads right after q's in one buffer (a packed qkv's slices, or a heads-outer
    [B, Hq + 2 Hk, S, D] buffer's): the CPU kernel walks q and k as one operand (heads_follow).
    Bits equal the reference's and v is untouched; with k's own tables (not merged) too."""
    if "cpu" not in rk.available_backends("cpu"):
        pytest.skip("compiled CPU kernel not built")
    B, S, Hq, Hk, D = 2, 300, 3, 2, 128
    shape, ud = ((B, S, Hq + 2 * Hk, D), 2) if layout == "bshd" else ((B, Hq + 2 * Hk, S, D), 1)
    buf = torch.randn(*shape, generator=torch.Generator().manual_seed(21)).to(dtype)
    heads = (lambda t, a, b: t[:, :, a:b]) if layout == "bshd" else (lambda t, a, b: t[:, a:b])
    cos, sin = make_cs(B, S, D, torch.float32, "cpu")
    cos_k, sin_k = make_cs(B, S, D, torch.float32, "cpu", seed=2)
    for k_tables in (None, (cos_k, sin_k)):
        x = buf.clone()
        q, k = heads(x, 0, Hq), heads(x, Hq, Hq + Hk)
        want_q = rotary_reference(q, cos, sin, ud)
        want_k = rotary_reference(k, *(k_tables or (cos, sin)), ud)
        kw = dict(cos_k=k_tables[0], sin_k=k_tables[1]) if k_tables else {}
        rk.apply_rotary_transformers_(q, k, cos, sin, ud, backend="cpu", **kw)
        assert torch.equal(q, want_q) and torch.equal(k, want_k)
        assert torch.equal(heads(x, Hq + Hk, Hq + 2 * Hk), heads(buf, Hq + Hk, Hq + 2 * Hk))


def test_odd_head_dim_as_transformers_computes_it(dev_backend):
    """An odd rotary dim equal to the head dim is what transformers' apply_rotary_pos_emb computes
    (rotate_half on the odd width); anything it cannot compute (a wider table, partial odd
    rotary) is rejected, as there."""
    device, backend = dev_backend
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import rotate_half  # (its hub-routed caller may be kernelized)

    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 4, 5, 41, generator=g, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(2, 1, 5, 41, generator=g, dtype=torch.float64).to(device)
    cos, sin = (torch.randn(2, 5, 41, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    got = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # transformers' apply_rotary_pos_emb, unsqueeze_dim=1
    want = [x * c + rotate_half(x) * s for x in (q, k)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(got[0].sum(), q), torch.autograd.grad(want[0].sum(), q))
    with pytest.raises(ValueError, match="larger than"):  # Liger's D + 1 table: transformers fails too
        rk.apply_rotary_transformers(q, k, torch.randn(2, 5, 42, device=device), torch.randn(2, 5, 42, device=device),
                                     backend=backend)
    with pytest.raises(ValueError, match="must be even"):
        rk.apply_rotary_transformers(q, k, cos[..., :7], sin[..., :7], backend=backend)
