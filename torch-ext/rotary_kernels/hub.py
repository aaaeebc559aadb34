"""Hugging Face integration: ``kernelize(model)`` (one call, model-aware) and the mode-keyed
mapping for ``kernels.use_kernel_mapping`` / transformers.

``kernelize(model)`` makes every RoPE function transformers routes through the hub hook
(``@use_kernel_forward_from_hub("rotary_pos_emb")``, attached to attention classes with
``@use_kernelized_func``) run this package's kernel, for training and inference, on every
device, after ``train()``/``eval()`` switches and ``from_pretrained(..., use_kernels=True)``:

* **Model-aware.** transformers reuses the hub name ``"rotary_pos_emb"`` for different math
  (gpt_oss: one cos/sin entry per rotary pair; openai_privacy_filter: the same, interleaved
  pairs; nanochat: the opposite rotation). Each function is *probed* numerically (float64,
  random q/k and random, unstructured cos/sin tables of width ``D`` and ``D/2``) against the
  conventions this package implements (half-split / interleaved, per-element / per-pair
  tables, rotation by +theta / -theta); the matching one is then checked against the kernel
  itself on the same inputs. A function that matches none is **refused** with a message naming
  it (``UnsupportedRotary``); a table width that was not probed runs the model's own function.
* **Where it patches.** The function object transformers shares between all models of a
  class gets its *class* ``forward`` replaced (kernels' fallbacks restore the class forward, so
  they restore ours), and the ``"rotary_pos_emb"`` entry of kernels' mapping and of
  transformers' default mapping (re-registered by ``use_kernels=True`` and by every
  ``train()``/``eval()``) points, for every device and mode, to this package's layers, which
  dispatch on the same probed convention.
* **Mode-free.** The installed forward records autograd when gradients are needed, so one call
  serves training and inference; ``inplace_inference=True`` rotates q/k in place when no
  gradient is needed.

``kernel_mapping()`` returns ``{"rotary_pos_emb": {device: {Mode: repository}}}`` for cuda,
rocm, xpu and cpu (for loading the layers from the Hub or a local tree with ``kernels``);
its layers (``layers.py``) are model-aware in the same way.

No import of transformers or kernels at import time (the pure-Python Hub variants ship this
file).
"""

from __future__ import annotations

import copy
import gc
import threading
import warnings
from pathlib import Path

import torch

from . import _api

LAYER_NAME = "rotary_pos_emb"
DEVICES = ("cuda", "rocm", "xpu", "cpu")
_PLAN = "_rotary_kernels_plan"          # class attribute of a hub function's kernels ``Func`` class
_ORIGINAL = "_rotary_kernels_original_forward"
_LOCK = threading.Lock()


class UnsupportedRotary(ValueError):
    """A hub-routed RoPE function whose math this package does not implement."""


# --------------------------------------------------------------------------------------------
# Conventions and the numerical probe
# --------------------------------------------------------------------------------------------

# (name, options for the package's functions); per table width: "full" (cos last dim = head dim
# D) or "half" (D/2). Options other than ``interleaved`` are the pair-table / conjugate keywords.
_CANDIDATES = {
    "full": [
        ("half-split", {}),
        ("interleaved", {"interleaved": True}),
        ("half-split, -theta", {"conj": True}),
        ("interleaved, -theta", {"interleaved": True, "conj": True}),
    ],
    "half": [
        ("half-split, per-pair tables", {"pair_tables": True}),
        ("interleaved, per-pair tables", {"pair_tables": True, "interleaved": True}),
        ("half-split, per-pair tables, -theta", {"pair_tables": True, "conj": True}),
        ("interleaved, per-pair tables, -theta", {"pair_tables": True, "interleaved": True, "conj": True}),
        ("partial rotary (first D/2), half-split", {}),
        ("partial rotary (first D/2), interleaved", {"interleaved": True}),
    ],
}


def _convention_math(x, cos, sin, unsqueeze_dim, interleaved=False, pair_tables=False, conj=False):
    """The definition of each convention, independent of the kernels (float64 probe inputs)."""
    c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if conj:
        s = -s
    if pair_tables:  # one entry per pair -> laid out like x's rotary dims
        c, s = ((t.repeat_interleave(2, -1) if interleaved else torch.cat((t, t), -1)) for t in (c, s))
    r = c.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        h = r // 2
        rot = torch.cat((-xr[..., h:], xr[..., :h]), -1)
    return torch.cat((xr * c + rot * s, xp), -1)


def _probe_inputs(width: str):
    g = torch.Generator().manual_seed(1234)
    B, S, Hq, Hk, D = 2, 3, 4, 2, 16
    w = D if width == "full" else D // 2
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, S, D, generator=g, dtype=torch.float64)
    # Unstructured tables (not cat(f, f)): a function that matches here matches on any table.
    cos = torch.randn(B, S, w, generator=g, dtype=torch.float64)
    sin = torch.randn(B, S, w, generator=g, dtype=torch.float64)
    return q, k, cos, sin


def _close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-5)


class Plan:
    """What runs for one hub function: per table width, the package options (or None)."""

    def __init__(self, name: str, original, options: dict, conventions: dict, notes: list[str]):
        self.name, self.original = name, original
        self.options, self.conventions, self.notes = options, conventions, notes

    @property
    def served(self) -> bool:
        return bool(self.options)

    def describe(self) -> str:
        if self.served:
            return "; ".join(f"cos width {'D' if w == 'full' else 'D/2'}: {c}" for w, c in self.conventions.items())
        return "; ".join(self.notes) or "no convention matched"

    def __repr__(self):
        return f"Plan({self.name}: {self.describe()})"


def _function_name(fn_obj) -> str:
    orig = getattr(type(fn_obj), _ORIGINAL, None) or type(fn_obj).forward
    func = _wrapped_function(orig)
    if func is not None:
        return f"{func.__module__}.{func.__qualname__}"
    return type(fn_obj).__qualname__


def _wrapped_function(forward):
    """The user function inside kernels' ``Func.forward`` closure (for names in messages)."""
    for cell in getattr(forward, "__closure__", None) or ():
        val = cell.cell_contents
        if callable(val) and hasattr(val, "__code__"):
            return val
    return None


def classify(fn_obj) -> Plan:
    """Probe a hub function object (the ``nn.Module`` kernels makes of a decorated function)
    and return its ``Plan``. Cached on the function's class."""
    cls = type(fn_obj)
    plan = cls.__dict__.get(_PLAN)
    if plan is not None:
        return plan
    with _LOCK:
        plan = cls.__dict__.get(_PLAN)
        if plan is None:
            plan = _classify(fn_obj)
            setattr(cls, _PLAN, plan)
    return plan


@torch.compiler.disable
def _classify(fn_obj) -> Plan:
    import inspect

    cls = type(fn_obj)
    original = cls.__dict__.get(_ORIGINAL) or cls.forward
    name = _function_name(fn_obj)
    params = [p for p in inspect.signature(original).parameters][1:]
    notes: list[str] = []
    if params[:4] != ["q", "k", "cos", "sin"] or params[4:] not in ([], ["unsqueeze_dim"]):
        notes.append(f"signature ({', '.join(params)}) is not apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)")
        return Plan(name, original, {}, {}, notes)
    options, conventions = {}, {}
    with torch.no_grad():
        for width, candidates in _CANDIDATES.items():
            q, k, cos, sin = _probe_inputs(width)
            try:
                want = original(fn_obj, q, k, cos, sin, 1)
            except Exception:  # noqa: BLE001 - this width is not what the function takes
                continue
            if not (isinstance(want, (tuple, list)) and len(want) == 2):
                notes.append(f"cos width {width}: returns {type(want).__name__}, not (q_embed, k_embed)")
                continue
            match = None
            for conv, opts in candidates:
                if all(_close(w, _convention_math(x, cos, sin, 1, **opts)) for w, x in zip(want, (q, k))):
                    match = (conv, opts)
                    break
            if match is None:
                notes.append(f"cos width {'D' if width == 'full' else 'D/2'}: math matches none of "
                             "this package's conventions")
                continue
            conv, opts = match
            try:  # the kernel itself must reproduce it (and accept the options)
                ok = _kernel_matches(fn_obj, original, q, k, cos, sin, opts, want)
                if not ok and opts.get("conj") and not opts.get("pair_tables"):
                    # The kernels' -theta rotation is the transpose of the +theta one: equal to
                    # x cos - rotate(x) sin on tables laid out as transformers' rotary embeddings
                    # make them (each angle twice: cat(f, f) / repeat_interleave), not on arbitrary tables.
                    half = cos[..., : cos.shape[-1] // 2]
                    hs = sin[..., : sin.shape[-1] // 2]
                    lay = ((lambda t: t.repeat_interleave(2, -1)) if opts.get("interleaved")
                           else (lambda t: torch.cat((t, t), -1)))
                    c2, s2 = lay(half), lay(hs)
                    ok = _kernel_matches(fn_obj, original, q, k, c2, s2, opts, None)
                    if ok:
                        conv += " (tables with each angle twice, as transformers' rotary embeddings make them)"
            except TypeError as e:  # a build without pair_tables/conj
                notes.append(f"cos width {'D' if width == 'full' else 'D/2'}: {conv} is not supported by this "
                             f"build ({e})")
                continue
            if not ok:
                notes.append(f"cos width {'D' if width == 'full' else 'D/2'}: {conv}: the kernel's result differs "
                             "from the model's")
                continue
            options[width], conventions[width] = opts, conv
    if not options and not notes:
        notes.append("the function fails on every probed input")
    return Plan(name, original, options, conventions, notes)


def _kernel_matches(fn_obj, original, q, k, cos, sin, opts, want) -> bool:
    if want is None:
        want = original(fn_obj, q, k, cos, sin, 1)
    got = _api.apply_rotary_transformers(q, k, cos, sin, 1, **opts)
    return all(_close(g_, w) for g_, w in zip(got, want))


# --------------------------------------------------------------------------------------------
# The forward that runs (class patch and layers.py both call rope())
# --------------------------------------------------------------------------------------------

_warned: set = set()


def rope(fn_obj, q, k, cos, sin, unsqueeze_dim=1, inplace=False):
    """Rotate like the hub function ``fn_obj`` (kernels' ``Func`` object the forward is bound
    to) with this package's kernel. For any other ``fn_obj`` (a plain layer instance): the
    default convention (transformers' ``apply_rotary_pos_emb``)."""
    opts = {}
    if hasattr(type(fn_obj), "kernel_layer_name"):  # a hub function object (not a plain layer)
        plan = getattr(type(fn_obj), _PLAN, None)
        if plan is None:
            plan = classify(fn_obj)
        d, w = q.shape[-1], cos.shape[-1]
        key = "full" if w == d else ("half" if 2 * w == d else None)
        opts = plan.options.get(key)
        if opts is None:  # not a convention this package serves: the model's own code
            if plan.name not in _warned:
                _warned.add(plan.name)
                warnings.warn(f"rotary_kernels: {plan.name} ({plan.describe()}) runs its own code for cos width "
                              f"{w} of head dim {d}", stacklevel=2)
            return plan.original(fn_obj, q, k, cos, sin, unsqueeze_dim)
    if k is None:
        if inplace and not (torch.is_grad_enabled() and q.requires_grad):
            return _api.apply_rotary_emb_(q, cos, sin, unsqueeze_dim, **opts), None
        return _api.apply_rotary_emb(q, cos, sin, unsqueeze_dim, **opts), None
    if inplace and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return _api.apply_rotary_transformers_(q, k, cos, sin, unsqueeze_dim, **opts)
    return _api.apply_rotary_transformers(q, k, cos, sin, unsqueeze_dim, **opts)


def _forward_out_of_place(self, q, k, cos, sin, unsqueeze_dim=1):
    return rope(self, q, k, cos, sin, unsqueeze_dim, False)


def _forward_inplace(self, q, k, cos, sin, unsqueeze_dim=1):
    return rope(self, q, k, cos, sin, unsqueeze_dim, True)


# --------------------------------------------------------------------------------------------
# kernelize(model)
# --------------------------------------------------------------------------------------------


def hub_functions(model) -> dict:
    """The hub-routed RoPE function objects attached to ``model``'s modules (by
    ``@use_kernelized_func``), each once: ``{function object: [module names]}``."""
    found: dict = {}
    for mname, module in model.named_modules():
        for fn in getattr(module, "_kernel_funcs", {}).values():
            if getattr(type(fn), "kernel_layer_name", None) == LAYER_NAME:
                found.setdefault(fn, []).append(mname)
    return found


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def kernelize(model, *, inplace_inference: bool = False, strict: bool = True):
    """Make ``model`` (any transformers model) use this package's RoPE kernel for training and
    inference, on every device. Returns ``model``.

    Every RoPE function transformers routes through the hub hook and attaches to the model's
    attention modules is probed (see the module docstring) and served with the matching
    convention. ``strict=True`` (default): a function whose math this package does not
    implement raises ``UnsupportedRotary`` naming the model type and the function, before
    anything is changed; ``strict=False`` leaves such functions on their own code (see
    ``describe(model)``). A model with no hub-routed RoPE function raises ``UnsupportedRotary``
    with ``strict=True`` (transformers never routes its RoPE: nothing to replace).

    The change is process-wide, like ``kernels.kernelize``: transformers shares one function
    object between all models of a class, and the ``"rotary_pos_emb"`` entries of kernels'
    and transformers' mappings point to this package afterwards. ``restore()`` undoes it.
    ``inplace_inference=True`` rotates q/k in place when no gradient is needed.
    """
    fns = hub_functions(model)
    mtype = _model_type(model)
    if not fns:
        why = (f"{mtype}: no RoPE function routed through transformers' hub hook "
               "(@use_kernel_forward_from_hub('rotary_pos_emb') + @use_kernelized_func): transformers "
               "never calls a kernel for this model's RoPE")
        if strict:
            raise UnsupportedRotary(why)
        warnings.warn(f"rotary_kernels.hub.kernelize changed nothing: {why}", stacklevel=2)
        return model
    plans = {fn: classify(fn) for fn in fns}
    refused = [p for p in plans.values() if not p.served]
    if refused:
        what = f"{mtype}: rotary_kernels does not implement the math of " + "; ".join(
            f"{p.name} ({p.describe()})" for p in refused)
        if strict:
            raise UnsupportedRotary(what + ". Nothing was changed; kernelize(..., strict=False) serves the other "
                                    "functions.")
        warnings.warn(what + ": it keeps its own code", stacklevel=2)
    forward = _forward_inplace if inplace_inference else _forward_out_of_place
    for fn, plan in plans.items():
        if not plan.served:
            continue
        cls = type(fn)
        if _ORIGINAL not in cls.__dict__:
            setattr(cls, _ORIGINAL, cls.forward)
            _PATCHED.append(cls)
        cls.forward = forward
        fn.__dict__.pop("forward", None)  # an instance forward set by an earlier kernels.kernelize
    register(inplace_inference=inplace_inference)
    return model


def describe(model) -> dict:
    """``{function name: (served, description)}`` for the model's hub-routed RoPE functions."""
    return {p.name: (p.served, p.describe()) for p in (classify(fn) for fn in hub_functions(model))}


class _PackageLayerRepository:
    """A kernels repository for this (already imported) package's layers: no download, no path."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name

    def load(self):
        from . import layers

        return getattr(layers, self.layer_name)

    def __eq__(self, other):
        return isinstance(other, _PackageLayerRepository) and (other.layer_name, other._pkg()) == (
            self.layer_name, self._pkg())

    def __hash__(self):
        return hash((self.layer_name, self._pkg()))

    def _pkg(self):
        return __name__

    def __str__(self):
        return f"{__name__.rsplit('.', 1)[0]}.layers.{self.layer_name} (in process)"


_REGISTERED: dict = {}
_PATCHED: list = []


def _mapping_entry(train_repo, infer_repo, devices=DEVICES) -> dict:
    from kernels import Mode

    per_mode = {
        Mode.TRAINING: train_repo,
        Mode.TRAINING | Mode.TORCH_COMPILE: train_repo,
        Mode.INFERENCE: infer_repo,
        Mode.INFERENCE | Mode.TORCH_COMPILE: infer_repo,
    }
    return {device: dict(per_mode) for device in devices}


def register(*, inplace_inference: bool = False) -> None:
    """Point ``"rotary_pos_emb"`` to this package for every device and mode, in kernels' global
    mapping and in transformers' default mapping (so ``use_kernels=True`` and ``train()`` /
    ``eval()``, which re-register transformers' defaults, keep it). Called by ``kernelize``."""
    import kernels

    train = _PackageLayerRepository("apply_rotary_transformers")
    infer = _PackageLayerRepository("apply_rotary_transformers_inplace") if inplace_inference else train
    entry = _mapping_entry(train, infer)
    if "prev_kernels" not in _REGISTERED:  # (kernels merges into its entry in place: a copy, for restore)
        import kernels.layer.globals as kg

        _REGISTERED["prev_kernels"] = copy.deepcopy(kg._KERNEL_MAPPING.get().get(LAYER_NAME))
    kernels.register_kernel_mapping({LAYER_NAME: entry})
    try:
        from transformers.integrations import hub_kernels
    except ImportError:
        return
    get = getattr(hub_kernels, "get_kernel_mapping_transformers", None)
    if get is not None:
        tmap = get()
        if "prev" not in _REGISTERED:
            _REGISTERED["prev"] = tmap.get(LAYER_NAME)
        tmap[LAYER_NAME] = entry


def restore() -> None:
    """Undo ``kernelize``/``register`` for every function patched in this process: the classes'
    forwards, the forwards kernels bound to function objects through this package's mapping
    (``use_kernels=True`` re-kernelizes on ``train()``/``eval()``), and kernels' and transformers'
    ``"rotary_pos_emb"`` entries as they were before."""
    while _PATCHED:
        cls = _PATCHED.pop()
        cls.forward = cls.__dict__[_ORIGINAL]
        delattr(cls, _ORIGINAL)
    from . import layers

    ours = {layers.apply_rotary_transformers.forward, layers.apply_rotary_transformers_inplace.forward}
    for obj in gc.get_objects():  # (hub function objects are shared by every model of a class)
        if getattr(type(obj), "kernel_layer_name", None) == LAYER_NAME:
            bound = getattr(obj, "__dict__", {}).get("forward")
            if getattr(bound, "__func__", None) in ours:
                del obj.__dict__["forward"]
    if "prev_kernels" in _REGISTERED:
        import kernels.layer.globals as kg

        prev = _REGISTERED.pop("prev_kernels")
        if prev is None:
            kg._KERNEL_MAPPING.get().pop(LAYER_NAME, None)
        else:
            kg._KERNEL_MAPPING.get()[LAYER_NAME] = prev
    if "prev" in _REGISTERED:
        from transformers.integrations import hub_kernels

        prev = _REGISTERED.pop("prev")
        tmap = hub_kernels.get_kernel_mapping_transformers()
        if prev is None:
            tmap.pop(LAYER_NAME, None)
        else:
            tmap[LAYER_NAME] = prev


def kernel_mapping(
    repo_id: str = "kernels-community/rotary-kernels",
    *,
    version: int | None = 1,
    revision: str | None = None,
    repo_path: str | Path | None = None,
    inplace_inference: bool = False,
    devices: tuple[str, ...] = DEVICES,
) -> dict:
    """The mapping for ``kernels.use_kernel_mapping(...)`` / ``kernelize(..., mode=...)``.

    ``repo_path``: load from a local kernel tree (the repository root with ``build/``) instead
    of the Hub. ``revision`` takes precedence over ``version``. The layers are model-aware (see
    the module docstring); prefer ``kernelize(model)``, which also survives transformers'
    re-registration of its defaults.
    """
    from kernels import LayerRepository, LocalLayerRepository

    def repo(layer_name: str):
        if repo_path is not None:
            return LocalLayerRepository(Path(repo_path), layer_name=layer_name)
        if revision is not None:
            return LayerRepository(repo_id, layer_name=layer_name, revision=revision)
        return LayerRepository(repo_id, layer_name=layer_name, version=version)

    train = repo("apply_rotary_transformers")
    infer = repo("apply_rotary_transformers_inplace") if inplace_inference else train
    return {LAYER_NAME: _mapping_entry(train, infer, devices)}
