"""Builds rotary_kernels and its compiled extension ``rotary_kernels._rotary_kernels_C``.

Install with ``pip install -e . --no-build-isolation`` (the extension is built against the
torch already installed). The sources are the ones build.toml lists for the Hub build.

Environment:
  ROTARY_KERNELS_CUDA_ARCHS  CUDA archs, default "8.0;8.6;8.9;9.0" (CI builds "9.0" only)
  ROTARY_KERNELS_NO_CUDA=1   build the CPU kernels only
  ROTARY_KERNELS_NO_EXT=1    no extension at all (pure Python + Triton)
"""

import os
import shutil

from setuptools import setup

NAME = "_rotary_kernels_C"
CPU_SOURCES = ["torch-ext/torch_binding.cpp", "rotary_kernels/cpu/rotary_cpu.cpp"]
CUDA_SOURCES = ["rotary_kernels/rotary_cuda.cu"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    if _flag("ROTARY_KERNELS_NO_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx = ["-O3", "-fopenmp", f"-DTORCH_EXTENSION_NAME={NAME}"]
    include_dirs = [os.path.abspath("torch-ext")]
    with_cuda = (
        torch.version.cuda is not None
        and not _flag("ROTARY_KERNELS_NO_CUDA")
        and (cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None)
    )
    if with_cuda:
        archs = os.environ.get("ROTARY_KERNELS_CUDA_ARCHS", "8.0;8.6;8.9;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = cpp_extension.CUDAExtension(
            f"rotary_kernels.{NAME}",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs,
            define_macros=[("ROTARY_WITH_CUDA", None)],
            extra_link_args=["-fopenmp"],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", f"-DTORCH_EXTENSION_NAME={NAME}", "--expt-relaxed-constexpr",
                         "-lineinfo"],
            },
            py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension(
            f"rotary_kernels.{NAME}", CPU_SOURCES, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    packages=["rotary_kernels"],
    package_dir={"": "torch-ext"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
