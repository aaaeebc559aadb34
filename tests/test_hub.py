"""The Hub kernel end to end, on CPU with the real libraries and no network: build the tree
(scripts/build_hub.py), load it with kernels' get_local_kernel and get_kernel(LOCAL_KERNELS),
and kernelize tiny transformers models (Llama; Phi for partial rotary) in training and
inference modes against the un-kernelized model.
"""

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

kernels = pytest.importorskip("kernels")
transformers = pytest.importorskip("transformers")

import rotary_kernels as rk  # noqa: E402
from rotary_kernels.reference import apply_rotary_transformers_reference, rotary_reference  # noqa: E402

from zoo import CountOps, namespace  # noqa: E402  (counts the kernel's ops, forward and backward)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def hub_repo(tmp_path_factory):
    """A kernel repository (build/ with every variant) built from this checkout, or the one
    ROTARY_KERNELS_HUB_TREE names, built from it beforehand (scripts/gpu_session.sh's hub step:
    under pytest-xdist every worker would otherwise build its own, nvcc included)."""
    prebuilt = os.environ.get("ROTARY_KERNELS_HUB_TREE")
    if prebuilt:
        assert (Path(prebuilt) / "build").is_dir(), f"ROTARY_KERNELS_HUB_TREE={prebuilt}: no build/ there"
        return Path(prebuilt)
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
    # Its demo runs the Hub kernel, not the pip install
    assert importlib.import_module(f"{hub_kernel.__name__}.demo").rk is hub_kernel


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


def _build_hub_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_hub
    finally:
        sys.path.pop(0)
    return build_hub


def test_build_hub_refuses_bad_arguments(tmp_path):
    script = str(ROOT / "scripts" / "build_hub.py")
    (tmp_path / "f").write_text("")
    for args, words in ((["--variants", "noarh"], "--variants: comma-separated names among arch, cpu, noarch"),
                        (["--variants", ""], "--variants"),
                        (["--cuda-archs", "9.0,8.0"], "--cuda-archs: ';'-separated capabilities"),
                        (["--out", str(tmp_path / "f")], "exists and is not a directory")):
        p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
        assert p.returncode == 2 and words in p.stderr, (args, p.stderr[-500:])


def test_build_hub_arch_metadata():
    """The arch variant declares what its binary holds (kernels refuses other GPUs with it): by
    default build.toml's capabilities with PTX of the newest, as setup.py compiles them."""
    build_hub = _build_hub_module()
    config = tomllib.loads((ROOT / "build.toml").read_text())
    caps = next(k["cuda-capabilities"] for k in config["kernel"].values() if k["backend"] == "cuda")
    assert build_hub.cuda_archs(config, None) == caps[:-1] + [caps[-1] + "+PTX"]
    assert build_hub.cuda_archs(config, "9.0;10.0+PTX") == ["9.0", "10.0+PTX"]
    from kernels.archs import _supports_cuda_capability  # (kernels' own check)

    assert _supports_cuda_capability(build_hub.cuda_archs(config, None), (13, 0))


def test_build_hub_removes_stale_variants(tmp_path):
    """A variant left by a build of other code would be loaded instead of what was just written
    (kernels prefers an arch variant to the pure-Python ones): build_hub removes it, and keeps
    the variants of the same code that this run did not rebuild."""
    build_hub = _build_hub_module()
    ident = "abc1234"
    ids = {"torch-cpu": f"_rotary_kernels_cpu_{ident}_noarch", "torch214-cxx11-cu130-x86_64-linux":
           "_rotary_kernels_cuda_0123456", "torch214-cxx11-cpu-x86_64-linux": f"_rotary_kernels_cpu_{ident}",
           "torch-cuda": f"_rotary_kernels_cuda_{ident}_dirty_1234567_noarch"}
    for variant, vid in ids.items():
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "metadata.json").write_text(json.dumps({"id": vid}))
    build_hub.remove_stale(tmp_path, [tmp_path / "torch-cpu"], ident)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch-cpu", "torch214-cxx11-cpu-x86_64-linux"]


# --- transformers models, kernelized -------------------------------------------------------


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

    # The layer probes each hub function's convention on its first call (once per function
    # class, with the kernel): done here, so that the count below is one forward's whatever ran
    # before in this process (alone, as under xdist, the probe's calls were counted too).
    for fn in hub_kernel.hub.hub_functions(model):
        hub_kernel.hub.classify(fn)
    counter = CountOps(namespace(hub_kernel))
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


# --- rotary_kernels.hub.kernelize: one call, model-aware, survives train()/eval()/use_kernels --


@pytest.fixture
def hub_restore():
    yield
    rk.hub.restore()


def _count(ns, fn):
    counter = CountOps(ns)
    with counter:
        out = fn()
    return out, counter.calls


def _logits(model, ids, train):
    if train:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach()
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_hub_kernelize_survives_mode_switches_and_use_kernels(hub_restore, tmp_path, monkeypatch):
    """kernelize(model) once; then use_kernels=True (set_use_kernels, what from_pretrained does),
    train(), eval(), train(): transformers re-registers its default mapping and re-kernelizes
    each time; the kernel keeps running and the results stay exact."""
    from kernels import Device, KernelizeFallback, Mode
    from kernels.layer.layer import kernelize_layer
    from kernels.layer.globals import _KERNEL_MAPPING
    from transformers.integrations import hub_kernels

    cls, cfg, _ = _tiny("llama")
    torch.manual_seed(0)
    ref = cls(cfg).float()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    want_train = _logits(ref.train(), ids, True)
    want_eval = _logits(ref.eval(), ids, False)

    model = cls(cfg).float()
    model.load_state_dict(ref.state_dict())
    assert rk.hub.kernelize(model) is model
    model.set_use_kernels(True)  # from_pretrained(..., use_kernels=True)
    ns = rk._ops.add_op_namespace_prefix("x").split("::")[0]
    for train in (True, False, True, False):
        model.train(train)  # re-registers transformers' defaults and re-kernelizes (cpu)
        got, calls = _count(ns, lambda: _logits(model, ids, train))
        assert calls >= cfg.num_hidden_layers * (2 if train else 1)
        assert torch.equal(got, want_train if train else want_eval)
    # The mapping transformers re-registers points to this package for every device and mode
    # (its own default is kernels-community/rotary, inference only, on cuda/xpu/rocm).
    import kernels.layer.repos

    monkeypatch.setattr(kernels.layer.repos, "_find_capability", lambda: 90)  # as on an H100
    tmap = hub_kernels.get_kernel_mapping_transformers()["rotary_pos_emb"]
    for device in ("cuda", "xpu", "rocm", "cpu"):
        for repo in tmap[device].values():
            assert isinstance(repo, rk.hub._PackageLayerRepository), (device, repo)
        repos = _KERNEL_MAPPING.get()["rotary_pos_emb"][device].repos
        assert repos and all(isinstance(r, rk.hub._PackageLayerRepository) for r in repos.values())
    # kernels.kernelize for a GPU device (as transformers does on one) selects this package's
    # layer in both modes; run on CPU tensors here, it is the same kernel.
    for mode, train in ((Mode.TRAINING, True), (Mode.INFERENCE, False)):
        fn = next(iter(rk.hub.hub_functions(model)))
        # (kernels.kernelize(model, device="cuda") does this for every hub layer of the model;
        # the model's other layers would look their transformers defaults up online.)
        kernelize_layer(fn, mode=mode, device_type=Device("cuda"), use_fallback=KernelizeFallback.NONE)
        assert fn.forward.__func__ is rk.layers.apply_rotary_transformers.forward
        got, calls = _count(ns, lambda: _logits(model.train(train), ids, train))
        assert calls > 0 and torch.equal(got, want_train if train else want_eval)

    # from_pretrained(..., use_kernels=True) of another model of the class, after kernelize.
    ref.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, use_kernels=True).float()
    got, calls = _count(ns, lambda: _logits(loaded.eval(), ids, False))
    assert calls == cfg.num_hidden_layers and torch.equal(got, want_eval)


def test_hub_restore_undoes_everything(hub_restore, tmp_path):
    """restore() after kernelize, use_kernels=True and train()/eval(): the forwards kernels bound
    to the shared function objects go too (they kept running the kernel, in this model and in
    every model of the class built later), and a "rotary_pos_emb" entry the user had in kernels'
    mapping is put back (it was removed)."""
    import kernels
    from kernels.layer.globals import _KERNEL_MAPPING

    user = kernels.LocalLayerRepository(tmp_path, layer_name="user_rope")
    kernels.register_kernel_mapping({"rotary_pos_emb": {"cpu": user}})
    before = _KERNEL_MAPPING.get()["rotary_pos_emb"]["cpu"].repos
    cls, cfg, _ = _tiny("llama")
    model = cls(cfg).float()
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    rk.hub.kernelize(model)
    model.set_use_kernels(True)
    model.train()
    model.eval()  # (re-kernelizes: kernels binds this package's layer to the function objects)
    ns = rk._ops.add_op_namespace_prefix("x").split("::")[0]
    assert _count(ns, lambda: _logits(model, ids, False))[1] > 0
    rk.hub.restore()
    for m in (model, cls(cfg).float()):
        assert _count(ns, lambda: _logits(m, ids, False))[1] == 0
        assert all("forward" not in fn.__dict__ for fn in rk.hub.hub_functions(m))
    assert _KERNEL_MAPPING.get()["rotary_pos_emb"]["cpu"].repos == before
    _KERNEL_MAPPING.get().pop("rotary_pos_emb")


def test_hub_kernelize_refuses_unknown_math(hub_restore):
    """A hub-routed function with math no convention of the package reproduces is refused, by
    name, and nothing is changed."""
    from kernels import use_kernel_forward_from_hub, use_kernelized_func

    @use_kernel_forward_from_hub("rotary_pos_emb")
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # a scaled rotation
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return 2 * q * cos, 2 * k * cos

    @use_kernelized_func(apply_rotary_pos_emb)
    class Attn(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return apply_rotary_pos_emb(q, k, cos, sin)

    model = torch.nn.Sequential(Attn())
    with pytest.raises(rk.hub.UnsupportedRotary, match="apply_rotary_pos_emb.*matches none"):
        rk.hub.kernelize(model)
    assert "forward" not in type(apply_rotary_pos_emb).__dict__ or not hasattr(
        type(apply_rotary_pos_emb), rk.hub._ORIGINAL)
    with pytest.warns(UserWarning, match="apply_rotary_pos_emb.*matches none.*keeps its own code"):
        assert rk.hub.kernelize(model, strict=False) is model  # serves nothing, changes nothing
    (served, why), = rk.hub.describe(model).values()
    assert not served and "matches none" in why
    with pytest.raises(rk.hub.UnsupportedRotary, match="never calls a kernel"):
        rk.hub.kernelize(torch.nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="changed nothing: Linear: no RoPE function"):
        rk.hub.kernelize(torch.nn.Linear(2, 2), strict=False)


def test_hub_kernel_kernelize_from_the_built_tree(hub_kernel, hub_restore):
    """The Hub-loaded package's own hub.kernelize (training and inference, ops of its namespace)."""
    cls, cfg, _ = _tiny("llama")
    torch.manual_seed(0)
    ref = cls(cfg).float()
    model = cls(cfg).float()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _logits(ref.train(), ids, True), {n: p.grad.clone() for n, p in ref.named_parameters()}
    try:
        hub_kernel.hub.kernelize(model)
        ns = namespace(hub_kernel)
        got, calls = _count(ns, lambda: _logits(model.train(), ids, True))
        assert calls >= 2 * cfg.num_hidden_layers and torch.equal(got, want[0])
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, want[1][n]), n
    finally:
        hub_kernel.hub.restore()


def test_hub_kernelize_torch_compile_one_graph(hub_restore):
    """torch.compile(fullgraph=True) of a kernelized model: one forward and one backward graph,
    the kernel's op in both (forward and backward of every layer), results exact."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    cls, cfg, _ = _tiny("llama")
    torch.manual_seed(0)
    ref = cls(cfg).float()
    model = cls(cfg).float()
    model.load_state_dict(ref.state_dict())
    rk.hub.kernelize(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    ns = rk._ops.add_op_namespace_prefix("x").split("::")[0]
    assert len(graphs) == 2  # forward, backward
    for g in graphs:
        assert sum(ns in str(n.target) for n in g.graph.nodes) == cfg.num_hidden_layers
    assert torch.equal(out.logits, want.logits)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", ["gpt_oss", "nanochat"])
def test_hub_layers_are_model_aware(hub_repo, hub_kernel, restore_rotary, model_type):
    """kernels.kernelize with the Hub tree's mapping (no rotary_kernels.hub.kernelize): the layer
    bound to gpt_oss's / nanochat's function runs their math (per-pair tables; -theta), exactly."""
    import zoo
    from kernels import Mode, kernelize, use_kernel_mapping

    model, ref, cfg = zoo.build(model_type)
    want = zoo.run(ref, cfg, "TRAINING")
    fn = next(iter(hub_kernel.hub.hub_functions(model)))
    restore_rotary.append(fn)
    try:
        with use_kernel_mapping(rk.hub.kernel_mapping(repo_path=hub_repo), inherit_mapping=False):
            kernelize(model, mode=Mode.TRAINING, device="cpu")
        assert fn.forward.__func__ is hub_kernel.layers.apply_rotary_transformers.forward
        counter = CountOps(namespace(hub_kernel))
        with counter:
            got = zoo.run(model, cfg, "TRAINING")
        assert counter.calls >= 2 * cfg.num_hidden_layers
        assert torch.equal(got[0], want[0])
        for n in want[1]:
            assert torch.equal(got[1][n], want[1][n]), n
    finally:
        type(fn).__dict__.get(hub_kernel.hub._PLAN) and delattr(type(fn), hub_kernel.hub._PLAN)
