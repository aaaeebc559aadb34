"""Separate tables for k (``cos_k``/``sin_k``, flash-attn's ``apply_rotary_emb_qkv_`` and
TransformerEngine's fused QKV rope): every backend against the reference (q rotated with
cos/sin, k with cos_k/sin_k, each alone), forward and backward, plain tables and the
token-position options, in place and out of place, packed qkv, GQA; still one launch for q and
k; errors naming the argument."""

import pytest
import torch

import rotary_kernels as rk
from rotary_kernels import _dispatch
from rotary_kernels.reference import (apply_rotary_transformers_reference, full_width_tables, rotary_reference,
                                      rotary_reference_indexed)

from conftest import TOL, rand
from zoo import CountOps, namespace


def tables(*lead, R, seed, dtype=torch.float32, device="cpu"):
    """cos/sin of random angles, halves equal like transformers' cat(freqs, freqs)."""
    ang = torch.rand(*lead, R // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    ang = torch.cat((ang, ang), -1)
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def close(got, want):
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[got.dtype])


def qk(layout, B, S, Hq, Hk, D, dtype, device):
    """q/k in transformers' transposed view (unsqueeze_dim 1) or [B, S, H, D] (2)."""
    q, k = rand(B, S, Hq, D, dtype=dtype, device=device), rand(B, S, Hk, D, dtype=dtype, seed=1, device=device)
    return (q.transpose(1, 2), k.transpose(1, 2), 1) if layout == "bhsd_view" else (q, k, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd_view", "bshd"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 48)])
def test_forward_matches_reference(backend, dtype, layout, interleaved, D, R):
    """cos_k may differ from cos in dtype and leading shape; conj, out of place and in place."""
    device, be = backend
    B, S = 2, 5
    q, k, ud = qk(layout, B, S, 4, 2, D, dtype, device)
    cos, sin = tables(B, S, R=R, seed=2, device=device)
    cos_k, sin_k = tables(1, S, R=R, seed=3, dtype=dtype, device=device)  # [1, S, R], k's dtype
    q0, k0 = q.clone(), k.clone()
    want = apply_rotary_transformers_reference(q, k, cos, sin, ud, interleaved, cos_k, sin_k)
    got = rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, cos_k=cos_k, sin_k=sin_k,
                                       backend=be)
    for g, w in zip(got, want):
        close(g, w)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    # conj (the transpose), each tensor with its own tables
    back = rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, conj=True, cos_k=cos_k,
                                        sin_k=sin_k, backend=be)
    close(back[0], rotary_reference(q, cos, sin, ud, interleaved, conj=True))
    close(back[1], rotary_reference(k, cos_k, sin_k, ud, interleaved, conj=True))
    qi, ki = q.clone(), k.clone()
    out = rk.apply_rotary_transformers_(qi, ki, cos, sin, ud, interleaved=interleaved, cos_k=cos_k, sin_k=sin_k,
                                        backend=be)
    assert out[0] is qi and out[1] is ki
    close(qi, want[0])
    close(ki, want[1])


def test_same_tables_as_cos(backend):
    """cos_k=cos, sin_k=sin is the call without them, bit for bit."""
    device, be = backend
    q, k, ud = qk("bhsd_view", 2, 3, 4, 2, 32, torch.bfloat16, device)
    cos, sin = tables(2, 3, R=32, seed=4, device=device)
    a = rk.apply_rotary_transformers(q, k, cos, sin, ud, backend=be)
    b = rk.apply_rotary_transformers(q, k, cos, sin, ud, cos_k=cos, sin_k=sin, backend=be)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_not_fusable(backend):
    """q and k of different dtypes: two launches, each with its own tables."""
    device, be = backend
    q, k, ud = qk("bshd", 2, 3, 2, 1, 32, torch.float32, device)
    k = k.to(torch.bfloat16)
    cos, sin = tables(2, 3, R=32, seed=27, device=device)
    cos_k, sin_k = tables(1, 3, R=32, seed=28, device=device)
    got = rk.apply_rotary_transformers(q, k, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be)
    for g, w in zip(got, apply_rotary_transformers_reference(q, k, cos, sin, ud, False, cos_k, sin_k)):
        close(g, w)


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_matches_reference(backend, inplace):
    """k's gradient rotates back with cos_k/sin_k (conj), q's with cos/sin."""
    device, be = backend
    q, k, ud = qk("bhsd_view", 2, 5, 4, 2, 48, torch.float32, device)
    cos, sin = tables(2, 5, R=32, seed=5, device=device)
    cos_k, sin_k = tables(2, 5, R=32, seed=6, device=device)
    gq, gk = rand(*q.shape, seed=7, device=device), rand(*k.shape, seed=8, device=device)
    want = torch.autograd.grad(apply_rotary_transformers_reference(q.requires_grad_(), k.requires_grad_(), cos, sin,
                                                                   ud, False, cos_k, sin_k), (q, k), (gq, gk))
    a, b = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    if inplace:  # in place on non-leaf views (one launch per tensor with autograd)
        qa, kb = a * 1, b * 1
        outs = rk.apply_rotary_transformers_(qa, kb, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be)
    else:
        outs = rk.apply_rotary_transformers(a, b, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be)
    got = torch.autograd.grad(outs, (a, b), (gq, gk))
    for g, w in zip(got, want):
        close(g, w)
    if not inplace:  # double backward: the backward, recorded, is k's rotation by cos_k/sin_k again
        a2, b2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        g2, h2 = gq.clone().requires_grad_(), gk.clone().requires_grad_()
        outs = rk.apply_rotary_transformers(a2, b2, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be)
        d = torch.autograd.grad(outs, (a2, b2), (g2, h2), create_graph=True)
        dd = torch.autograd.grad(d, (g2, h2), (q, k))
        close(dd[0], rotary_reference(q, cos, sin, ud))
        close(dd[1], rotary_reference(k, cos_k, sin_k, ud))


def test_table_gradients_through_reference(backend):
    """Gradients wrt cos, sin, cos_k, sin_k: taken by the reference's PyTorch ops (fp64: exact)."""
    device, be = backend
    q, k, ud = qk("bshd", 2, 3, 3, 1, 16, torch.float64, device)
    tabs = [t.double().requires_grad_() for t in (*tables(2, 3, R=16, seed=9, device=device),
                                                   *tables(1, 3, R=16, seed=10, device=device))]
    got = torch.autograd.grad(rk.apply_rotary_transformers(q, k, tabs[0], tabs[1], ud, cos_k=tabs[2], sin_k=tabs[3],
                                                           backend=be), tabs, (q, k))
    want = torch.autograd.grad(apply_rotary_transformers_reference(q, k, *tabs[:2], ud, False, *tabs[2:]), tabs, (q, k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(RuntimeError, match="cos_k/sin_k"):
        rk.apply_rotary_transformers_(q.clone(), k.clone(), cos=tabs[0].detach(), sin=tabs[1].detach(),
                                      unsqueeze_dim=ud, cos_k=tabs[2], sin_k=tabs[3], backend=be)


@pytest.mark.parametrize("interleaved", [False, True])
def test_token_positions(backend, interleaved):
    """positions, cu_seqlens + seqlen_offsets, mrope: cos_k/sin_k are caches indexed like cos/sin
    (of their own length), forward and backward, out of place and in place."""
    device, be = backend
    B, S, Hq, Hk, D, R = 2, 5, 4, 2, 64, 48
    cos, sin = tables(40, R=R, seed=11, device=device)
    cos_k, sin_k = tables(30, R=R, seed=12, dtype=torch.bfloat16, device=device)
    q, k, ud = qk("bhsd_view", B, S, Hq, Hk, D, torch.float32, device)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=device)
    qp, kp = rand(10, Hq, D, device=device), rand(10, Hk, D, seed=13, device=device)
    cases = [
        (q, k, ud, dict(positions=torch.randint(0, 30, (B, S), device=device))),
        (q, k, ud, dict(seqlen_offsets=torch.tensor([2, 20], device=device))),
        (qp, kp, 1, dict(cu_seqlens=cu, seqlen_offsets=torch.tensor([1, 0, 4], device=device))),
        (q, k, ud, dict(positions=torch.randint(0, 30, (3, B, S), device=device), mrope_section=(8, 8, 8),
                        mrope_interleaved=interleaved)),
    ]
    for x, y, u, ix in cases:
        want = (rotary_reference_indexed(x, cos, sin, u, interleaved, **ix),
                rotary_reference_indexed(y, cos_k, sin_k, u, interleaved, **ix))
        got = rk.apply_rotary_transformers(x, y, cos, sin, u, interleaved=interleaved, cos_k=cos_k, sin_k=sin_k,
                                           backend=be, **ix)
        for g, w in zip(got, want):
            close(g, w)
        xi, yi = x.clone(), y.clone()
        rk.apply_rotary_transformers_(xi, yi, cos, sin, u, interleaved=interleaved, cos_k=cos_k, sin_k=sin_k,
                                      backend=be, **ix)
        close(xi, want[0])
        close(yi, want[1])
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        outs = rk.apply_rotary_transformers(a, b, cos, sin, u, interleaved=interleaved, cos_k=cos_k, sin_k=sin_k,
                                            backend=be, **ix)
        d = torch.autograd.grad(outs, (a, b), (x, y))
        close(d[0], rotary_reference_indexed(x, cos, sin, u, interleaved, conj=True, **ix))
        close(d[1], rotary_reference_indexed(y, cos_k, sin_k, u, interleaved, conj=True, **ix))
    if device == "cpu" and be != "reference":  # a position inside cos but outside cos_k
        with pytest.raises(IndexError, match="30 rows"):
            rk.apply_rotary_transformers(q, k, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be,
                                         positions=torch.full((B, S), 35, device=device))


def test_mrope_per_axis_tables(backend):
    """mrope without positions: cos_k/sin_k are per-axis tables [3, B, S, R] like cos/sin."""
    device, be = backend
    q, k, ud = qk("bhsd_view", 2, 4, 2, 2, 32, torch.float32, device)
    cos, sin = tables(3, 2, 4, R=32, seed=14, device=device)
    cos_k, sin_k = tables(3, 2, 4, R=32, seed=15, device=device)
    ix = dict(mrope_section=(4, 6, 6))
    got = rk.apply_rotary_transformers(q, k, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be, **ix)
    close(got[0], rotary_reference_indexed(q, cos, sin, ud, **ix))
    close(got[1], rotary_reference_indexed(k, cos_k, sin_k, ud, **ix))


def test_packed_qkv_and_pair_tables(backend):
    """apply_rotary_qkv(_) with k's tables, [B, S, Hq + 2 Hk, D] and flash-attn's [B, S, 3, H, D];
    pair_tables expands cos_k/sin_k like cos/sin; v untouched; gradients into qkv."""
    device, be = backend
    B, S, Hq, Hk, D, R = 2, 5, 4, 2, 32, 24
    qkv = rand(B, S, Hq + 2 * Hk, D, device=device)
    cos_p, sin_p = (t[..., : R // 2] for t in tables(B, S, R=R, seed=16, device=device))
    ck_p, sk_p = (t[..., : R // 2] for t in tables(S, R=R, seed=17, device=device))
    for interleaved in (False, True):
        full = [full_width_tables(t, interleaved) for t in (cos_p, sin_p, ck_p, sk_p)]
        q, k = qkv[..., :Hq, :], qkv[..., Hq : Hq + Hk, :]
        want = (rotary_reference(q, full[0], full[1], -2, interleaved), rotary_reference(k, full[2], full[3], -2, interleaved))
        got = rk.apply_rotary_qkv(qkv, cos_p, sin_p, Hq, Hk, interleaved=interleaved, pair_tables=True, cos_k=ck_p,
                                  sin_k=sk_p, backend=be)
        for g, w in zip(got, want):
            close(g, w)
        x = qkv.clone()
        rk.apply_rotary_qkv_(x, cos_p, sin_p, Hq, Hk, interleaved=interleaved, pair_tables=True, cos_k=ck_p, sin_k=sk_p,
                             backend=be)
        close(x[..., :Hq, :], want[0])
        close(x[..., Hq : Hq + Hk, :], want[1])
        assert torch.equal(x[..., Hq + Hk :, :], qkv[..., Hq + Hk :, :])
    qkv5 = rand(B, S, 3, Hk, D, seed=18, device=device)
    cos, sin = tables(B, S, R=R, seed=19, device=device)
    cos_k, sin_k = tables(S, R=R, seed=20, device=device)
    got = rk.apply_rotary_qkv(qkv5, cos, sin, cos_k=cos_k, sin_k=sin_k, backend=be)
    close(got[0], rotary_reference(qkv5[:, :, 0], cos, sin, -2))
    close(got[1], rotary_reference(qkv5[:, :, 1], cos_k, sin_k, -2))
    # flash-attn's apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, seqlen_offsets=2): per-pair caches
    caches = [t[..., : R // 2] for t in (*tables(9, R=R, seed=21, device=device), *tables(9, R=R, seed=22,
                                                                                        device=device))]
    x = qkv5.clone()
    rk.apply_rotary_qkv_(x, caches[0], caches[1], cos_k=caches[2], sin_k=caches[3], pair_tables=True,
                         seqlen_offsets=2, backend=be)
    full = [full_width_tables(t) for t in caches]
    close(x[:, :, 0], rotary_reference_indexed(qkv5[:, :, 0], full[0], full[1], -2, seqlen_offsets=2))
    close(x[:, :, 1], rotary_reference_indexed(qkv5[:, :, 1], full[2], full[3], -2, seqlen_offsets=2))
    assert torch.equal(x[:, :, 2], qkv5[:, :, 2])
    a = qkv5.clone().requires_grad_()
    g = torch.autograd.grad(rk.apply_rotary_qkv(a, cos, sin, cos_k=cos_k, sin_k=sin_k, backend=be), a,
                            (qkv5[:, :, 0], qkv5[:, :, 1]))[0]
    close(g[:, :, 0], rotary_reference(qkv5[:, :, 0], cos, sin, -2, conj=True))
    close(g[:, :, 1], rotary_reference(qkv5[:, :, 1], cos_k, sin_k, -2, conj=True))
    assert torch.equal(g[:, :, 2], torch.zeros_like(g[:, :, 2]))


def _count_launches(monkeypatch, be):
    """A counter of rotary kernel launches: the compiled ops (CountOps) or Triton's launcher."""
    if be == "triton":
        calls = []
        orig = _dispatch.TRITON._launch
        monkeypatch.setattr(_dispatch.TRITON, "_launch",
                            lambda kernel, *a, **kw: calls.append(kernel) or orig(kernel, *a, **kw))

        class Calls:
            def __enter__(self):
                calls.clear()
                return self

            def __exit__(self, *exc):
                return False

            @property
            def calls(self):
                return sum(c is _dispatch.TRITON._rotary_qk_kernel for c in calls)

        return Calls()
    return CountOps(namespace(rk))


@pytest.mark.parametrize("kind", ["out of place", "in place", "backward", "qkv", "positions"])
def test_one_launch(backend, monkeypatch, kind):
    """A fusable q/k pair with its own k tables is one kernel launch, forward and backward."""
    device, be = backend
    if be == "reference":
        pytest.skip("the reference launches no kernel")
    q, k, ud = qk("bhsd_view", 2, 5, 4, 2, 32, torch.bfloat16, device)
    cos, sin = tables(2, 5, R=32, seed=21, device=device)
    cos_k, sin_k = tables(1, 5, R=32, seed=22, device=device)
    kw = dict(cos_k=cos_k, sin_k=sin_k, backend=be)
    counter = _count_launches(monkeypatch, be)
    if kind == "backward":
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        outs = rk.apply_rotary_transformers(a, b, cos, sin, ud, **kw)
        with counter:
            torch.autograd.grad(outs, (a, b), (q, k))
    else:
        with counter:
            if kind == "out of place":
                rk.apply_rotary_transformers(q, k, cos, sin, ud, **kw)
            elif kind == "in place":
                rk.apply_rotary_transformers_(q, k, cos, sin, ud, **kw)
            elif kind == "qkv":
                rk.apply_rotary_qkv_(rand(2, 5, 8, 32, device=device), cos, sin, 4, 2, **kw)
            else:
                c, s = tables(9, R=32, seed=23, device=device)
                rk.apply_rotary_transformers(q, k, c, s, ud, positions=torch.randint(0, 9, (2, 5), device=device),
                                             cos_k=c.flip(0), sin_k=s.flip(0), backend=be)
    assert counter.calls == 1, counter.calls


def test_compile_fullgraph(backend):
    """torch.compile traces the custom ops with k's tables, forward and backward."""
    device, be = backend
    q, k, ud = qk("bshd", 2, 3, 2, 1, 16, torch.float32, device)
    cos, sin = tables(2, 3, R=16, seed=24, device=device)
    cos_k, sin_k = tables(1, 3, R=16, seed=25, device=device)

    def f(q, k):
        return rk.apply_rotary_transformers(q, k, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be)

    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    outs = torch.compile(f, fullgraph=True)(a, b)
    want = apply_rotary_transformers_reference(q, k, cos, sin, ud, False, cos_k, sin_k)
    for g, w in zip(outs, want):
        close(g, w)
    d = torch.autograd.grad(outs, (a, b), (q, k))
    close(d[0], rotary_reference(q, cos, sin, ud, conj=True))
    close(d[1], rotary_reference(k, cos_k, sin_k, ud, conj=True))


def test_errors_name_the_argument(backend):
    device, be = backend
    q, k, ud = qk("bhsd_view", 2, 3, 4, 2, 32, torch.float32, device)
    cos, sin = tables(2, 3, R=32, seed=26, device=device)
    f, f_ = rk.apply_rotary_transformers, rk.apply_rotary_transformers_
    for fn in (f, f_):
        with pytest.raises(ValueError, match="cos_k and sin_k must be given together, got only cos_k"):
            fn(q, k, cos, sin, ud, cos_k=cos, backend=be)
        with pytest.raises(ValueError, match="got only sin_k"):
            fn(q, k, cos, sin, ud, sin_k=sin, backend=be)
        with pytest.raises(ValueError, match="cos_k's rotary dim"):
            fn(q, k, cos, sin, ud, cos_k=cos[..., :16], sin_k=sin[..., :16], backend=be)
        with pytest.raises(TypeError, match="cos_k must be float16"):
            fn(q, k, cos, sin, ud, cos_k=cos.long(), sin_k=sin.long(), backend=be)
        with pytest.raises(TypeError, match="cos_k must be a torch.Tensor"):
            fn(q, k, cos, sin, ud, cos_k=1.0, sin_k=1.0, backend=be)
        with pytest.raises(ValueError, match="cos_k/sin_k: cos and sin must have the same shape"):
            fn(q, k, cos, sin, ud, cos_k=cos, sin_k=sin[0], backend=be)
        with pytest.raises(ValueError, match="cos_k on meta"):
            fn(q, k, cos, sin, ud, cos_k=cos.to("meta"), sin_k=sin.to("meta"), backend=be)
        with pytest.raises(ValueError, match="cos_k/sin_k: .*do not broadcast"):
            fn(q, k, cos, sin, ud, cos_k=cos[:, :2], sin_k=sin[:, :2], backend=be)
        with pytest.raises(ValueError, match="with pair_tables, cos_k and sin_k must be"):
            fn(q, k, cos[..., :16], sin[..., :16], ud, pair_tables=True, cos_k=cos[..., :16], sin_k=sin[..., :8],
               backend=be)
    with pytest.raises(ValueError, match="cos_k/sin_k rotate k, but k is None"):
        rk.apply_rotary_transformers(q, None, cos, sin, ud, cos_k=cos, sin_k=sin, backend=be)
    with pytest.raises(ValueError, match="cos_k/sin_k: .*caches"):  # cos_k must be a cache like cos
        f(q, k, cos[0], sin[0], ud, cos_k=cos, sin_k=sin, positions=torch.zeros(2, 3, dtype=torch.long, device=device), backend=be)


def test_functorch_transforms(backend):
    """torch.func: jvp with a tangent on k alone (rotated with k's tables), grad wrt q and k."""
    device, be = backend
    q, k, ud = qk("bshd", 2, 3, 2, 1, 16, torch.float64, device)
    cos, sin = tables(2, 3, R=16, seed=29, dtype=torch.float64, device=device)
    cos_k, sin_k = tables(1, 3, R=16, seed=30, dtype=torch.float64, device=device)

    def f(q, k):
        return rk.apply_rotary_transformers(q, k, cos, sin, ud, cos_k=cos_k, sin_k=sin_k, backend=be)

    _, (tq, tk) = torch.func.jvp(lambda k: f(q, k), (k,), (k,))
    assert torch.equal(tq, torch.zeros_like(tq))
    close(tk, rotary_reference(k, cos_k, sin_k, ud))
    gq, gk = torch.func.grad(lambda q, k: sum((o * o.detach()).sum() for o in f(q, k)), argnums=(0, 1))(q, k)
    close(gq, rotary_reference(rotary_reference(q, cos, sin, ud), cos, sin, ud, conj=True))
    close(gk, rotary_reference(rotary_reference(k, cos_k, sin_k, ud), cos_k, sin_k, ud, conj=True))


def test_inplace_write_overlapping_k_tables(backend):
    """In place, k's tables are inputs like cos/sin: k must not overlap them."""
    device, be = backend
    qkv = rand(2, 3, 4, 32, device=device)
    cos, sin = tables(2, 3, R=32, seed=31, device=device)
    with pytest.raises(ValueError, match="k overlaps cos_k"):
        rk.apply_rotary_qkv_(qkv, cos, sin, 2, 1, cos_k=qkv[:, :, 2], sin_k=qkv[:, :, 3], backend=be)
