"""Per-pair tables (``pair_tables=True``: cos/sin ``[..., R/2]``, one entry per rotary pair) read
by the kernels as they are: every kernel backend equals itself with the full-width tables
(``reference.full_width_tables``) bit for bit, and the reference within TOL; no full-width
table is built on the kernel paths."""

import pytest
import torch

import rotary_kernels as rk
from rotary_kernels import _dispatch, reference
from rotary_kernels.reference import full_width_tables, rotary_reference_indexed

from conftest import TOL, rand


def pair_tables(*lead, half, seed, dtype=torch.float32, device="cpu"):
    """Per-pair cos/sin ``[*lead, half]`` of random angles."""
    ang = torch.rand(*lead, half, generator=torch.Generator().manual_seed(seed)) * 6.3
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def full(tables, interleaved):
    return [full_width_tables(t, interleaved) for t in tables]


def close(got, want):
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[got.dtype])


def same(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


def qk(layout, B, S, Hq, Hk, D, dtype, device):
    """q/k in transformers' transposed view (unsqueeze_dim 1) or [B, S, H, D] (2)."""
    q, k = rand(B, S, Hq, D, dtype=dtype, device=device), rand(B, S, Hk, D, dtype=dtype, seed=1, device=device)
    return (q.transpose(1, 2), k.transpose(1, 2), 1) if layout == "bhsd_view" else (q, k, 2)


@pytest.fixture
def no_full_width(monkeypatch, backend):
    """On the kernel backends nothing may expand a per-pair table."""
    if backend[1] != "reference":
        def refuse(*args, **kwargs):
            raise AssertionError("a full-width table was built on a kernel backend")

        monkeypatch.setattr(_dispatch, "full_width_tables", refuse)
        monkeypatch.setattr(reference, "full_width_tables", refuse)
    return backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd_view", "bshd"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 48)])
def test_plain_tables(backend, dtype, layout, interleaved, D, R):
    """Forward, in place and backward (GQA, partial rotary), cos/sin in fp32 and in x's dtype."""
    device, be = backend
    q, k, ud = qk(layout, 2, 5, 4, 2, D, dtype, device)
    for cs_dtype in (torch.float32, dtype):
        cs = pair_tables(2, 5, half=R // 2, seed=2, dtype=cs_dtype, device=device)
        fw = full(cs, interleaved)
        got = rk.apply_rotary_transformers(q, k, *cs, ud, interleaved=interleaved, pair_tables=True, backend=be)
        same(got, rk.apply_rotary_transformers(q, k, *fw, ud, interleaved=interleaved, backend=be))
        for g, x in zip(got, (q, k)):
            close(g, rotary_reference_indexed(x, *fw, ud, interleaved))
        for conj in (False, True):  # in place (one-call entry and the Python path)
            qi, ki = q.clone(), k.clone()
            rk.apply_rotary_transformers_(qi, ki, *cs, ud, interleaved=interleaved, pair_tables=True, conj=conj,
                                          backend=be)
            same((qi, ki), rk.apply_rotary_transformers(q, k, *fw, ud, interleaved=interleaved, conj=conj, backend=be))
    # backward wrt q and k: the conj rotation with the same per-pair tables
    qg, kg = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    out = rk.apply_rotary_transformers(qg, kg, *cs, ud, interleaved=interleaved, pair_tables=True, backend=be)
    grads = [rand(*o.shape, dtype=dtype, seed=5, device=device) for o in out]
    d = torch.autograd.grad(out, (qg, kg), grads)
    qf, kf = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    d_full = torch.autograd.grad(rk.apply_rotary_transformers(qf, kf, *fw, ud, interleaved=interleaved, backend=be),
                                 (qf, kf), grads)
    same(d, d_full)


CACHE_CASES = ["positions", "positions_gqa_bshd", "cu_seqlens", "offsets_tensor", "offset_int", "mrope",
               "mrope_interleaved", "mrope_tables"]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", CACHE_CASES)
def test_caches_and_token_positions(backend, interleaved, case):
    """Per-pair caches ``[P, R/2]`` indexed in the kernel (vLLM's decode), forward and backward."""
    device, be = backend
    P, half, D = 23, 16, 40  # partial rotary: R = 32 of D = 40
    g = torch.Generator().manual_seed(7)
    ud, index = 1, {}
    cs = pair_tables(P, half=half, seed=3, device=device)
    q, k = rand(2, 4, 6, D, device=device), rand(2, 2, 6, D, seed=1, device=device)  # [B, H, S, D]
    if case == "positions":
        index = dict(positions=torch.randint(0, P, (2, 6), generator=g).to(device))
    elif case == "positions_gqa_bshd":
        q, k, ud = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), 2
        index = dict(positions=torch.randint(0, P, (1, 6), generator=g).to(device))
    elif case == "cu_seqlens":
        q, k = rand(9, 4, D, device=device), rand(9, 2, D, seed=1, device=device)  # packed [T, H, D]
        ud = 1
        index = dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32, device=device), max_seqlen=5,
                     seqlen_offsets=torch.tensor([3, 11], device=device))
    elif case == "offsets_tensor":
        index = dict(seqlen_offsets=torch.tensor([2, 9], device=device))
    elif case == "offset_int":
        index = dict(seqlen_offsets=13)
    elif case in ("mrope", "mrope_interleaved"):
        index = dict(positions=torch.randint(0, P, (3, 2, 6), generator=g).to(device), mrope_section=(4, 6, 6),
                     mrope_interleaved=case == "mrope_interleaved")
    else:  # mrope's per-axis tables [3, B, S, R/2]
        cs = pair_tables(3, 2, 6, half=half, seed=4, device=device)
        index = dict(mrope_section=(6, 5, 5))
    fw = full(cs, interleaved)
    got = rk.apply_rotary_transformers(q, k, *cs, ud, interleaved=interleaved, pair_tables=True, backend=be, **index)
    same(got, rk.apply_rotary_transformers(q, k, *fw, ud, interleaved=interleaved, backend=be, **index))
    kw = {n: v for n, v in index.items() if n != "max_seqlen"}
    for x, y in zip((q, k), got):
        close(y, rotary_reference_indexed(x, *fw, ud, interleaved, **kw))
    qi, ki = q.clone(), k.clone()
    rk.apply_rotary_transformers_(qi, ki, *cs, ud, interleaved=interleaved, pair_tables=True, backend=be, **index)
    same((qi, ki), got)
    qg = q.detach().clone().requires_grad_()
    out = rk.apply_rotary_emb(qg, *cs, ud, interleaved, pair_tables=True, backend=be, **index)
    grad = rand(*out.shape, seed=6, device=device)
    (dq,) = torch.autograd.grad(out, qg, grad)
    same([dq], [rk.apply_rotary_emb(grad, *fw, ud, interleaved, conj=True, backend=be, **index)])


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("cached", [False, True])
def test_cos_k_per_pair(backend, interleaved, cached):
    """k's own per-pair tables, in q's launch (flash-attn's apply_rotary_emb_qkv_ with its caches)."""
    device, be = backend
    half, D = 16, 48
    q, k = rand(2, 7, 4, D, device=device), rand(2, 7, 2, D, seed=1, device=device)  # [B, S, H, D]
    lead = (30,) if cached else (2, 7)
    index = dict(seqlen_offsets=torch.tensor([3, 20], device=device)) if cached else {}
    cs, cks = pair_tables(*lead, half=half, seed=2, device=device), pair_tables(*lead, half=half, seed=3, device=device)
    got = rk.apply_rotary_transformers(q, k, *cs, 2, interleaved=interleaved, pair_tables=True, cos_k=cks[0],
                                       sin_k=cks[1], backend=be, **index)
    fw, fwk = full(cs, interleaved), full(cks, interleaved)
    same(got, rk.apply_rotary_transformers(q, k, *fw, 2, interleaved=interleaved, cos_k=fwk[0], sin_k=fwk[1],
                                           backend=be, **index))
    close(got[0], rotary_reference_indexed(q, *fw, 2, interleaved, **index))
    close(got[1], rotary_reference_indexed(k, *fwk, 2, interleaved, **index))
    qkv = torch.cat((q, k, rand(2, 7, 2, D, seed=9, device=device)), 2)
    rk.apply_rotary_qkv_(qkv, *cs, 4, 2, interleaved=interleaved, pair_tables=True, cos_k=cks[0], sin_k=cks[1],
                         backend=be, **index)
    same([t.contiguous() for t in (qkv[:, :, :4], qkv[:, :, 4:6])], [t.contiguous() for t in got])
    kg = k.detach().clone().requires_grad_()
    out = rk.apply_rotary_transformers(q, kg, *cs, 2, interleaved=interleaved, pair_tables=True, cos_k=cks[0],
                                       sin_k=cks[1], backend=be, **index)[1]
    (dk,) = torch.autograd.grad(out, kg, torch.ones_like(out))
    same([dk], [rk.apply_rotary_emb(torch.ones_like(k), *fwk, 2, interleaved, conj=True, backend=be, **index)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_freqs_cis(backend, dtype):
    """Llama 4's complex freqs_cis: .real/.imag are views with last-dim stride 2, read in place
    (plain tables and a cache with positions)."""
    device, be = backend
    g = torch.Generator().manual_seed(5)
    xq, xk = rand(2, 6, 4, 32, dtype=dtype, device=device), rand(2, 6, 2, 32, dtype=dtype, seed=1, device=device)
    freqs = torch.polar(torch.ones(2, 6, 16), torch.rand(2, 6, 16, generator=g) * 6.3).to(device)
    assert freqs.real.stride(-1) == 2
    got = rk.apply_rotary_emb_complex(xq, xk, freqs, backend=be)
    fw = full((freqs.real, freqs.imag), True)
    same(got, rk.apply_rotary_transformers(xq, xk, *fw, 2, interleaved=True, backend=be))
    cache = torch.polar(torch.ones(40, 16), torch.rand(40, 16, generator=g) * 6.3).to(device)
    pos = torch.randint(0, 40, (2, 6), generator=g).to(device)
    for il in (False, True):
        got = rk.apply_rotary_transformers(xq, xk, cache.real, cache.imag, 2, interleaved=il, pair_tables=True,
                                           positions=pos, backend=be)
        fw = full((cache.real, cache.imag), il)
        same(got, rk.apply_rotary_transformers(xq, xk, *fw, 2, interleaved=il, positions=pos, backend=be))


def test_no_full_width_table_on_kernel_backends(no_full_width):
    """Nothing expands per-pair tables on the kernel backends: out of place (the one-call entry
    and the Python path), in place, caches with positions, k's own tables, backward, apply_rotary_emb_complex."""
    device, be = no_full_width
    q, k = rand(2, 5, 4, 32, device=device), rand(2, 5, 2, 32, seed=1, device=device)
    cs = pair_tables(2, 5, half=16, seed=2, device=device)
    cache = pair_tables(12, half=16, seed=3, device=device)
    pos = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    for il in (False, True):
        rk.apply_rotary_transformers(q, k, *cs, 2, interleaved=il, pair_tables=True, backend=be)
        rk.apply_rotary_transformers_(q.clone(), k.clone(), *cs, 2, interleaved=il, pair_tables=True, backend=be)
        rk.apply_rotary_transformers(q, k, *cache, 2, interleaved=il, pair_tables=True, positions=pos, backend=be)
        rk.apply_rotary_transformers(q, k, *cs, 2, interleaved=il, pair_tables=True, cos_k=cs[0], sin_k=cs[1] * 0.5,
                                     backend=be)
        qg = q.clone().requires_grad_()
        out = rk.apply_rotary_emb(qg, *cache, 2, il, pair_tables=True, positions=pos, backend=be)
        out.sum().backward()
        qi = q.clone().requires_grad_()
        y = qi * 1
        rk.apply_rotary_emb_(y, *cs, 2, il, pair_tables=True, backend=be)
        y.sum().backward()
    freqs = torch.polar(torch.ones(2, 5, 16), torch.rand(2, 5, 16) * 6.3).to(device)
    rk.apply_rotary_emb_complex(q, k, freqs, backend=be)


def test_table_gradients(backend):
    """Gradients wrt per-pair tables (plain and gathered by positions) are those of the reference
    (the tables are expanded, differentiably, for PyTorch's gather and product rule)."""
    device, be = backend
    q = rand(2, 3, 5, 32, dtype=torch.float64, device=device)
    for positions in (None, torch.tensor([[0, 4, 4, 1, 7]], device=device)):
        lead = (9,) if positions is not None else (2, 5)
        c, s = (t.requires_grad_() for t in pair_tables(*lead, half=16, seed=2, dtype=torch.float64, device=device))
        for il in (False, True):
            kw = {} if positions is None else dict(positions=positions)
            out = rk.apply_rotary_emb(q, c, s, 1, il, pair_tables=True, backend=be, **kw)
            want = rotary_reference_indexed(q, full_width_tables(c, il), full_width_tables(s, il), 1, il, **kw)
            grad = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, (c, s), grad), torch.autograd.grad(want, (c, s), grad)):
                torch.testing.assert_close(a, b)


def test_compile_fullgraph(backend):
    device, be = backend
    q, k = rand(1, 4, 2, 32, device=device), rand(1, 4, 1, 32, seed=1, device=device)
    cache = pair_tables(10, half=16, seed=3, device=device)
    pos = torch.tensor([[1, 5, 2, 9]], device=device)

    def f(q, k, c, s, pos):
        return rk.apply_rotary_transformers(q, k, c, s, 2, pair_tables=True, positions=pos, backend=be)

    torch._dynamo.reset()
    same(torch.compile(f, fullgraph=True)(q, k, *cache, pos), f(q, k, *cache, pos))


def test_errors():
    q = rand(1, 2, 4, 16)
    c = torch.ones(1, 4, 8)
    for be in rk.available_backends("cpu"):
        with pytest.raises(ValueError, match="rotary dim 18 .2 x cos.shape.-1., per-pair tables. is larger than x's"):
            rk.apply_rotary_emb(q, torch.ones(1, 4, 9), torch.ones(1, 4, 9), pair_tables=True, backend=be)
        with pytest.raises(ValueError, match="mrope_section"):  # sums to R/2 = 8
            rk.apply_rotary_emb(q, c, c, pair_tables=True, positions=torch.zeros(3, 1, 4, dtype=torch.long),
                                mrope_section=(2, 1, 1), backend=be)
        # an odd per-pair width is an even rotary dim
        rk.apply_rotary_emb(q, torch.ones(1, 4, 7), torch.ones(1, 4, 7), pair_tables=True, backend=be)


def test_op_contract():
    """The compiled ops' contract with pair_tables (torch_binding.cpp check_rotary): the rotary dim
    is twice the tables' last dim, <= D; cos_k has cos's width; the one-call entry declines the rest."""
    ops = _dispatch.COMPILED.ops if _dispatch.COMPILED is not None else pytest.skip("no compiled extension")
    q = rand(1, 3, 2, 16)
    c = torch.ones(1, 3, 8)
    ops.rotary(q, None, c, c, q.clone(), None, False, False, pair_tables=True)
    ops.rotary(q, None, c[..., :7], c[..., :7], q.clone(), None, False, False, pair_tables=True)  # R = 14
    with pytest.raises(RuntimeError, match="per-pair tables"):
        ops.rotary(q, None, torch.ones(1, 3, 9), torch.ones(1, 3, 9), q.clone(), None, True, False, pair_tables=True)
    with pytest.raises(RuntimeError, match="cos_k must have cos's form"):
        ops.rotary(q, q, c, c, q.clone(), q.clone(), False, False, cos_k=torch.ones(1, 3, 16),
                   sin_k=torch.ones(1, 3, 16), pair_tables=True)
    assert len(ops.rotary_transformers(q, None, c, c, 2, False, False, True)) == 1
    assert ops.rotary_transformers(q, None, torch.ones(1, 3, 9), torch.ones(1, 3, 9), 2, False, False, True) == []
