"""The transformers model zoo for the hub integration (tests/test_zoo.py, and the table
``benchmarks/results/zoo.md``: ``python tests/zoo.py``).

Model types are discovered from the installed transformers: every modeling file with a function
decorated ``@use_kernel_forward_from_hub("rotary_pos_emb")``, and every config model type defined
in that model package. Each gets a tiny random config (its defaults, shrunk: 2 layers, hidden 64,
4 heads of 16, GQA with 2 KV heads where the config has KV heads, its own partial rotary factor
kept, dropouts 0), a model (CausalLM head when there is one, else the base model), and is
compared with its own code in fp32:

* TRAINING: logits and every parameter gradient of one backward pass;
* INFERENCE: logits under ``inference_mode`` (out of place, and with ``inplace_inference=True``);

with this package's ops counted (a pass where the kernel never ran fails).
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import torch

HUB_DECORATOR = 'use_kernel_forward_from_hub("rotary_pos_emb")'


def modeling_files():
    """{model package name: [modeling file paths]} with a hub-decorated RoPE function."""
    import transformers

    out = {}
    for f in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        if HUB_DECORATOR in f.read_text():
            out.setdefault(f.parent.name, []).append(f)
    return out


def undecorated_packages():
    """Model packages that define their own ``apply_rotary_pos_emb`` but do not decorate it with
    the hub hook: transformers never routes their RoPE to a kernel."""
    import transformers

    out = set()
    for f in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        src = f.read_text()
        if re.search(r"^def apply_rotary_pos_emb\(", src, re.M) and HUB_DECORATOR not in src:
            out.add(f.parent.name)
    return sorted(out)


def _decorated_fn_names(src: str):
    return re.findall(r'@use_kernel_forward_from_hub\("rotary_pos_emb"\)\n(?:[@#].*\n)*def (\w+)', src)


def discover():
    """[(model_type, package, status)] for every config model type of every package with a
    hub-decorated RoPE function; status "attached" or "not attached" (the function is decorated
    but no class uses @use_kernelized_func with it: transformers never routes it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    rows = []
    for pkg, files in modeling_files().items():
        src = "\n".join(f.read_text() for f in files)
        attached = any(re.search(r"@use_kernelized_func\(\[?[^)]*\b" + n + r"\b", src) for n in _decorated_fn_names(src))
        types = [t for t in CONFIG_MAPPING_NAMES if _config_package(t) == pkg and _has_model_class(t)]
        for t in types or [pkg]:
            rows.append((t, pkg, "attached" if attached else "not attached"))
    return rows


def _has_model_class(model_type):
    """A type with a model class in the auto mappings (not a sub-config such as *_vision)."""
    from transformers.models.auto import modeling_auto as ma

    return model_type in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in ma.MODEL_MAPPING_NAMES


def _config_package(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cls = CONFIG_MAPPING[model_type]
    except Exception:  # noqa: BLE001
        return None
    return cls.__module__.split(".")[2] if cls.__module__.startswith("transformers.models.") else None


NUMS = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            max_position_embeddings=64, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, num_nextn_predict_layers=0,
            sliding_window=32, layer_types=None, global_head_dim=16, hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=96, laurel_rank=8, altup_num_inputs=2, num_kv_shared_layers=0,
            encoder_hidden_size=64, d_model=64, ffn_dim=96, encoder_ffn_dim=96, decoder_ffn_dim=96,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            topk_group=1, n_group=1, intermediate_size_mlp=96, num_dense_layers=1)


def tiny_config(model_type):
    """A tiny random config of this type (its defaults, shrunk), or raises."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    _shrink(cfg)
    return cfg


def _shrink(cfg, depth=0):
    for name, val in list(vars(cfg).items()):
        if hasattr(val, "to_dict") and hasattr(val, "model_type") and depth < 2:  # sub-configs
            _shrink(val, depth + 1)
    for name, val in NUMS.items():
        if name in vars(cfg):
            if name == "num_key_value_heads" and getattr(cfg, name, None) is None:
                continue
            if name == "layer_types":
                continue
            setattr(cfg, name, val)
    if "layer_types" in vars(cfg) and isinstance(cfg.layer_types, list):
        lt = cfg.layer_types
        cfg.layer_types = (lt * 2)[: cfg.num_hidden_layers] if lt else lt
        if len(set(lt)) > 1:  # keep one of each kind, in order
            kinds = list(dict.fromkeys(lt))
            cfg.num_hidden_layers = len(kinds)
            cfg.layer_types = kinds
    for name in list(vars(cfg)):
        if "dropout" in name and isinstance(getattr(cfg, name), float):
            setattr(cfg, name, 0.0)
    rp = vars(cfg).get("rope_parameters")
    if isinstance(rp, dict) and rp.get("mrope_section"):  # t + h + w = head_dim / 2 pairs
        rp["mrope_section"] = [2, 3, 3][: len(rp["mrope_section"])] if len(rp["mrope_section"]) == 3 else \
            [8 // len(rp["mrope_section"])] * len(rp["mrope_section"])
    if vars(cfg).get("position_embedding_type") == "absolute":  # (ESM) the rotary variant
        cfg.position_embedding_type = "rotary"
    if "pad_token_id" in vars(cfg) and cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v >= NUMS["vocab_size"]:
            setattr(cfg, name, 0)
        if isinstance(v, list):
            setattr(cfg, name, [0])
    if hasattr(cfg, "tie_word_embeddings"):
        pass
    return cfg


def model_class(cfg):
    from transformers.models.auto import modeling_auto as ma

    for names in (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_MAPPING_NAMES):
        cname = names.get(cfg.model_type)
        if cname:
            if isinstance(cname, (list, tuple)):
                cname = cname[0]
            mod = importlib.import_module(f"transformers.models.{_config_package(cfg.model_type)}")
            return getattr(mod, cname)
    raise LookupError(f"no model class for {cfg.model_type}")


def build(model_type, seed=0):
    """(model, ref_model, config) with identical weights, fp32, attention 'eager'."""
    cfg = tiny_config(model_type)
    cls = model_class(cfg)
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    ref = cls(cfg).float()
    model = cls(cfg).float()
    model.load_state_dict(ref.state_dict())
    return model, ref, cfg


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    vocab = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", 96)
    ids = torch.randint(3, min(vocab, 96), (2, 8), generator=g)
    kw = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False):
        kw["decoder_input_ids"] = ids
    return kw


def _out(o):
    for name in ("logits", "last_hidden_state"):
        t = getattr(o, name, None)
        if t is not None:
            return t
    return o[0]


def run(model, cfg, mode):
    """TRAINING: (output, {param: grad}); INFERENCE: (output, None)."""
    kw = _inputs(cfg)
    if mode == "TRAINING":
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = _out(model(**kw)).float()
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    torch.manual_seed(3)
    with torch.inference_mode():
        return _out(model(**kw)).float(), None


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts calls of ops in one namespace (forward and backward)."""

    def __init__(self, namespace):
        super().__init__()
        self.namespace, self.calls = namespace, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == self.namespace:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def namespace(pkg):
    return pkg._ops.add_op_namespace_prefix("x").split("::")[0]


def check(model_type, pkg=None):
    """Run one model type; returns (verdict, detail). verdict: "exact" (served; logits and every
    gradient bit-identical in TRAINING, logits in INFERENCE and in place; the kernel ran),
    "refused" (kernelize raised UnsupportedRotary), "not routed", "no tiny model", or "MISMATCH"."""
    import rotary_kernels

    pkg = pkg or rotary_kernels
    try:
        model, ref, cfg = build(model_type)
    except Exception as e:  # noqa: BLE001
        return _probe_only(model_type, pkg, f"no tiny model ({_err(e)})")
    fns = pkg.hub.hub_functions(model)
    if not fns:
        return "not routed", "no hub RoPE function attached to the model's modules"
    own_calls = [0]
    for fn in fns:  # count the model's own calls of its hub function (instance forward, removed after)
        def counted(*a, _orig=type(fn).forward, _fn=fn, **kw):
            own_calls[0] += 1
            return _orig(_fn, *a, **kw)
        fn.forward = counted
    try:
        ref_train = run(ref, cfg, "TRAINING")
        ref_infer = run(ref, cfg, "INFERENCE")
    except Exception as e:  # noqa: BLE001
        return _probe_only(model_type, pkg, f"tiny model not run with input_ids ({_err(e)})")
    finally:
        for fn in fns:
            fn.__dict__.pop("forward", None)
    if own_calls[0] == 0:
        return "not routed", "attached, but the model's code never calls it"
    try:
        pkg.hub.kernelize(model)
    except pkg.hub.UnsupportedRotary as e:
        return "refused", str(e).split(": ", 1)[1][:300]
    try:
        ns, problems, calls = namespace(pkg), [], {}
        for mode, want in (("TRAINING", ref_train), ("INFERENCE", ref_infer)):
            counter = CountOps(ns)
            with counter:
                got = run(model, cfg, mode)
            calls[mode] = counter.calls
            problems += _compare(mode, got, want)
        pkg.hub.kernelize(model, inplace_inference=True)
        counter = CountOps(ns)
        with counter:
            got = run(model, cfg, "INFERENCE")
        calls["INFERENCE in place"] = counter.calls
        problems += _compare("INFERENCE in place", got, ref_infer)
        for mode, n in calls.items():
            if n == 0:
                problems.append(f"{mode}: the kernel never ran")
        convs = "; ".join(sorted({p.describe() for p in map(pkg.hub.classify, fns)}))
        if problems:
            return "MISMATCH", "; ".join(problems)[:300]
        return "exact", f"{convs} (kernel ops: {calls['TRAINING']} train, {calls['INFERENCE']} infer)"
    finally:
        pkg.hub.restore()


def _err(e):
    msg = str(e).splitlines()[0][:100] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def _probe_only(model_type, pkg, why):
    """The model cannot be run here: probe its package's hub function(s) directly (convention
    classified, and the kernel checked against the function on the probe inputs)."""
    mod_pkg = _config_package(model_type)
    plans = []
    for f in modeling_files().get(mod_pkg, []):
        mod = importlib.import_module(f"transformers.models.{mod_pkg}.{f.stem}")
        for name in _decorated_fn_names(f.read_text()):
            plans.append(pkg.hub.classify(getattr(mod, name)))
    if not plans:
        return "no tiny model", why
    verdict = "probed" if all(p.served for p in plans) else "refused"
    return verdict, f"{'; '.join(sorted({p.describe() for p in plans}))}; {why}"


def _compare(mode, got, want):
    problems = []
    if not torch.equal(got[0], want[0]):
        problems.append(f"{mode}: output max diff {(got[0] - want[0]).abs().max().item():.3g}")
    if want[1] is not None:
        if got[1].keys() != want[1].keys():
            problems.append(f"{mode}: different gradient sets")
        for n in want[1]:
            if n in got[1] and not torch.equal(got[1][n], want[1][n]):
                problems.append(f"{mode}: grad {n} max diff {(got[1][n] - want[1][n]).abs().max().item():.3g}")
                break
    return problems


def table(rows):
    lines = ["| model type | package | verdict | detail |", "|---|---|---|---|"]
    for t, pkg, verdict, detail in rows:
        lines.append(f"| {t} | {pkg} | {verdict} | {detail.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import os
    import warnings

    os.environ.setdefault("TRITON_INTERPRET", "1")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    write = "--write" in sys.argv
    only = [a for a in sys.argv[1:] if a != "--write"]
    rows = []
    for t, pkg, status in discover():
        if only and t not in only and pkg not in only:
            continue
        if status == "not attached":
            verdict, detail = "not routed", "decorated but not attached with @use_kernelized_func"
        else:
            verdict, detail = check(t)
        rows.append((t, pkg, verdict, detail))
        print(f"{t:32s} {verdict:14s} {detail[:150]}", flush=True)
    print(table(rows))
    if write:
        import collections
        import platform

        import kernels
        import transformers

        counts = collections.Counter(v for _, _, v, _ in rows)
        pkgs = collections.defaultdict(set)
        for t, p, v, _ in rows:
            pkgs[v].add(p)
        head = [
            "# transformers model zoo through `rotary_kernels.hub.kernelize`",
            "",
            f"Generated by `python tests/zoo.py --write` (transformers {transformers.__version__}, kernels "
            f"{kernels.__version__}, torch {torch.__version__}, {platform.machine()} CPU, fp32). Model types are "
            "discovered from the installed transformers: every config model type with a model class, in every model "
            "package whose modeling file decorates a function with `@use_kernel_forward_from_hub(\"rotary_pos_emb\")`.",
            "",
            "Verdicts:",
            "",
            "* **exact**: kernelized with one `rotary_kernels.hub.kernelize(model)`; a tiny random model (2 layers, "
            "hidden 64, 4 heads of 16, 2 KV heads where the config has them) gives logits and every parameter "
            "gradient (TRAINING) and logits (INFERENCE, out of place and in place) bit-identical to the model's own "
            "code, and this package's ops ran in every pass (op counts in the detail).",
            "* **probed**: the model cannot run from `input_ids` alone here (vision/audio inputs, or the tiny "
            "config is not valid for it); its hub function was classified and the kernel checked against it on "
            "random inputs (float64), as `kernelize` does before serving any model.",
            "* **not routed**: transformers never calls a kernel for it: the function is decorated but not attached "
            "to any attention class with `@use_kernelized_func`, or it is attached but the model's code never calls it, or the model's own modules use another RoPE (vision towers).",
            "* **refused**: `kernelize` raises `UnsupportedRotary` naming the function (math this package does not "
            "implement).",
            "",
            "Summary: " + ", ".join(f"{v}: {n} types ({len(pkgs[v])} packages)" for v, n in counts.most_common()) + ".",
            "",
        ]
        undecorated = undecorated_packages()
        tail = [
            "",
            f"## Not decorated ({len(undecorated)} model packages)",
            "",
            "These define their own `apply_rotary_pos_emb` without `@use_kernel_forward_from_hub(\"rotary_pos_emb\")`: "
            "transformers never routes their RoPE, so `kernelize` raises `UnsupportedRotary` (\"never calls a kernel\") "
            "for them; call `rotary_kernels.apply_rotary_transformers` from the model code instead.",
            "",
            ", ".join(undecorated),
            "",
        ]
        out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo.md"
        out.write_text("\n".join(head) + "\n" + table(rows) + "\n" + "\n".join(tail))
        print("wrote", out)
