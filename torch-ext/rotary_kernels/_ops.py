"""The op namespace of this build, in the shape kernel-builder generates ``_ops.py``.

Every op of the package is registered under it: the compiled C++/CUDA ops (when the extension
was built) and the Python custom ops with autograd (``_autograd.py``). A Hub build
(kernel-builder, or scripts/build_hub.py) replaces this file with one naming a unique
namespace (``_rotary_kernels_<backend>_<id>``), so that several versions of the kernel can be
loaded in one process; this one serves the pip install, whose extension is
``rotary_kernels._rotary_kernels_C``.
"""

import importlib.util
import warnings

import torch

try:
    from . import _rotary_kernels_C  # noqa: F401  (importing registers the compiled ops)

    IMPORT_ERROR = None
except ImportError as e:  # not built (pure-Python install) or built against another torch
    IMPORT_ERROR = "not built"
    if importlib.util.find_spec(f"{__package__}._rotary_kernels_C") is not None:  # built, but it does not load
        IMPORT_ERROR = str(e)
        warnings.warn(f"rotary_kernels: the compiled extension does not load ({e}); the cpu and cuda backends are "
                      "unavailable (rebuild it: pip install -e . --no-build-isolation)", RuntimeWarning, stacklevel=2)

ops = torch.ops._rotary_kernels_C


def add_op_namespace_prefix(op_name: str) -> str:
    """Prefix op by namespace."""
    return f"_rotary_kernels_C::{op_name}"
