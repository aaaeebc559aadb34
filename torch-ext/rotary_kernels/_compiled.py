"""The compiled ops (CPU C++ and CUDA kernels), when the extension was built.

``HAS_EXT``: the compiled ops are registered; ``HAS_CUDA_EXT``: with CUDA kernels;
``IMPORT_ERROR``: why not (diagnostics); ``ops``: the op namespace. Importing this module
never fails. It relies only on ``ops`` and ``add_op_namespace_prefix``, the two names every
build's ``_ops.py`` provides.
"""

from __future__ import annotations

import torch

from . import _ops
from ._ops import add_op_namespace_prefix, ops


def _registered(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(add_op_namespace_prefix(name), "")
        return True
    except RuntimeError:
        return False


HAS_EXT = _registered("rotary")
IMPORT_ERROR = None if HAS_EXT else (getattr(_ops, "IMPORT_ERROR", None) or "this build has no compiled ops")
HAS_CUDA_EXT = HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(add_op_namespace_prefix("rotary"), "CUDA")

if HAS_EXT:
    # The ops only write into their outputs: nothing to compute under FakeTensor / meta.
    for _name in ("rotary", "rotary_inplace", "apply_rotary"):
        torch.library.register_fake(add_op_namespace_prefix(_name))(lambda *args, **kwargs: None)
