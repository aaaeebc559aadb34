"""Bad input gives a clear error naming the argument; the flash-attn API; torch.compile."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rotary_kernels as rk
from rotary_kernels._dispatch import Plan, rotate_inplace_op, rotate_op
from rotary_kernels.reference import apply_rotary_reference, apply_rotary_transformers_reference

from conftest import TOL


def qkcs(D=16, R=16, dtype=torch.float32):
    q = torch.randn(2, 3, 4, D, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 2, 3, D, dtype=dtype)
    cos, sin = torch.randn(2, 3, R), torch.randn(2, 3, R)
    return q, k, cos, sin


BAD = {
    "odd rotary dim": (lambda q, k, c, s: (q, k, c[..., :7], s[..., :7]), ValueError, "even"),
    "R > D": (lambda q, k, c, s: (q, k, torch.randn(2, 3, 32), torch.randn(2, 3, 32)), ValueError, "larger than q"),
    "cos/sin shapes differ": (lambda q, k, c, s: (q, k, c, s[..., :8]), ValueError, "same shape"),
    "cos/sin dtypes differ": (lambda q, k, c, s: (q, k, c, s.double()), ValueError, "same dtype"),
    "k head dim mismatch": (lambda q, k, c, s: (q, k[..., :8], c, s), ValueError, "larger than k"),
    "q rank 2": (lambda q, k, c, s: (q[0, 0], k, c, s), ValueError, "q must be 3-D or 4-D"),
    "q rank 5": (lambda q, k, c, s: (q[None], k, c, s), ValueError, "q must be 3-D or 4-D"),
    "cos seq mismatch": (lambda q, k, c, s: (q, k, c[:, :2], s[:, :2]), ValueError, "do not broadcast to q"),
    "cos would broadcast q": (lambda q, k, c, s: (q[:1], k[:1], c, s), ValueError, "do not broadcast to q"),
    "int q": (lambda q, k, c, s: (q.to(torch.int32), k, c, s), TypeError, "q must be float16"),
    "int cos": (lambda q, k, c, s: (q, k, c.to(torch.int64), s), TypeError, "cos must be"),
    "complex k": (lambda q, k, c, s: (q, k.to(torch.complex64), c, s), TypeError, "k must be"),
    "not a tensor": (lambda q, k, c, s: (q, k.tolist(), c, s), TypeError, "k must be a torch.Tensor"),
    "k is None": (lambda q, k, c, s: (q, None, c, s), TypeError, "k must be a torch.Tensor"),
    "device mismatch": (lambda q, k, c, s: (q, k, c.to("meta"), s.to("meta")), ValueError, "same device"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clearly(case):
    make, exc, msg = BAD[case]
    args = make(*qkcs())
    for backend in [None] + [b for b in rk.available_backends("cpu")]:
        with pytest.raises(exc, match=msg):
            rk.apply_rotary_transformers(*args, backend=backend)


def test_bad_unsqueeze_dim():
    q, k, cos, sin = qkcs()
    with pytest.raises(ValueError, match="unsqueeze_dim=5"):
        rk.apply_rotary_transformers(q, k, cos, sin, 5)
    with pytest.raises(ValueError, match="head dim"):
        rk.apply_rotary_transformers(q, k, cos, sin, -1)
    with pytest.raises(TypeError, match="unsqueeze_dim must be an int"):
        rk.apply_rotary_transformers(q, k, cos, sin, 1.0)


def test_unknown_or_unavailable_backend():
    q, k, cos, sin = qkcs()
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.apply_rotary_transformers(q, k, cos, sin, backend="cudnn")
    with pytest.raises(RuntimeError, match="'cuda' is not available on cpu"):
        rk.apply_rotary_transformers(q, k, cos, sin, backend="cuda")


@pytest.mark.parametrize("so", ["missing", "broken"])
def test_extension_missing_or_not_loading(so, tmp_path):
    """A copy of the package without its compiled extension, or with one that does not load (a
    build for another torch): the reference runs, backend="cpu" says why it cannot; a broken
    one also warns at import (it would otherwise fall back silently)."""
    src = os.path.dirname(rk.__file__)
    shutil.copytree(src, tmp_path / "rotary_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if so == "broken":
        (tmp_path / "rotary_kernels" / "_rotary_kernels_C.abi3.so").write_text("not a library")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import torch, rotary_kernels as rk\n"
            "assert rk.__file__.startswith(sys.path[0]), rk.__file__\n"
            "x, c = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)\n"
            "assert torch.equal(rk.apply_rotary_emb(x, c, c), rk.reference.rotary_reference(x, c, c))\n"
            "rk.apply_rotary_emb(x, c, c, backend='cpu')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "RuntimeError: backend 'cpu' is not available on cpu: the compiled extension is not available" in p.stderr
    if so == "missing":
        assert "(not built)" in p.stderr and "Warning" not in p.stderr
    else:
        assert "RuntimeWarning: rotary_kernels: the compiled extension does not load" in p.stderr


def test_no_ext_build_removes_a_stale_extension(tmp_path):
    """ROTARY_KERNELS_NO_EXT=1 means no extension: one an earlier build left in the source tree
    (which an editable install would still import) is removed."""
    root = Path(__file__).resolve().parents[1]
    for f in ("setup.py", "pyproject.toml", "build.toml"):
        shutil.copy2(root / f, tmp_path / f)
    pkg = tmp_path / "torch-ext" / "rotary_kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    stale = pkg / "_rotary_kernels_C.abi3.so"
    stale.write_text("an old build")
    env = dict(os.environ, ROTARY_KERNELS_NO_EXT="1")
    p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1000:]
    assert not stale.exists() and "removing" in p.stdout


def test_inplace_rejects_autograd_and_overlap():
    q, k, cos, sin = qkcs()
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="q is a view of a leaf tensor that requires grad"):  # (as torch says)
        rk.apply_rotary_transformers_(q, k, cos, sin)
    q2 = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match="q overlaps k"):  # k is two of q's heads
        rk.apply_rotary_transformers_(q2, q2[:, 1:3], cos[:1], sin[:1])


# ---------------------------------------------------------------- flash-attn style apply_rotary

@pytest.mark.parametrize("conj", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_rotary_flash_attn_style(dev_backend, conj, dtype):
    device, backend = dev_backend
    x = torch.randn(2, 5, 3, 16, dtype=dtype, device=device)  # [B, S, H, D], rotary_dim 12
    cos = torch.randn(5, 1, 6, device=device)  # [S, 1, rd/2] broadcast over heads
    sin = torch.randn(5, 1, 6, device=device)
    x1, x2 = x[..., :6], x[..., 6:12]
    want1, want2 = apply_rotary_reference(x1, x2, cos, sin, conj)
    o1, o2 = torch.empty_like(x1), torch.empty_like(x2)
    x0 = x.clone()
    assert rk.apply_rotary(x1, x2, cos, sin, o1, o2, conj, backend=backend) is None
    assert torch.equal(x, x0)
    torch.testing.assert_close(o1, want1, **TOL[dtype])
    torch.testing.assert_close(o2, want2, **TOL[dtype])
    rk.apply_rotary(x1, x2, cos, sin, x1, x2, conj, backend=backend)  # in place, as flash-attn calls it
    assert torch.equal(x1, o1) and torch.equal(x2, o2)
    assert torch.equal(x[..., 12:], x0[..., 12:])


def test_apply_rotary_rejects_bad_out():
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    cos, sin = torch.randn(8), torch.randn(8)
    with pytest.raises(ValueError, match="out1 must match"):
        rk.apply_rotary(x1, x2, cos, sin, torch.empty(4, 7), torch.empty(4, 8), False)
    with pytest.raises(ValueError, match="cos of shape"):
        rk.apply_rotary(x1, x2, torch.randn(3), sin, torch.empty(4, 8), torch.empty(4, 8), False)
    buf = torch.randn(5, 8)
    with pytest.raises(ValueError, match="out1 overlaps x1"):
        rk.apply_rotary(buf[:4], x2, cos, sin, buf[1:], torch.empty(4, 8), False)


# ---------------------------------------------------------------- torch.library / torch.compile

def test_opcheck_python_custom_ops(dev_backend):
    device, backend = dev_backend
    q, k, cos, sin = (t.to(device) for t in qkcs())  # (the ops compute; autograd is the Functions')
    torch.library.opcheck(rotate_op, (q, k, cos, sin, *Plan(1, False, False, backend).op_args()))
    torch.library.opcheck(rotate_op, (q, None, cos, sin, *Plan(1, True, True, backend).op_args()))
    torch.library.opcheck(rotate_inplace_op, (q.detach().clone(), k.detach().clone(), cos, sin,
                                              *Plan(1, False, False, backend).op_args()))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_fwd_bwd(dev_backend, dynamic):
    device, backend = dev_backend
    torch._dynamo.reset()

    def f(q, k, cos, sin):
        qe, ke = rk.apply_rotary_transformers(q, k, cos, sin, backend=backend)
        x = rk.apply_rotary_emb(q, cos, sin, backend=backend)
        return (qe * 2).sum() + ke.square().sum() + x.sum()

    cf = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for S in (3, 5):  # a second shape exercises the dynamic-shape path / recompiles
        q = torch.randn(2, S, 4, 16, device=device).transpose(1, 2).requires_grad_()
        k = torch.randn(2, 2, S, 16, device=device).requires_grad_()
        cos, sin = torch.randn(2, S, 16, device=device), torch.randn(2, S, 16, device=device)
        out = cf(q, k, cos, sin)
        out.backward()
        qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        qe, ke = apply_rotary_transformers_reference(qr, kr, cos, sin)
        want = (qe * 2).sum() + ke.square().sum() + qe.sum()
        want.backward()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(q.grad, qr.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k.grad, kr.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_inplace(dev_backend):
    device, backend = dev_backend
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, cos, sin):
        return rk.apply_rotary_transformers_(q, k, cos, sin, backend=backend)

    q, k, cos, sin = (t.to(device) for t in qkcs())
    want = apply_rotary_transformers_reference(q, k, cos, sin)
    with torch.no_grad():
        f(q, k, cos, sin)
    torch.testing.assert_close(q, want[0], **TOL[torch.float32])
    torch.testing.assert_close(k, want[1], **TOL[torch.float32])
