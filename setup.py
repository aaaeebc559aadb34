"""Builds rotary_kernels and its compiled extension ``rotary_kernels._rotary_kernels_C``.

Install with ``pip install -e . --no-build-isolation`` (the extension is built against the
torch already installed). Sources and CUDA capabilities come from build.toml, the Hub build's
description, so both builds compile the same files.

Environment:
  ROTARY_KERNELS_CUDA_ARCHS  CUDA archs, default build.toml's cuda-capabilities plus PTX of the
                             newest (CI builds "9.0")
  ROTARY_KERNELS_NO_CUDA=1   build the CPU kernels only
  ROTARY_KERNELS_NO_EXT=1    no extension at all (pure Python + Triton; one an earlier build left in
                             torch-ext/ is removed, as an editable install would still import it)
  ROTARY_KERNELS_EXT_NAME    extension / op namespace name (default _rotary_kernels_C; the Hub
                             build, scripts/build_hub.py, gives each variant a unique one)

The extension uses only CPython's stable ABI (it is an empty module whose import registers
torch ops), so it is built as ``<name>.abi3.so``, importable by any CPython >= 3.9.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

NAME = os.environ.get("ROTARY_KERNELS_EXT_NAME", "_rotary_kernels_C")


def _build_config():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "build.toml"), "rb") as f:
        return tomllib.load(f)


def _sources(config, backend):
    """build.toml's [torch] sources plus its kernel sources for `backend`, compiled files only."""
    files = list(config["torch"]["src"])
    for kernel in config["kernel"].values():
        if kernel["backend"] == backend:
            files += kernel["src"]
    return [f for f in files if f.endswith((".cpp", ".cu"))]


def _cuda_capabilities(config):
    """build.toml's capabilities, with PTX of the newest (TORCH_CUDA_ARCH_LIST's "+PTX") so that
    GPUs newer than the list still load the kernels (the driver compiles the PTX)."""
    caps = ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]
    for kernel in config["kernel"].values():
        if kernel["backend"] == "cuda" and "cuda-capabilities" in kernel:
            caps = list(kernel["cuda-capabilities"])
            break
    caps = sorted(caps, key=lambda c: tuple(int(x) for x in c.split(".")))
    return ";".join(caps[:-1] + [caps[-1] + "+PTX"])


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    if _flag("ROTARY_KERNELS_NO_EXT"):
        # An extension an earlier build left in the source tree would still be imported by an
        # editable install: "no extension" removes it.
        for old in Path(__file__).parent.glob(f"torch-ext/rotary_kernels/{NAME}.*so"):
            print(f"setup.py: ROTARY_KERNELS_NO_EXT=1: removing {old}")
            old.unlink()
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # -ffp-contract=off: no FMA contraction, so every CPU (and every clone of the multiversioned
    # CPU kernel) rounds the same way, bit for bit equal to the reference's fp32 ops. OpenMP (the
    # CPU kernel's at::parallel_for over tokens) on Linux; elsewhere (Apple clang has no -fopenmp)
    # the extension builds without it and each call runs on one thread.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", *openmp, "-ffp-contract=off", f"-DTORCH_EXTENSION_NAME={NAME}"]
    config = _build_config()
    with_cuda = (
        torch.version.cuda is not None
        and not _flag("ROTARY_KERNELS_NO_CUDA")
        and (cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None)
    )
    if with_cuda:
        archs = os.environ.get("ROTARY_KERNELS_CUDA_ARCHS") or _cuda_capabilities(config)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = cpp_extension.CUDAExtension(
            f"rotary_kernels.{NAME}",
            _sources(config, "cuda"),
            define_macros=[("ROTARY_WITH_CUDA", None)],
            extra_link_args=openmp,
            extra_compile_args={
                "cxx": cxx,
                # --threads 0: the archs compiled in parallel (the default six: 130 s one after
                # another, 73 s on two threads, on the 2-core CI VM)
                "nvcc": ["-O3", f"-DTORCH_EXTENSION_NAME={NAME}", "--expt-relaxed-constexpr",
                         "-lineinfo", "--threads", "0"],
            },
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            f"rotary_kernels.{NAME}", _sources(config, "cpu"), extra_compile_args={"cxx": cxx},
            extra_link_args=openmp, py_limited_api=True,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


# setuptools runs this file as __main__; scripts/build_hub.py imports it for the rules above.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(
        packages=["rotary_kernels"],
        package_dir={"": "torch-ext"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
