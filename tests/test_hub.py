"""The Hub kernel end to end, on CPU with the real libraries and no network: build the tree
(scripts/build_hub.py), load it with kernels' get_local_kernel and get_kernel(LOCAL_KERNELS),
and kernelize tiny transformers models (Llama; Phi for partial rotary) in training and
inference modes against the un-kernelized model.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

kernels = pytest.importorskip("kernels")
transformers = pytest.importorskip("transformers")

import rotary_kernels as rk  # noqa: E402
from rotary_kernels.reference import apply_rotary_transformers_reference, rotary_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def hub_repo(tmp_path_factory):
    """A kernel repository (build/ with every variant) built from this checkout."""
    repo = tmp_path_factory.mktemp("hub")
    cmd = [sys.executable, str(ROOT / "scripts" / "build_hub.py"), "--out", str(repo / "build"), "--cuda-archs", "9.0"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return repo


@pytest.fixture(scope="session")
def hub_kernel(hub_repo):
    return kernels.get_local_kernel(hub_repo)


def test_tree_and_metadata(hub_repo):
    variants = sorted(p.name for p in (hub_repo / "build").iterdir())
    assert {"torch-cuda", "torch-rocm", "torch-xpu", "torch-cpu"} <= set(variants)
    major, minor = torch.__version__.split(".")[:2]
    assert f"torch{major}{minor}-cxx11-cpu-x86_64-linux" in variants
    for v in variants:
        d = hub_repo / "build" / v
        meta = json.loads((d / "metadata.json").read_text())
        assert {"id", "name", "version", "license", "python-depends", "backend"} <= set(meta)
        assert meta["name"] == "rotary-kernels" and meta["id"].isidentifier()
        kernels.Metadata.read_from_file(d / "metadata.json")  # kernels' own validation
        # The Python files are the package's own, unchanged (only _ops.py is generated).
        for f in (ROOT / "torch-ext" / "rotary_kernels").glob("*.py"):
            if f.name != "_ops.py":
                assert (d / f.name).read_bytes() == f.read_bytes(), (v, f.name)
        assert meta["id"] in (d / "_ops.py").read_text()


def _qkcs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 32, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(2, 5, 2, 32, generator=g).to(dtype).transpose(1, 2)
    ang = torch.rand(2, 5, 16, generator=g) * 6
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    return q, k, cos, sin


def _check_functions(mod):
    q, k, cos, sin = _qkcs()
    for got, want in zip(mod.apply_rotary_transformers(q, k, cos, sin),
                         apply_rotary_transformers_reference(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(mod.apply_rotary_emb(q, cos, sin), rotary_reference(q, cos, sin, 1))
    torch.testing.assert_close(mod.apply_rotary_emb(q, cos[..., :16], sin[..., :16], interleaved=True),
                               rotary_reference(q, cos[..., :16], sin[..., :16], 1, True))
    qi, ki = q.clone(), k.clone()
    with torch.no_grad():
        mod.apply_rotary_transformers_(qi, ki, cos, sin)
    for got, want in zip((qi, ki), apply_rotary_transformers_reference(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    x1, x2 = q[..., :16].contiguous(), q[..., 16:].contiguous()
    o1, o2 = torch.empty_like(x1), torch.empty_like(x2)
    mod.apply_rotary(x1, x2, cos[:, None, :, :16], sin[:, None, :, :16], o1, o2, False)
    torch.testing.assert_close(o1, x1 * cos[:, None, :, :16] - x2 * sin[:, None, :, :16])
    # Gradients through the loaded kernel equal the reference's.
    qg, kg = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    qr, kr = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    sum(t.square().sum() for t in mod.apply_rotary_transformers(qg, kg, cos, sin)).backward()
    sum(t.square().sum() for t in apply_rotary_transformers_reference(qr, kr, cos, sin)).backward()
    torch.testing.assert_close(qg.grad, qr.grad)
    torch.testing.assert_close(kg.grad, kr.grad)


def test_get_local_kernel(hub_kernel):
    assert hub_kernel.__file__.startswith(str(Path(hub_kernel.__file__).parents[1]))
    _check_functions(hub_kernel)
    assert hub_kernel._compiled.HAS_EXT, "the arch variant carries the compiled ops"
    # Its op namespace is its own, not the pip install's: both load in one process.
    assert hub_kernel._ops.add_op_namespace_prefix("rotary") != rk._compiled.add_op_namespace_prefix("rotary")
    for fn, backward in (("apply_rotary_transformers", True), ("apply_rotary_emb", True),
                         ("apply_rotary_transformers_", True), ("apply_rotary", False)):
        assert getattr(hub_kernel, fn).has_backward is backward
    layer = hub_kernel.layers.apply_rotary_transformers
    assert layer.has_backward and layer.can_torch_compile
    assert not hub_kernel.layers.apply_rotary_transformers_inplace.has_backward


def test_get_local_kernel_cpu_variant(hub_repo):
    mod = kernels.get_local_kernel(hub_repo, backend="cpu")
    assert "_cpu_" in mod.__name__
    _check_functions(mod)


def test_get_kernel_with_local_kernels(hub_repo, hub_kernel, monkeypatch):
    monkeypatch.setenv("LOCAL_KERNELS", f"kernels-community/rotary={hub_repo}")
    mod = kernels.get_kernel("kernels-community/rotary", version=1)
    assert mod is hub_kernel  # the same variant, loaded once
    _check_functions(mod)


def test_missing_variant_is_kernels_error(tmp_path):
    (tmp_path / "build" / "torch-metal").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Cannot find a build variant"):
        kernels.get_local_kernel(tmp_path)


# --- transformers models, kernelized -------------------------------------------------------


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts calls of ops in the kernel's namespace (forward and backward)."""

    def __init__(self, namespace):
        super().__init__()
        self.namespace, self.calls = namespace, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == self.namespace:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _tiny(kind):
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama import modeling_llama as modeling

        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM, cfg, modeling
    from transformers import PhiConfig, PhiForCausalLM
    from transformers.models.phi import modeling_phi as modeling

    cfg = PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                    max_position_embeddings=64)
    return PhiForCausalLM, cfg, modeling


@pytest.fixture
def restore_rotary():
    """kernelize patches transformers' module-level apply_rotary_pos_emb object: undo it."""
    patched = []
    yield patched
    for fn in patched:
        fn.__dict__.pop("forward", None)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "phi"])
@pytest.mark.parametrize("mode", ["TRAINING", "INFERENCE"])
def test_kernelize_transformers_model(hub_repo, hub_kernel, restore_rotary, kind, mode):
    from kernels import Mode, kernelize, use_kernel_mapping

    cls, cfg, modeling = _tiny(kind)
    torch.manual_seed(0)
    ref_model = cls(cfg).float()
    model = cls(cfg).float()
    model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))

    if mode == "TRAINING":
        ref_model.train()
        ref_logits, ref_grads = _step(ref_model, ids)  # before kernelize: the eager function
    else:
        ref_model.eval()
        with torch.inference_mode():
            ref_logits = ref_model(input_ids=ids).logits

    mapping = rk.hub.kernel_mapping(repo_path=hub_repo, inplace_inference=(mode == "INFERENCE"))
    restore_rotary.append(modeling.apply_rotary_pos_emb)
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=getattr(Mode, mode), device="cpu")
    expect = hub_kernel.layers.apply_rotary_transformers_inplace if mode == "INFERENCE" \
        else hub_kernel.layers.apply_rotary_transformers
    assert modeling.apply_rotary_pos_emb.forward.__func__ is expect.forward  # really replaced

    counter = CountOps(hub_kernel._ops.add_op_namespace_prefix("x").split("::")[0])
    # fp32 on both sides; the kernel computes RoPE in fp32 and rounds once, eager rounds each
    # of its three ops, so they differ by fp32 rounding, amplified a little by two layers.
    tol = dict(rtol=1e-4, atol=1e-5)
    if mode == "TRAINING":
        model.train()
        with counter:
            logits, grads = _step(model, ids)
        torch.testing.assert_close(logits, ref_logits, **tol)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)
        assert counter.calls >= 2 * cfg.num_hidden_layers  # forward + backward of every layer
    else:
        model.eval()
        with torch.inference_mode(), counter:
            logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, ref_logits, **tol)
        assert counter.calls == cfg.num_hidden_layers
