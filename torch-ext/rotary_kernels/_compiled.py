"""The compiled ops (CPU C++ and CUDA kernels), when the extension was built.

``HAS_EXT``: the extension imported; ``HAS_CUDA_EXT``: its CUDA kernels were compiled in;
``IMPORT_ERROR``: why it did not import (for diagnostics); ``ops``: the op namespace.
Importing this module never fails. It relies only on ``_ops.ops`` and
``_ops.add_op_namespace_prefix``, the two names every build's ``_ops.py`` provides.
"""

from __future__ import annotations

import torch

try:
    from ._ops import add_op_namespace_prefix, ops

    HAS_EXT, IMPORT_ERROR = True, None
except ImportError as e:  # not built (pure-Python install) or built against another torch
    ops, add_op_namespace_prefix = None, None
    HAS_EXT, IMPORT_ERROR = False, str(e)

HAS_CUDA_EXT = HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(add_op_namespace_prefix("rotary"), "CUDA")

if HAS_EXT:
    # The ops only write into their outputs: nothing to compute under FakeTensor / meta.
    for _name in ("rotary", "rotary_inplace", "apply_rotary"):
        torch.library.register_fake(add_op_namespace_prefix(_name))(lambda *args, **kwargs: None)
