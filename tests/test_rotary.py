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
     "odd_cos_halves", "q_k_different_D", "q_k_different_dtype"],
)
def test_shapes_and_layouts(dev_backend, case):
    device, backend = dev_backend
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
    for g, w in zip(got, want):
        assert_close(g, w)


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
    q, k = make_qk(1, 2, 2, 1, 8, torch.float32, "cpu", "bhsd")
    cos, sin = make_cs(1, 2, 8, torch.float32, "cpu")
    for g, w in zip(rk.apply_rotary_transformers(q, k, cos, sin), apply_rotary_transformers_reference(q, k, cos, sin)):
        assert_close(g, w)
    for b in ("reference",):
        assert_close(rk.apply_rotary_emb(q, cos, sin, backend=b), rotary_reference(q, cos, sin))


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
    CPU kernel: enough tokens for several token blocks per thread, prefetch distances that cross
    heads and operands, and both loop orders (head-major and token-major)."""
    if "cpu" not in rk.available_backends("cpu"):
        pytest.skip("compiled CPU kernel not built")
    B, S, Hq, Hk, D = 2, 75, 5, 3, 64
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
