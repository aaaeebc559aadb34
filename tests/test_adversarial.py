"""Calls a hostile or careless user makes, each of which once gave a silent wrong answer, read
memory out of bounds or raised an unclear error: the memory rules of the functions that write
(version counters, inference tensors, internal and partial overlap), forward-mode AD, token
positions checked at run time under torch.compile, one graph per compile, and errors that name
the argument. Every kernel backend, against torch's own behaviour and the reference."""

import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import rotary_kernels as rk
from rotary_kernels.reference import apply_rotary_transformers_reference, rotary_reference_indexed

from conftest import TOL

ALL_BACKENDS = [b for b in rk.available_backends("cpu")]  # the reference included: same rules
# (device, backend): ALL_BACKENDS on CPU, and the GPU's kernel backends where there is one
DEV_BACKENDS = [pytest.param("cpu", b, id=b) for b in ALL_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}") for b in rk.available_backends("cuda") if b != "reference"]


def same_as_reference(got, want, dev):
    """Bit-equal on CPU; on a GPU within the kernels' one ulp of the reference (conftest.TOL)."""
    for a, b in zip(got, want):
        if dev == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **TOL[a.dtype])


def tables(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)


# ---------------------------------------------------------------- functions that write

def inplace_calls(backend):
    """(name, call(x) rotating x [2, 4, 5, 8] in place) for every in-place entry point."""
    c, s = tables(2, 5, 8)
    return [
        ("apply_rotary_emb_", lambda x: rk.apply_rotary_emb_(x, c, s, backend=backend)),
        ("apply_rotary_transformers_", lambda x: rk.apply_rotary_transformers_(
            x[:, :2], x[:, 2:], c, s, backend=backend)),
        ("apply_rotary_qkv_", lambda x: rk.apply_rotary_qkv_(x.transpose(1, 2), c, s, 2, 1, backend=backend)),
        ("apply_rotary", lambda x: rk.apply_rotary(x[..., :4], x[..., 4:], c[..., :4].unsqueeze(1),
                                                    s[..., :4].unsqueeze(1), x[..., :4], x[..., 4:],
                                                    backend=backend)),
    ]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_bumps_version_so_autograd_sees_it(backend):
    for name, call in inplace_calls(backend):
        a = torch.randn(2, 4, 5, 8, requires_grad=True)
        y = a * 1
        loss = (y * y).sum()  # saves y for backward
        with torch.no_grad():
            call(y)
        assert y._version > 0, name
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inference_tensor_not_updated_outside_inference_mode(backend):
    for name, call in inplace_calls(backend):
        with torch.inference_mode():
            x = torch.randn(2, 4, 5, 8)
        before = x.clone()
        with pytest.raises(RuntimeError, match="inference tensor"):
            call(x)
        assert torch.equal(x, before), name
        with torch.inference_mode():
            call(x)  # inside inference mode: fine
        assert not torch.equal(x, before), name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_autograd_refusals_before_anything_is_written(backend):
    """In grad mode, what PyTorch's own in-place ops refuse (a leaf that requires grad, a view of
    one, a view made in no_grad mode, one of several views unbind returned) is refused before the
    data is touched, naming the argument: autograd's own check ran after the Function's forward,
    the data rotated by then (and q rotated when k was the one refused)."""
    c, s = tables(2, 5, 8)
    a = torch.randn(2, 6, 5, 8, requires_grad=True)
    base = a * 1
    with torch.no_grad():
        no_grad_view = base[:, :3]
    q_of_unbind, k_of_unbind = (a * 1).unflatten(1, (2, 3)).unbind(1)
    cases = [
        ("q is a leaf tensor", a[:, :3].detach().requires_grad_(), torch.randn(2, 3, 5, 8)),
        ("q is a view of a leaf tensor", a[:, :3], a[:, 3:] * 1),
        ("k is a leaf tensor", a[:, :3] * 1, a[:, 3:].detach().requires_grad_()),  # (q valid: untouched too)
        ("q is a view made in no_grad mode", no_grad_view, torch.randn(2, 3, 5, 8)),
        ("q is one of several views", q_of_unbind, k_of_unbind),
    ]
    for match, q, k in cases:
        before = (q.detach().clone(), k.detach().clone())
        with pytest.raises(RuntimeError, match=match):
            rk.apply_rotary_transformers_(q, k, c, s, backend=backend)
        assert torch.equal(q.detach(), before[0]) and torch.equal(k.detach(), before[1]), match
    with torch.no_grad():  # as PyTorch's own: allowed without grad mode
        rk.apply_rotary_emb_(a, c, s, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_double_backward(backend):
    """create_graph=True through an in-place rotation: second-order gradients equal those of the
    same computation with PyTorch's copy_ (the backward was once_differentiable: none)."""
    c, s = tables(2, 5, 8, dtype=torch.float64)
    a = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for rotate in (lambda y: rk.apply_rotary_emb_(y, c, s, backend=backend),
                   lambda y: y.copy_(rotary_reference_indexed(y.clone(), c, s, 1, False))):
        y = a * 1
        rotate(y)
        g = torch.autograd.grad((y ** 2).sum(), a, create_graph=True)[0]
        grads.append((g, torch.autograd.grad((g ** 3).sum(), a)[0]))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_compiled_inplace_errors_keep_their_message():
    """Under torch.compile the in-place functions' errors keep the package's message (the check
    asked after a failure called a function dynamo cannot trace, which replaced it)."""
    x, (c, s) = torch.randn(2, 4, 5, 8), tables(2, 6, 8)  # 6 tokens' tables for 5

    def inplace(x, c, s):
        rk.apply_rotary_emb_(x, c, s)
        return x

    with pytest.raises(Exception, match="do not broadcast to x's shape"):
        torch.compile(inplace, fullgraph=True)(x, c, s)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_written_tensor_with_internal_overlap_rejected(backend):
    c, s = tables(2, 5, 8)
    for x in (torch.randn(2, 1, 5, 8).expand(2, 4, 5, 8),  # heads share memory
              torch.randn(2, 4, 5, 1).expand(2, 4, 5, 8)):  # head dim of stride 0
        with pytest.raises(ValueError, match="x has elements sharing memory"):
            rk.apply_rotary_emb_(x, c, s, backend=backend)
    x = torch.randn(4, 1).expand(4, 8)
    y = torch.randn(4, 8)
    with pytest.raises(ValueError, match="out1 has elements sharing memory"):
        rk.apply_rotary(x, y, torch.ones(8), torch.zeros(8), x, y, backend=backend)
    # an overlapping as_strided view with no zero stride: rows 0 and 1 share 4 elements
    z = torch.randn(64).as_strided((2, 3, 8), (4, 16, 1))
    with pytest.raises(ValueError, match="x has elements sharing memory"):
        rk.apply_rotary_emb_(z, *tables(2, 8), unsqueeze_dim=1, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_partial_overlap_rejected_disjoint_views_accepted(backend):
    c, s = tables(2, 5, 8)
    q = torch.randn(2, 4, 5, 8)
    before = q.clone()
    for k in (q[:, :2], q, q[:, 3:], q[:, ::2]):  # strided windows of q's memory, and q itself
        with pytest.raises(ValueError, match="q overlaps k"):
            rk.apply_rotary_transformers_(q, k, c, s, backend=backend)
    assert torch.equal(q, before)
    # disjoint strided views of one storage: the q and k heads of a packed qkv, interleaved in memory
    qkv = torch.randn(2, 5, 4 + 2 * 2, 8)
    q, k = qkv[:, :, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2)
    want = apply_rotary_transformers_reference(q, k, c, s)
    with torch.no_grad():
        rk.apply_rotary_transformers_(q, k, c, s, backend=backend)
    torch.testing.assert_close(q, want[0], **TOL[torch.float32])
    torch.testing.assert_close(k, want[1], **TOL[torch.float32])
    # apply_rotary's outs: exactly their inputs, or disjoint from everything
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="out1 overlaps out2"):
        rk.apply_rotary(x[:, :8], x[:, 8:], torch.ones(8), torch.zeros(8), x[:, :8], x[:, 4:12], backend=backend)


def test_overlap_tests_are_exact():
    """_canon's overlap tests against brute force over random strided views of one buffer."""
    import itertools
    import random

    from rotary_kernels._canon import internal_overlap, overlap

    def offsets(t):
        return [sum(i * st for i, st in zip(idx, t.stride())) for idx in itertools.product(*map(range, t.shape))]

    def bytes_of(t):
        e, base = t.element_size(), t.data_ptr()
        return {base + e * o + u for o in offsets(t) for u in range(e)}

    rng = random.Random(0)
    buf = torch.zeros(4096)
    for _ in range(400):
        nd = rng.randint(1, 4)
        a = buf.as_strided([rng.randint(1, 4) for _ in range(nd)],
                           [rng.choice([0, 1, 2, 3, 5, 7, 12, 20, 60]) for _ in range(nd)], rng.randint(0, 50))
        b = buf.as_strided([rng.randint(1, 4) for _ in range(nd)],
                           [rng.choice([1, 2, 3, 5, 7, 12, 20, 60]) for _ in range(nd)], rng.randint(0, 80))
        if b.stride(-1) == 1 and rng.random() < 0.3:
            b = b.view(torch.int16)  # other element size: byte-exact
        o = offsets(a)
        assert internal_overlap(a) == (len(set(o)) != len(o)), (a.shape, a.stride())
        assert overlap(a, b) == bool(bytes_of(a) & bytes_of(b)), (a.shape, a.stride(), b.shape, b.stride())


# ---------------------------------------------------------------- forward-mode AD

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_mode_ad_matches_reference(backend):
    torch.manual_seed(0)
    q, tq = torch.randn(1, 2, 3, 8, dtype=torch.float64), torch.randn(1, 2, 3, 8, dtype=torch.float64)
    k, tk = torch.randn(1, 1, 3, 8, dtype=torch.float64), torch.randn(1, 1, 3, 8, dtype=torch.float64)
    c, s = tables(3, 6, dtype=torch.float64)  # partial rotary
    ours = lambda q, k: rk.apply_rotary_transformers(q, k, c, s, 0, backend=backend)  # noqa: E731
    ref = lambda q, k: apply_rotary_transformers_reference(q, k, c, s, 0)  # noqa: E731
    got, want = torch.func.jvp(ours, (q, k), (tq, tk)), torch.func.jvp(ref, (q, k), (tq, tk))
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b)
    one = lambda x: rk.apply_rotary_emb(x, c, s, 0, backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(one)(q), torch.func.jacfwd(lambda x: ref(x, x)[0])(q))
    with fwAD.dual_level():
        out = rk.apply_rotary_emb(fwAD.make_dual(q, tq), c, s, 0, backend=backend)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, ref(tq, tq)[0])
    # tangents of cos/sin (through the reference's PyTorch ops)
    tc = torch.randn_like(c)
    got = torch.func.jvp(lambda c: rk.apply_rotary_emb(q, c, s, 0, backend=backend), (c,), (tc,))[1]
    want = torch.func.jvp(lambda c: rotary_reference_indexed(q, c, s, 0), (c,), (tc,))[1]
    torch.testing.assert_close(got, want)
    # gradients wrt cos through torch.func
    got = torch.func.grad(lambda c: rk.apply_rotary_emb(q, c, s, 0, backend=backend).square().sum())(c)
    want = torch.func.grad(lambda c: rotary_reference_indexed(q, c, s, 0).square().sum())(c)
    torch.testing.assert_close(got, want)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        rk.apply_rotary_emb_(fwAD.make_dual(q.clone(), tq), c, s, 0, backend=backend)


# ---------------------------------------------------------------- token positions at run time

@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "reference"])
def test_positions_checked_inside_compiled_programs(backend):
    c, s = tables(16, 8)
    f = torch.compile(lambda q, p: rk.apply_rotary_emb(q, c, s, positions=p, backend=backend), fullgraph=True)
    q = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(f(q, torch.tensor([[0, 1, 2]])), rotary_reference_indexed(
        q, c, s, positions=torch.tensor([[0, 1, 2]])), **TOL[torch.float32])
    for bad in (16, 10**6, 10**12, -1):
        with pytest.raises(IndexError, match="out of range"):
            f(q, torch.tensor([[0, 1, bad]]))
    g = torch.compile(lambda x, cu: rk.apply_rotary_emb(x, c, s, cu_seqlens=cu, backend=backend), fullgraph=True)
    x = torch.randn(7, 3, 8)
    g(x, torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the number of tokens 7"):
        g(x, torch.tensor([0, 3, 6]))


def test_empty_cache_rejected():
    with pytest.raises(ValueError, match="cache is empty"):
        rk.apply_rotary_emb(torch.randn(1, 2, 3, 8), *tables(0, 8), positions=torch.zeros(1, 3, dtype=torch.long))


def test_first_compile_is_one_graph():
    """In a fresh process: module-level state filled during the first trace would guard a second graph."""
    code = """
import os; os.environ.setdefault("TRITON_INTERPRET", "1")
import torch, rotary_kernels as rk
from torch._dynamo.testing import CompileCounter
q, k, c, s = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
for be in rk.available_backends("cpu"):
    cnt = CompileCounter()
    f = torch.compile(lambda *a: rk.apply_rotary_transformers(*a, backend=be), backend=cnt, fullgraph=True)
    for _ in range(3):
        f(q, k, c, s)
    print(be, cnt.frame_count)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    counts = dict(line.split() for line in out.splitlines())
    assert counts and all(n == "1" for n in counts.values()), counts


def test_int_offsets_do_not_recompile_per_value():
    c, s = tables(64, 8)
    from torch._dynamo.testing import CompileCounter

    cnt = CompileCounter()
    f = torch.compile(lambda q, o: rk.apply_rotary_emb(q, c, s, seqlen_offsets=o), backend=cnt, fullgraph=True)
    q = torch.randn(2, 2, 1, 8)
    for o in range(8):
        torch.testing.assert_close(f(q, o), rotary_reference_indexed(q, c, s, seqlen_offsets=o), **TOL[torch.float32])
    assert cnt.frame_count <= 2  # the first value specialised, then one dynamic graph


# ---------------------------------------------------------------- errors naming the argument

def test_unclear_errors_now_name_the_argument():
    q, (c, s) = torch.randn(1, 2, 3, 8), tables(1, 3, 8)
    with pytest.raises(ValueError, match="unsqueeze_dim="):
        rk.apply_rotary_emb(q, c, s, 2**70)
    with pytest.raises(ValueError, match="seqlen_offsets=.* int64"):
        rk.apply_rotary_emb(q, *tables(16, 8), seqlen_offsets=2**64)
    with pytest.raises(ValueError, match="mrope_section must be"):
        rk.apply_rotary_emb(q, *tables(3, 1, 3, 8), mrope_section=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.apply_rotary_emb(q, c, s, backend=["cpu"])
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        rk.apply_rotary_transformers_(q, None, c, s)
    with pytest.raises(ValueError, match="max_position must be a positive int"):
        rk.freqs.rope_cos_sin_cache(torch.ones(4), -1)
    for backend in ALL_BACKENDS:
        with pytest.raises(ValueError, match="x1 and x2 must have the same shape and dtype"):
            rk.apply_rotary(torch.randn(2, 4), torch.randn(2, 4).half(), torch.randn(2, 4), torch.randn(2, 4),
                            torch.empty(2, 4), torch.empty(2, 4).half(), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sparse_and_nested_tensors_named(backend):
    """A sparse or nested tensor anywhere: a TypeError naming it (was the dispatcher's
    NotImplementedError from the compiled op, or an internal error from the Triton launcher),
    on the one-call paths as on the validated ones."""
    import warnings

    q, k, (c, s) = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), tables(1, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's prototype warning for strided nested tensors)
        nested = torch.nested.nested_tensor([q[0], q[0]])
    calls = [
        ("q", "sparse", lambda: rk.apply_rotary_transformers(q.to_sparse(), k, c, s, backend=backend)),
        ("k", "sparse", lambda: rk.apply_rotary_transformers(q, k.to_sparse(), c, s, backend=backend)),
        ("cos", "sparse", lambda: rk.apply_rotary_transformers(q, k, c.to_sparse(), s, backend=backend)),
        ("sin", "sparse", lambda: rk.apply_rotary_transformers_(q.clone(), k.clone(), c, s.to_sparse(),
                                                                backend=backend)),
        ("q", "sparse", lambda: rk.apply_rotary_transformers_(q.to_sparse(), k.clone(), c, s, backend=backend)),
        ("x", "nested", lambda: rk.apply_rotary_emb(nested, c, s, backend=backend)),
        ("x", "nested", lambda: rk.apply_rotary_emb_(nested, c, s, backend=backend)),
        ("qkv", "sparse", lambda: rk.apply_rotary_qkv(torch.randn(1, 3, 12, 8).to_sparse(), c, s, 4, 4,
                                                      backend=backend)),
        ("x1", "sparse", lambda: rk.apply_rotary(q.to_sparse(), q, c[:, None], s[:, None], q.clone(), q.clone(),
                                                 backend=backend)),
    ]
    for _ in range(2):  # (the second time, Triton has the dense geometry recorded)
        rk.apply_rotary_transformers(q, k, c, s, backend=backend)
        rk.apply_rotary_transformers_(q.clone(), k.clone(), c, s, backend=backend)
        for name, kind, call in calls:
            with pytest.raises(TypeError, match=f"{name} must be a dense .strided. tensor, got a .*{kind}"):
                call()


@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_negative_views_read_and_written_with_their_signs(dev, backend):
    """A negative view (``z.conj().imag``: memory holding its values' negatives) as q, k, cos or
    sin, read and, in place, written with its sign: Triton read the raw memory (a silent wrong
    answer), and the in-place one-call op met PyTorch's Negative fallback, which raised after
    rotating the other tensor. Gradients and the low-level apply_rotary too."""
    from rotary_kernels.reference import apply_rotary_transformers_reference as ref

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g).to(dev), torch.randn(1, 2, 3, 8, generator=g).to(dev)
    ang = (torch.rand(1, 3, 8, generator=g) * 3).to(dev)
    c, s = ang.cos(), torch.polar(torch.ones_like(ang), -ang).conj().imag  # s: sin(ang), a negative view
    assert s.is_neg() and torch.allclose(s, ang.sin())
    neg = lambda t: torch._neg_view(t.neg())  # noqa: E731  (the same values, as a negative view)
    want = ref(q, k, c, s.resolve_neg())
    for _ in range(2):  # (the second time, Triton has the plain geometry recorded)
        for moved in ("q", "k", "cos", "sin"):
            args = dict(q=q, k=k, cos=c, sin=s.resolve_neg())
            args[moved] = neg(args[moved]) if moved != "sin" else s
            got = rk.apply_rotary_transformers(**args, backend=backend)
            same_as_reference(got, want, dev)
            qi, ki = (args[n] if args[n].is_neg() else args[n].clone() for n in ("q", "k"))
            rk.apply_rotary_transformers_(qi, ki, args["cos"], args["sin"], backend=backend)
            assert (qi.is_neg() or ki.is_neg()) == (moved in "qk")
            same_as_reference((qi, ki), want, dev)
        rk.apply_rotary_transformers(q, k, c, s.resolve_neg(), backend=backend)  # plain: recorded on Triton
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    gr = [torch.randn_like(q), torch.randn_like(k)]
    got = torch.autograd.grad(rk.apply_rotary_transformers(qq, kk, c, s, backend=backend), (qq, kk), gr)
    expect = torch.autograd.grad(ref(qq, kk, c, s.resolve_neg()), (qq, kk), gr)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    x1, x2, c1, s1 = q[..., :4], q[..., 4:], c[:, None, :, :4], s[:, None, :, :4]
    outs = [torch.empty_like(x1), torch.empty_like(x2)]
    rk.apply_rotary(neg(x1), x2, c1, s1, *outs, backend=backend)
    expect = [torch.empty_like(x1), torch.empty_like(x2)]
    rk.apply_rotary(x1, x2, c1, s1.resolve_neg(), *expect, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(outs, expect))
    # Llama 4's complex freqs_cis, conjugated (the inverse rotation): its imaginary part is a negative view
    from rotary_kernels._dropins import apply_rotary_emb_complex

    f = torch.polar(torch.ones(1, 3, 4, device=dev), ang[..., :4]).conj()
    xq = q.transpose(1, 2)  # [B, S, H, D]
    want_q = torch.view_as_real(torch.view_as_complex(xq.reshape(1, 3, 4, 4, 2)) * f[:, :, None]).flatten(3)
    torch.testing.assert_close(apply_rotary_emb_complex(xq, xq, f, backend=backend)[0], want_q,
                               **TOL[torch.float32])


@pytest.mark.parametrize("dev,backend", DEV_BACKENDS)
def test_efficient_zero_tensors_read_as_zeros_never_written(dev, backend):
    """Efficient zero tensors (forward-mode AD, functorch; no memory, a null data pointer that
    Triton launched with) read as zeros on every backend; written in place: an error naming them
    (was the overlap check's 'invalid python storage' on Triton and the reference)."""
    from rotary_kernels.reference import apply_rotary_transformers_reference as ref

    def zero(shape):
        return torch._efficientzerotensor(shape, device=dev)

    q, k, (c, s) = torch.randn(1, 4, 3, 8, device=dev), torch.randn(1, 2, 3, 8, device=dev), tables(1, 3, 8)
    c, s = c.to(dev), s.to(dev)
    for _ in range(2):  # (the second time, Triton has the plain geometry recorded)
        rk.apply_rotary_transformers(q, k, c, s, backend=backend)
        for i, shape in enumerate(((1, 4, 3, 8), (1, 2, 3, 8), (1, 3, 8), (1, 3, 8))):
            args = [q, k, c, s]
            args[i] = zero(shape)
            want = ref(*(torch.zeros(shape, device=dev) if j == i else a for j, a in enumerate(args)))
            got = rk.apply_rotary_transformers(*args, backend=backend)
            same_as_reference(got, want, dev)
        for name, args in (("q", (zero((1, 4, 3, 8)), k.clone())), ("k", (q.clone(), zero((1, 2, 3, 8))))):
            with pytest.raises(RuntimeError, match=f"{name} is an efficient zero tensor"):
                rk.apply_rotary_transformers_(*args, c, s, backend=backend)
        x = torch.randn(2, 4, device=dev)
        with pytest.raises(RuntimeError, match="out2 is an efficient zero tensor"):
            rk.apply_rotary(x, x, x, x, x.clone(), zero((2, 4)), backend=backend)


def test_meta_tensors_get_shapes():
    m = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    q, k = rk.apply_rotary_transformers(m(1, 4, 3, 8), m(1, 2, 3, 8), m(1, 3, 8), m(1, 3, 8))
    assert q.shape == (1, 4, 3, 8) and k.shape == (1, 2, 3, 8) and q.device.type == "meta"
    q, k = m(1, 4, 3, 8), m(1, 2, 3, 8)
    assert rk.apply_rotary_transformers_(q, k, m(1, 3, 8), m(1, 3, 8))[0] is q
    assert rk.apply_rotary_emb(m(1, 4, 3, 8), m(16, 8), m(16, 8), positions=torch.zeros(1, 3, dtype=torch.long,
                               device="meta")).shape == (1, 4, 3, 8)
