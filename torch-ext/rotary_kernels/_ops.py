"""The compiled extension's ops (``torch.ops._rotary_kernels_C``), when it was built.

``HAS_EXT``: the extension imported; ``HAS_CUDA_EXT``: its CUDA kernels were compiled in;
``IMPORT_ERROR``: why it did not import (for diagnostics). Importing this module never fails.
"""

from __future__ import annotations

import torch

NAMESPACE = "_rotary_kernels_C"

try:
    from . import _rotary_kernels_C  # noqa: F401  (importing registers the ops)

    HAS_EXT, IMPORT_ERROR = True, None
except ImportError as e:  # not built (pure-Python install) or built against another torch
    HAS_EXT, IMPORT_ERROR = False, str(e)

ops = getattr(torch.ops, NAMESPACE) if HAS_EXT else None
HAS_CUDA_EXT = HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::rotary", "CUDA")


def add_op_namespace_prefix(name: str) -> str:
    """kernels-community convention: the qualified name of one of this extension's ops."""
    return f"{NAMESPACE}::{name}"


if HAS_EXT:
    # The ops only write into their outputs: nothing to compute under FakeTensor / meta.
    for _name in ("rotary", "rotary_inplace", "apply_rotary"):
        torch.library.register_fake(add_op_namespace_prefix(_name))(lambda *args, **kwargs: None)
