"""The compiled extension's op namespace, in kernel-builder's ``_ops.py`` shape.

A Hub build (kernel-builder, or scripts/build_hub.py) writes its own ``_ops.py`` in this shape
with a unique namespace (``_rotary_kernels_<id>``) so that several versions can be loaded in one
process; this one serves the pip build, whose extension is ``rotary_kernels._rotary_kernels_C``.
Importing it raises ImportError when the extension was not built: see ``_compiled.py``.
"""

import torch

from . import _rotary_kernels_C  # noqa: F401  (importing registers the ops)

ops = torch.ops._rotary_kernels_C


def add_op_namespace_prefix(op_name: str) -> str:
    """Prefix op by namespace."""
    return f"_rotary_kernels_C::{op_name}"
