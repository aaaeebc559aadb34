"""rotary_kernels: fused rotary position embedding (RoPE) for PyTorch and Hugging Face.

Public API (see README.md for examples):

* ``apply_rotary_transformers(q, k, cos, sin, unsqueeze_dim=1)`` -- drop-in for
  transformers' ``apply_rotary_pos_emb``; one fused launch for q and k; differentiable.
* ``apply_rotary_emb(x, cos, sin, unsqueeze_dim=1)`` -- one tensor (q-only layers).
* ``apply_rotary_transformers_(q, k, ...)`` / ``apply_rotary_emb_(x, ...)`` -- in place
  (differentiable too: x is rotated in place, its gradient by the conj rotation).
* ``apply_rotary(x1, x2, cos, sin, out1, out2, conj)`` -- flash-attn /
  ``kernels-community/rotary`` low-level elementwise API (out may alias x).
* ``apply_rotary_qkv(qkv, cos, sin, Hq, Hk)`` / ``apply_rotary_qkv_`` -- the q and k heads of a
  packed ``[B, S, Hq + 2 Hk, D]`` projection (or flash-attn's ``[B, S, 3, H, D]``), one launch,
  v untouched; ``apply_rotary_kv(kv, cos, sin)`` / ``apply_rotary_kv_`` -- k of a packed
  ``[B, S, 2, H, D]``.
* ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)`` -- Qwen2-VL's mrope.
* ``apply_rotary_emb_complex(xq, xk, freqs_cis)`` -- Llama 4's complex ``freqs_cis`` form.
* ``apply_rotary_pos_emb_interleave(q, k, cos, sin)`` -- DeepSeek-V3 / MLA's rope part.
* ``apply_rotary_pos_emb_te(t, freqs, tensor_format)`` -- TransformerEngine's: sbhd / bshd /
  thd, angle tables, ``start_positions``, context parallelism.
* ``freqs`` -- inverse frequencies (every transformers rope type), cos/sin caches, cos/sin from
  angle tables, vLLM's ``cos_sin_cache`` split, context-parallel positions.

The rotating functions also take token-position options: ``positions=`` (gather rows of a
``[max_pos, R]`` cos/sin cache in the kernel), ``cu_seqlens=`` (packed variable-length
batches), ``seqlen_offsets=`` (KV-cache decoding), ``mrope_section=`` (multimodal RoPE).

Every function takes ``interleaved=`` (GPT-J layout) and ``backend=`` ("cuda", "triton",
"cpu", "reference"; default: the fastest available for the device) as keywords.
Partial rotary: cos/sin with last dim R < D rotate the first R dims of the head dim and
pass the rest through. The semantics are defined by ``rotary_kernels.reference``.

Hugging Face integration: ``layers`` holds the ``kernels.kernelize`` layers, ``hub`` the
mode-keyed mapping for ``kernels.use_kernel_mapping`` / transformers (README: "Hub kernel").
Every exported function carries ``has_backward`` and ``can_torch_compile`` (read by
``kernels.FuncRepository``).
"""
from __future__ import annotations

from . import _compiled, freqs, hub, layers, reference
from ._api import (
    apply_rotary,
    apply_rotary_emb,
    apply_rotary_emb_,
    apply_rotary_kv,
    apply_rotary_kv_,
    apply_rotary_qkv,
    apply_rotary_qkv_,
    apply_rotary_transformers,
    apply_rotary_transformers_,
    available_backends,
)
from ._dispatch import BACKENDS
from ._dropins import (
    apply_multimodal_rotary_pos_emb,
    apply_rotary_emb_complex,
    apply_rotary_pos_emb_interleave,
    apply_rotary_pos_emb_te,
)

__version__ = "0.1.0"

# What each function supports, for kernels' FuncRepository / kernelize mode checks.
# (apply_rotary writes into caller-given outputs with data-pointer checks: not traced.)
for _fn, _backward, _compile in (
    (apply_rotary_transformers, True, True),
    (apply_rotary_emb, True, True),
    (apply_rotary_transformers_, True, True),
    (apply_rotary_emb_, True, True),
    (apply_rotary_qkv, True, True),
    (apply_rotary_qkv_, True, True),
    (apply_multimodal_rotary_pos_emb, True, True),
    (apply_rotary_emb_complex, True, True),
    (apply_rotary_kv, True, True),
    (apply_rotary_kv_, True, True),
    (apply_rotary_pos_emb_interleave, True, True),
    (apply_rotary_pos_emb_te, True, False),  # (thd + context parallelism reads cu_seqlens on the host)
    (apply_rotary, False, False),
):
    _fn.has_backward = _backward
    _fn.can_torch_compile = _compile
del _fn, _backward, _compile

__all__ = [
    "apply_rotary_transformers",
    "apply_rotary_emb",
    "apply_rotary_transformers_",
    "apply_rotary_emb_",
    "apply_rotary",
    "apply_rotary_qkv",
    "apply_rotary_qkv_",
    "apply_multimodal_rotary_pos_emb",
    "apply_rotary_emb_complex",
    "apply_rotary_kv",
    "apply_rotary_kv_",
    "apply_rotary_pos_emb_interleave",
    "apply_rotary_pos_emb_te",
    "available_backends",
    "freqs",
    "layers",
    "hub",
    "reference",
    "BACKENDS",
]
