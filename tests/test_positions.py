"""Token-position options on every backend against the reference, and the reference
against independent constructions: cos/sin caches gathered by ``positions``, packed varlen
batches (``cu_seqlens``), ``seqlen_offsets`` for decoding, and multimodal RoPE (against
transformers' Qwen2-VL / Qwen3-VL frequency recomposition)."""

import re
from types import SimpleNamespace

import pytest
import torch

import rotary_kernels as rk
from rotary_kernels.reference import rotary_reference, rotary_reference_indexed

from conftest import TOL

BACKENDS_HERE = ["reference"] + [b for b in rk.available_backends("cpu") if b != "reference"]


def cache(P, R, dtype=torch.float32, base=10000.0):
    """A real RoPE cos/sin cache [P, R] (transformers' cat(freqs, freqs) layout)."""
    inv = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    ang = torch.arange(P, dtype=torch.float32)[:, None] * inv
    ang = torch.cat((ang, ang), -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(got, want):
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[got.dtype])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd_view", "bshd"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,R", [(64, 64), (80, 48)])
def test_positions_gather(backend, dtype, layout, interleaved, D, R):
    B, S, Hq, Hk, P = 2, 5, 4, 2, 37
    ud = 2 if layout == "bshd" else 1
    q, k = rand(B, S, Hq, D, dtype=dtype), rand(B, S, Hk, D, dtype=dtype, seed=1)
    if layout == "bhsd_view":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cache(P, R)
    for pos in (torch.randint(0, P, (B, S), dtype=torch.int32), torch.randint(0, P, (1, S))):  # [1, S]: shared by the batch
        q0 = q.clone()
        got = rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, positions=pos, backend=backend)
        # independently: gather the per-token tables, then the plain rule
        c, s = cos[pos.long()], sin[pos.long()]
        for g, x in zip(got, (q, k)):
            close(g, rotary_reference(x, c, s, ud, interleaved))
        assert torch.equal(q, q0)
        one = rk.apply_rotary_emb(q, cos, sin, ud, interleaved, positions=pos, backend=backend)
        close(one, got[0])


def varlen_expected(x, cos, sin, cu, offsets, interleaved):
    """Packed [T, H, D] rotated sequence by sequence with plain per-token tables."""
    outs = []
    for b in range(len(cu) - 1):
        seq = x[cu[b] : cu[b + 1]]
        p = torch.arange(seq.shape[0]) + offsets[b]
        outs.append(rotary_reference(seq, cos[p], sin[p], 1, interleaved))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_cu_seqlens(backend, interleaved, dtype):
    cu = [0, 3, 3, 7, 12]  # includes an empty sequence
    T, H, D, P = cu[-1], 3, 32, 40
    x = rand(T, H, D, dtype=dtype)
    k = rand(T, 1, D, dtype=dtype, seed=2)
    cos, sin = cache(P, D)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    for offsets in (None, 5, torch.tensor([0, 2, 9, 20])):
        kw = dict(cu_seqlens=cu_t, max_seqlen=5)
        if offsets is not None:
            kw["seqlen_offsets"] = offsets
        offs = [0] * 4 if offsets is None else ([offsets] * 4 if isinstance(offsets, int) else offsets.tolist())
        qo, ko = rk.apply_rotary_transformers(x, k, cos, sin, interleaved=interleaved, backend=backend, **kw)
        close(qo, varlen_expected(x, cos, sin, cu, offs, interleaved))
        close(ko, varlen_expected(k, cos, sin, cu, offs, interleaved))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_seqlen_offsets_decode(backend):
    B, Hq, Hk, D, P = 6, 4, 2, 64, 50
    q, k = rand(B, 1, Hq, D).transpose(1, 2), rand(B, 1, Hk, D, seed=1).transpose(1, 2)
    cos, sin = cache(P, D)
    lens = torch.tensor([0, 3, 17, 49, 8, 1])
    got = rk.apply_rotary_transformers(q, k, cos, sin, seqlen_offsets=lens, backend=backend)
    c, s = cos[lens][:, None], sin[lens][:, None]  # [B, 1, R]
    close(got[0], rotary_reference(q, c, s))
    close(got[1], rotary_reference(k, c, s))
    # a scalar offset: every row at positions 7 .. 7 + S - 1
    q2 = rand(2, 4, 5, D)
    got = rk.apply_rotary_emb(q2, cos, sin, seqlen_offsets=7, backend=backend)
    close(got, rotary_reference(q2, cos[None, 7:12], sin[None, 7:12]))


def qwen_vl_tables(positions3, inv_freq, section, interleaved_mrope):
    """transformers' own Qwen2-VL / Qwen3-VL recomposition of per-axis frequencies."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    freqs = positions3[..., None].float() * inv_freq  # [3, B, S, R/2]
    module = Qwen3VLTextRotaryEmbedding if interleaved_mrope else Qwen2VLRotaryEmbedding
    this = SimpleNamespace(mrope_section=list(section))
    return (module.recomposition_frequencies(this, freqs.cos().clone()),
            module.recomposition_frequencies(this, freqs.sin().clone()))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("mrope_interleaved,section", [(False, (16, 24, 24)), (True, (24, 20, 20)), (False, (10, 0, 54))])
def test_mrope_matches_transformers(backend, mrope_interleaved, section):
    B, S, Hq, Hk, D, P = 2, 6, 4, 2, 128, 64
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    pos3 = torch.randint(0, P, (3, B, S))
    cos_t, sin_t = qwen_vl_tables(pos3, inv, section, mrope_interleaved)  # [B, S, D] after the merge
    q, k = rand(B, S, Hq, D, dtype=torch.bfloat16).transpose(1, 2), rand(B, S, Hk, D, dtype=torch.bfloat16, seed=1).transpose(1, 2)
    want = [rotary_reference(x, cos_t, sin_t) for x in (q, k)]
    # (a) transformers' per-axis tables [3, B, S, D], merged in the kernel
    ang = pos3[..., None].float() * inv
    ang = torch.cat((ang, ang), -1)
    got = rk.apply_rotary_transformers(q, k, ang.cos(), ang.sin(), mrope_section=section,
                                       mrope_interleaved=mrope_interleaved, backend=backend)
    for g, w in zip(got, want):
        close(g, w)
    # (b) a [P, R] cache and 3-axis positions, gathered in the kernel
    cos, sin = cache(P, D)
    got = rk.apply_rotary_transformers(q, k, cos, sin, positions=pos3, mrope_section=section,
                                       mrope_interleaved=mrope_interleaved, backend=backend)
    for g, w in zip(got, want):
        close(g, w)


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if b != "reference"])
def test_backward_with_positions(backend):
    """Gradients of q, k (the conj kernel with the same positions) and of a learned cache."""
    B, S, Hq, Hk, D, P = 2, 4, 3, 1, 32, 20
    pos = torch.randint(0, P, (B, S))
    for kw in (dict(positions=pos), dict(seqlen_offsets=torch.tensor([3, 11])),
               dict(positions=torch.randint(0, P, (3, B, S)), mrope_section=(4, 6, 6))):
        cos, sin = cache(P, D)
        cos.requires_grad_()
        sin.requires_grad_()
        q = rand(B, S, Hq, D).transpose(1, 2).requires_grad_()
        k = rand(B, S, Hk, D, seed=1).transpose(1, 2).requires_grad_()
        got = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend, **kw)
        want = rk.apply_rotary_transformers(q, k, cos, sin, backend="reference", **kw)
        gq, gk = rand(*q.shape, seed=5), rand(*k.shape, seed=6)
        g1 = torch.autograd.grad(got, (q, k, cos, sin), (gq, gk))
        g2 = torch.autograd.grad(want, (q, k, cos, sin), (gq, gk))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # q/k gradients only: the kernel path, nothing materialised
        q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
        got = rk.apply_rotary_transformers(q2, k2, cos.detach(), sin.detach(), backend=backend, **kw)
        g3 = torch.autograd.grad(got, (q2, k2), (gq, gk))
        for a, b in zip(g3, g2[:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_positions_float64():
    B, S, H, D, P = 1, 3, 2, 8, 6
    pos = torch.tensor([[5, 0, 2]])
    cos, sin = (t.double() for t in cache(P, D))
    q = rand(B, H, S, D).double().requires_grad_()
    for be in [b for b in BACKENDS_HERE if b != "reference"]:
        torch.autograd.gradcheck(lambda x: rk.apply_rotary_emb(x, cos, sin, positions=pos, backend=be), (q,))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_inplace_with_positions(backend):
    B, S, Hq, Hk, D, P = 2, 5, 4, 2, 64, 30
    q, k = rand(B, S, Hq, D).transpose(1, 2), rand(B, S, Hk, D, seed=1).transpose(1, 2)
    cos, sin = cache(P, D)
    pos = torch.randint(0, P, (B, S))
    want = rk.apply_rotary_transformers(q, k, cos, sin, positions=pos, backend="reference")
    qi, ki = q.clone(), k.clone()
    with torch.no_grad():
        out = rk.apply_rotary_transformers_(qi, ki, cos, sin, positions=pos, backend=backend)
    assert out[0] is qi and out[1] is ki
    close(qi, want[0])
    close(ki, want[1])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_position_errors(backend):
    B, S, H, D, P = 2, 3, 2, 16, 10
    q = rand(B, H, S, D)
    cos, sin = cache(P, D)
    f = lambda **kw: rk.apply_rotary_emb(q, cos, sin, backend=backend, **kw)  # noqa: E731
    with pytest.raises(IndexError, match="out of range|outside"):
        f(positions=torch.tensor([[0, 1, 10], [0, 0, 0]]))
    with pytest.raises(IndexError, match="out of range|outside"):
        f(positions=torch.tensor([[0, 1, -1], [0, 0, 0]]))
    with pytest.raises(IndexError, match="out of range|outside"):
        f(seqlen_offsets=8)
    # an int offset alone: its span checked without tensors; the same span as the tensor form's
    for off, span in [(8, "[8, 10]"), (-1, "[-1, 1]"), (2**62, f"[{2**62}, {2**62 + 2}]")]:
        for arg in (off, torch.tensor([off] * B)):
            with pytest.raises(IndexError, match=re.escape(f"positions span {span}")):
                f(seqlen_offsets=arg)
    assert f(seqlen_offsets=7).shape == q.shape  # positions 7..9 of 10 rows
    with pytest.raises(TypeError, match="positions must be int32 or int64"):
        f(positions=torch.zeros(B, S))
    for bad in (torch.zeros(B, S + 1, dtype=torch.long), torch.arange(S)):  # (1-D: no batch dim)
        with pytest.raises(ValueError, match=re.escape(f"positions of shape {tuple(bad.shape)} do not match x's tokens: "
                                                       f"pass shape [{B}, {S}]")):
            f(positions=bad)
    with pytest.raises(ValueError, match="seqlen_offsets must be"):
        f(seqlen_offsets=torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens needs packed tokens"):
        f(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        rk.apply_rotary_emb(q[0].transpose(0, 1), cos, sin, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"\[max_pos, R\] caches"):
        rk.apply_rotary_emb(q, cos[None].expand(B, -1, -1), sin[None].expand(B, -1, -1), positions=torch.zeros(B, S, dtype=torch.long))
    with pytest.raises(ValueError, match="must sum to"):
        f(positions=torch.zeros(3, B, S, dtype=torch.long), mrope_section=(1, 2, 3))
    with pytest.raises(ValueError, match=r"positions must be \[3"):
        f(positions=torch.zeros(B, S, dtype=torch.long), mrope_section=(2, 3, 3))
    with pytest.raises(ValueError, match="mrope_interleaved=True needs"):
        f(positions=torch.zeros(B, S, dtype=torch.long), mrope_interleaved=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        f(position_ids=torch.zeros(B, S, dtype=torch.long))
    # a cache wider than the head dim (R > D): refused like plain tables (it was read past x's rows:
    # Triton corrupted memory); also through TransformerEngine's drop-in
    wide = torch.randn(P, 2 * D)
    for kw in (dict(positions=torch.zeros(B, S, dtype=torch.long)), dict(seqlen_offsets=1), {}):
        with pytest.raises(ValueError, match=f"rotary dim {2 * D} .* larger than x's head dim {D}"):
            rk.apply_rotary_emb(q, wide, wide, backend=backend, **kw)
    with pytest.raises(ValueError, match=f"the rotary dim, must be even and at most t's head dim {D} .*got {2 * D}"):
        rk.apply_rotary_pos_emb_te(q.permute(2, 0, 1, 3), torch.randn(P, 1, 1, 2 * D), "sbhd", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_strided_index_tensors(backend):
    """cu_seqlens and seqlen_offsets as strided views give what their contiguous copies give
    (the kernels read cu_seqlens as contiguous: a strided int64 view rotated the wrong tokens,
    silently)."""
    T, H, D, P = 9, 2, 16, 32
    x = rand(T, H, D)
    cos, sin = cache(P, D)
    for dtype in (torch.int64, torch.int32):
        cu = torch.tensor([0, 99, 4, -10**7, 9, 99], dtype=dtype)[::2]  # [0, 4, 9]
        off = torch.tensor([5, 99, 1, 99], dtype=dtype)[::2]
        for kw in (dict(cu_seqlens=cu), dict(cu_seqlens=cu, seqlen_offsets=off)):
            want = rotary_reference_indexed(x, cos, sin, 1, False, **{k: v.contiguous() for k, v in kw.items()})
            got = rk.apply_rotary_emb(x, cos, sin, backend=backend, **kw)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_op_rejects_bad_index():
    from rotary_kernels import _compiled

    if not _compiled.HAS_EXT:
        pytest.skip("extension not built")
    ops = _compiled.ops
    q = rand(1, 3, 2, 8)
    cos, sin = cache(4, 8)
    with pytest.raises(IndexError, match="outside the cos/sin cache"):
        ops.rotary(q, None, cos, sin, q.clone(), None, False, False, positions=torch.tensor([[[0, 1, 4]]]))
    with pytest.raises(RuntimeError, match="positions must be int64"):
        ops.rotary(q, None, cos, sin, q.clone(), None, False, False, positions=torch.tensor([[[0, 1, 2]]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens must be contiguous"):
        ops.rotary(q, None, cos, sin, q.clone(), None, False, False,
                   cu_seqlens=torch.tensor([0, 9, 3], dtype=torch.long)[::2])
    with pytest.raises(RuntimeError, match="need cos/sin caches"):
        ops.rotary(q, None, cos[None, :3].expand(1, 3, 8), sin[None, :3].expand(1, 3, 8), q.clone(), None, False, False,
                   offset=1)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_compiled_programs_check_positions_and_cu_seqlens(backend):
    """The data-dependent checks also run inside torch.compile'd programs, on every backend: the
    kernels' ops check at run time (eager's errors), the reference's PyTorch ops through asserts in
    the graph (a RuntimeError with the same words; cu_seqlens had none there)."""
    cos, sin = cache(8, 8)
    torch._dynamo.reset()
    f = torch.compile(lambda x, cu: rk.apply_rotary_emb(x, cos, sin, 1, cu_seqlens=cu, backend=backend), fullgraph=True)
    assert f(rand(7, 2, 8), torch.tensor([0, 3, 7], dtype=torch.int32)).shape == (7, 2, 8)
    with pytest.raises((ValueError, RuntimeError), match="cu_seqlens must rise from 0 to the number of tokens 7"):
        f(rand(7, 2, 8), torch.tensor([0, 5, 3, 7], dtype=torch.int32))
    g = torch.compile(lambda x, p: rk.apply_rotary_emb(x, cos, sin, 2, positions=p, backend=backend), fullgraph=True)
    with pytest.raises((IndexError, RuntimeError), match="out of range for the cos/sin cache"):
        g(rand(1, 4, 2, 8), torch.tensor([[0, 1, 2, 8]]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if b != "reference"])
def test_compile_and_opcheck_with_positions(backend):
    from rotary_kernels._dispatch import Plan, rotate_op
    from rotary_kernels._index import make_index

    B, S, Hq, Hk, D, P = 2, 4, 2, 1, 16, 12
    q = rand(B, S, Hq, D).transpose(1, 2).requires_grad_()
    k = rand(B, S, Hk, D, seed=1).transpose(1, 2).requires_grad_()
    cos, sin = cache(P, D)
    pos = torch.randint(0, P, (B, S))
    idx = make_index(q, cos, 1, positions=pos)
    torch.library.opcheck(rotate_op, (q.detach(), k.detach(), cos, sin, *Plan(1, False, False, backend, idx).op_args()))

    def f(q, k, pos):
        a, b = rk.apply_rotary_transformers(q, k, cos, sin, positions=pos, backend=backend)
        return (a.float().square().sum() + b.float().sum())

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, pos)
    want = f(q, k, pos)
    torch.testing.assert_close(got, want)
    gc = torch.autograd.grad(got, (q, k))
    ge = torch.autograd.grad(f(q, k, pos), (q, k))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if b != "reference"])
def test_compile_cos_sin_grads_with_positions(backend):
    """Learned cache + positions under torch.compile(fullgraph=True): cos/sin are gathered by the
    reference's ops (their range check an assert in the graph), q/k/cos/sin grads as in eager."""
    B, S, Hq, Hk, D, P = 2, 4, 2, 1, 16, 12
    q = rand(B, S, Hq, D).transpose(1, 2).requires_grad_()
    k = rand(B, S, Hk, D, seed=1).transpose(1, 2).requires_grad_()
    cos, sin = (t.clone().requires_grad_() for t in cache(P, D))

    def f(pos):
        a, b = rk.apply_rotary_transformers(q, k, cos, sin, positions=pos, backend=backend)
        return a.square().sum() + b.sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    pos = torch.randint(0, P, (B, S))
    got = torch.autograd.grad(cf(pos), (q, k, cos, sin))
    for a, b in zip(got, torch.autograd.grad(f(pos), (q, k, cos, sin))):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="out of range"):
        cf(torch.full((B, S), P))


def test_reference_indexed_plain_is_reference():
    q = rand(2, 3, 4, 8)
    cos, sin = cache(4, 8)
    c, s = cos[None].expand(2, -1, -1), sin[None].expand(2, -1, -1)
    assert torch.equal(rotary_reference_indexed(q, c, s), rotary_reference(q, c, s))
    assert torch.equal(rotary_reference_indexed(q, cos, sin, seqlen_offsets=0), rotary_reference(q, c, s))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_packed_qkv(backend):
    B, S, Hq, Hk, D, P = 2, 5, 4, 2, 64, 30
    qkv = rand(B, S, Hq + 2 * Hk, D)
    cos, sin = cache(P, D)
    pos = torch.randint(0, P, (B, S))
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk], qkv[:, :, Hq + Hk :]
    want = rk.apply_rotary_transformers(q, k, cos[pos], sin[pos], 2, backend="reference")
    # out of place, differentiable into qkv
    x = qkv.clone().requires_grad_()
    got = rk.apply_rotary_qkv(x, cos[pos], sin[pos], Hq, Hk, backend=backend)
    for g, w in zip(got, want):
        close(g, w)
    (got[0].sum() + got[1].square().sum()).backward()
    xr = qkv.clone().requires_grad_()
    ref = rk.apply_rotary_qkv(xr, cos[pos], sin[pos], Hq, Hk, backend="reference")
    (ref[0].sum() + ref[1].square().sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    assert torch.all(x.grad[:, :, Hq + Hk :] == 0)
    # in place, with positions into the cache; v untouched
    xi = qkv.clone()
    with torch.no_grad():
        assert rk.apply_rotary_qkv_(xi, cos, sin, Hq, Hk, positions=pos, backend=backend) is xi
    close(xi[:, :, :Hq], want[0])
    close(xi[:, :, Hq : Hq + Hk], want[1])
    assert torch.equal(xi[:, :, Hq + Hk :], v)
    # packed tokens [T, H, D] with cu_seqlens
    xt = rand(7, Hq + 2 * Hk, D)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    qo, ko = rk.apply_rotary_qkv(xt, cos, sin, Hq, Hk, cu_seqlens=cu, backend=backend)
    close(qo, varlen_expected(xt[:, :Hq], cos, sin, cu.tolist(), [0, 0], False))
    with pytest.raises(ValueError, match="expected num_q_heads"):
        rk.apply_rotary_qkv(qkv, cos, sin, Hq, Hk + 1)


def test_multimodal_dropin():
    B, S, H, D = 1, 4, 2, 16
    pos3 = torch.randint(0, 9, (3, B, S))
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = pos3[..., None].float() * inv
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos(), ang.sin()
    section = [2, 3, 3]
    # transformers 4.x's apply_multimodal_rotary_pos_emb, written out
    c = torch.cat([m[i % 3] for i, m in enumerate(cos.split(section * 2, dim=-1))], dim=-1)
    s = torch.cat([m[i % 3] for i, m in enumerate(sin.split(section * 2, dim=-1))], dim=-1)
    q, k = rand(B, H, S, D), rand(B, 1, S, D, seed=1)
    got = rk.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)
    close(got[0], rotary_reference(q, c, s))
    close(got[1], rotary_reference(k, c, s))
