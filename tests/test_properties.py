"""Property-based tests (hypothesis): random shapes, head counts, rotary dims, dtypes, layouts,
strides (transposed, sliced, offset views with misaligned data pointers, zero strides from
expand), unsqueeze_dim and token-position options; every backend against the reference,
forward and backward, inputs never mutated.

Profiles (HYPOTHESIS_PROFILE): "ci" (default; derandomized, bounded so CI stays fast) and
"dev" (many more examples, random seeds) for local runs:

    HYPOTHESIS_PROFILE=dev .venv/bin/python -m pytest tests/test_properties.py
"""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rotary_kernels as rk  # noqa: E402
from rotary_kernels.reference import rotary_reference_indexed  # noqa: E402

from conftest import TOL  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = [b for b in rk.available_backends("cpu") if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def strided(draw, shape, dtype, seed, name):
    """A tensor of `shape` with a random memory layout: contiguous, a permutation of another
    layout, a slice of a larger tensor (non-unit strides), or an offset view (misaligned pointer)."""
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["contig", "permuted", "sliced", "offset"]), label=f"{name} layout")
    if kind == "contig":
        return torch.randn(*shape, generator=g).to(dtype)
    if kind == "permuted":
        perm = draw(st.permutations(range(len(shape))), label=f"{name} perm")
        base = torch.randn(*[shape[p] for p in perm], generator=g).to(dtype)
        inv = [perm.index(i) for i in range(len(shape))]
        return base.permute(inv)
    if kind == "sliced":  # every other element along one dim of a larger tensor
        dim = draw(st.integers(0, len(shape) - 1), label=f"{name} sliced dim")
        big = list(shape)
        big[dim] = 2 * shape[dim]
        return torch.randn(*big, generator=g).to(dtype)[(slice(None),) * dim + (slice(None, None, 2),)]
    n = 1
    for s in shape:
        n *= s
    off = draw(st.integers(1, 7), label=f"{name} offset")
    return torch.randn(n + off, generator=g).to(dtype)[off:].view(shape)


@st.composite
def problems(draw, with_index=True):
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    B = draw(st.integers(1, 3), label="B")
    S = draw(st.integers(1, 6), label="S")
    Hq = draw(st.integers(1, 5), label="Hq")
    Hk = draw(st.integers(1, 3), label="Hk")
    half = draw(st.integers(1, 12), label="R/2")
    D = 2 * half + draw(st.sampled_from([0, 0, 1, 2, 6]), label="D - R")
    R = 2 * half
    ud = draw(st.sampled_from([1, 2]), label="unsqueeze_dim")
    interleaved = draw(st.booleans(), label="interleaved")
    shape = (lambda H: (B, H, S, D)) if ud == 1 else (lambda H: (B, S, H, D))
    q = strided(draw, shape(Hq), dtype, 0, "q")
    k = strided(draw, shape(Hk), dtype, 1, "k")
    cs_dtype = draw(st.sampled_from([torch.float32, dtype]), label="cos dtype")
    mode = draw(st.sampled_from(["batched", "shared", "expanded"] + (["positions", "offsets", "mrope"] if with_index else [])),
                label="cos mode")
    g = torch.Generator().manual_seed(2)
    index = {}
    if mode in ("positions", "offsets", "mrope"):
        P = S + 8
        ang = torch.rand(P, R, generator=g) * 6.3  # arbitrary tables: no symmetry for a bug to hide behind
        if mode == "positions":
            index["positions"] = torch.randint(0, P, (B, S), generator=g).to(draw(st.sampled_from([torch.int32, torch.int64])))
        elif mode == "offsets":
            index["seqlen_offsets"] = draw(st.sampled_from([3, None]), label="scalar offset") or torch.randint(0, 8, (B,), generator=g)
        else:
            t = draw(st.integers(0, half), label="mrope t")
            h = draw(st.integers(0, half - t), label="mrope h")
            index["mrope_section"] = (t, h, half - t - h)
            index["mrope_interleaved"] = draw(st.booleans(), label="mrope interleaved")
            index["positions"] = torch.randint(0, P, (3, B, S), generator=g)
    elif mode == "batched":
        ang = torch.rand(B, S, R, generator=g) * 6.3
    elif mode == "shared":
        ang = torch.rand(1, S, R, generator=g) * 6.3
    else:  # one table expanded over the batch: zero strides
        ang = (torch.rand(1, S, R, generator=g) * 6.3).expand(B, S, R)
    cos, sin = ang.cos().to(cs_dtype), ang.sin().to(cs_dtype)
    return q, k, cos, sin, ud, interleaved, index


def close(got, want):
    torch.testing.assert_close(got, want.to(got.dtype), **TOL[got.dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@given(p=problems())
def test_forward_matches_reference(backend, p):
    q, k, cos, sin, ud, interleaved, index = p
    q0, k0 = q.clone(), k.clone()
    qo, ko = rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, backend=backend, **index)
    for got, x in ((qo, q), (ko, k)):
        assert got.shape == x.shape and got.dtype == x.dtype
        close(got, rotary_reference_indexed(x, cos, sin, ud, interleaved, **index))
    assert torch.equal(q, q0) and torch.equal(k, k0)
    # in place gives the same values
    qi, ki = q.clone(), k.clone()
    with torch.no_grad():
        rk.apply_rotary_transformers_(qi, ki, cos, sin, ud, interleaved=interleaved, backend=backend, **index)
    torch.testing.assert_close(qi, qo, rtol=0, atol=0)
    torch.testing.assert_close(ki, ko, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(p=problems())
def test_backward_matches_reference(backend, p):
    q, k, cos, sin, ud, interleaved, index = p
    q, k = q.float().requires_grad_(), k.float().requires_grad_()  # grads compared in fp32
    gq = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    gk = torch.randn(k.shape, generator=torch.Generator().manual_seed(8))
    got = torch.autograd.grad(
        rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, backend=backend, **index), (q, k), (gq, gk))
    want = torch.autograd.grad(
        rk.apply_rotary_transformers(q, k, cos, sin, ud, interleaved=interleaved, backend="reference", **index),
        (q, k), (gq, gk))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@given(p=problems(with_index=False))
def test_single_tensor_and_qkv(backend, p):
    q, k, cos, sin, ud, interleaved, _ = p
    x = rk.apply_rotary_emb(q, cos, sin, ud, interleaved, backend=backend)
    close(x, rotary_reference_indexed(q, cos, sin, ud, interleaved))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@given(data=st.data())
def test_entry_op_takes_exactly_what_validation_accepts(data):
    """The one-call C++ entries of the public functions (torch_binding.cpp: rotary_transformers
    and rotary_transformers_) re-implement _canon's shape rules. For random, mostly invalid, x/cos shapes and
    unsqueeze_dim it must return nothing when the Python validation rejects the arguments (the
    public function then raises its error) and the reference's values when it accepts them."""
    from rotary_kernels._api import _validate
    from rotary_kernels._compiled import ops

    # A valid call (cos/sin broadcast over a random head axis, some dims 1, leading dims
    # dropped), then often one mutation that may make it invalid.
    x_shape = [data.draw(st.integers(1, 3), label="x dim") for _ in range(data.draw(st.integers(2, 3), label="x rank - 1"))]
    x_shape.append(data.draw(st.sampled_from([4, 6, 8]), label="D"))
    head = data.draw(st.integers(0, len(x_shape) - 2), label="head axis")
    drop = data.draw(st.integers(0, head), label="leading dims dropped")
    cos_lead = [1 if data.draw(st.booleans(), label="cos dim 1") else n for n in x_shape[drop:-1]]
    del cos_lead[head - drop]
    R = data.draw(st.sampled_from([2, 4, 6]), label="R")
    ud = head - drop - data.draw(st.sampled_from([0, len(cos_lead) + 2]), label="negative unsqueeze_dim")
    mutation = data.draw(st.sampled_from(["none", "ud", "cos dim", "R", "cos rank", "x rank"]), label="mutation")
    if mutation == "ud":
        ud = data.draw(st.integers(-6, 5), label="unsqueeze_dim")
    elif mutation == "cos dim" and cos_lead:
        cos_lead[data.draw(st.integers(0, len(cos_lead) - 1), label="which")] = data.draw(st.integers(1, 4), label="size")
    elif mutation == "R":
        R = data.draw(st.sampled_from([0, 3, 8, 10]), label="bad R")
    elif mutation == "cos rank":
        cos_lead = [data.draw(st.integers(1, 3), label="extra cos dim")] + cos_lead
    elif mutation == "x rank":
        x_shape = [1] + x_shape if len(x_shape) == 4 or data.draw(st.booleans(), label="grow") else x_shape[1:]
    x = torch.randn(x_shape, dtype=torch.float64)
    cos, sin = torch.randn(cos_lead + [R], dtype=torch.float64), torch.randn(cos_lead + [R], dtype=torch.float64)
    try:
        _validate(x, None, cos, sin, ud, False, {})
        valid = True
    except ValueError:
        valid = False
    out = ops.rotary_transformers(x, None, cos, sin, ud, False, False)
    assert len(out) == (1 if valid else 0), (x_shape, cos_lead, R, ud)
    xi = x.clone()
    assert ops.rotary_transformers_(xi, None, cos, sin, ud, False) == valid  # the in-place entry
    if valid:
        torch.testing.assert_close(out[0], rotary_reference_indexed(x, cos, sin, ud, False), rtol=1e-12, atol=1e-12)
        assert torch.equal(xi, out[0])
    else:
        assert torch.equal(xi, x)


def _element_sets(*tensors):
    """For each tensor, the set of its elements' byte addresses, and whether two elements share one."""
    import itertools

    out = []
    for t in tensors:
        e, base = t.element_size(), t.data_ptr()
        offs = [sum(i * s for i, s in zip(idx, t.stride())) for idx in itertools.product(*map(range, t.shape))]
        out.append(({base + e * o + u for o in offs for u in range(e)}, len(set(offs)) != len(offs)))
    return out


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@given(data=st.data())
def test_inplace_memory_rules(backend, data):
    """In place, q and k are random strided views of one buffer (overlapping themselves or each
    other, or disjoint like a packed qkv's heads): the call raises exactly when the brute-force
    element sets overlap, and otherwise gives the out-of-place values, leaving the rest of the buffer."""
    B, S, D = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 3), label="S"), 4
    buf = torch.randn(200, generator=torch.Generator().manual_seed(3))

    def view(name):
        H = data.draw(st.integers(1, 3), label=f"{name} heads")
        strides = [data.draw(st.sampled_from([0, 1, 4, 8, 12, 24, 48]), label=f"{name} stride {d}") for d in "bhs"]
        sd = data.draw(st.sampled_from([1, 1, 2]), label=f"{name} head-dim stride")
        off = data.draw(st.integers(0, 40), label=f"{name} offset")
        return buf.as_strided((B, H, S, D), (*strides, sd), off)

    q, k = view("q"), view("k")
    cos, sin = torch.randn(B, S, D), torch.randn(B, S, D)
    (qs, q_self), (ks, k_self) = _element_sets(q, k)
    bad = q_self or k_self or bool(qs & ks)
    want = [rotary_reference_indexed(x, cos, sin) for x in (q, k)]
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[[(a - buf.data_ptr()) // 4 for a in qs | ks]] = False
    before = buf.clone()
    if bad:
        with pytest.raises(ValueError, match="sharing memory|overlaps"):
            with torch.no_grad():
                rk.apply_rotary_transformers_(q, k, cos, sin, backend=backend)
        assert torch.equal(buf, before)
    else:
        with torch.no_grad():
            rk.apply_rotary_transformers_(q, k, cos, sin, backend=backend)
        close(q, want[0])
        close(k, want[1])
        assert torch.equal(buf[untouched], before[untouched])
