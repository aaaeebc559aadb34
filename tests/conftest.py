"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors, which must be
switched on before triton compiles anything (rotary_kernels imports triton lazily).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rotary_kernels  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (device, backend) pairs for every kernel backend that can run here.
KERNEL_CASES = [
    pytest.param((dev, be), id=f"{dev}-{be}")
    for dev in DEVICES
    for be in rotary_kernels.available_backends(dev)
    if be != "reference"
]

# Kernel vs reference: both compute in fp32 (fp64 for fp64) and round once, so they may differ
# only where fp32 reassociation or FMA contraction (~1 ulp of fp32) flips the final rounding:
# one ulp of the output dtype. rtol is that ulp (2^-mantissa bits); atol covers values near 0.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2**-10, atol=2**-10),
    torch.bfloat16: dict(rtol=2**-7, atol=2**-7),
}


@pytest.fixture(params=KERNEL_CASES)
def dev_backend(request):
    return request.param


@pytest.fixture(params=[pytest.param(("cpu", "reference"), id="cpu-reference")] + KERNEL_CASES)
def backend(request):
    """(device, backend): the reference and every kernel backend that runs here (test files
    that parametrize ``backend`` themselves override it)."""
    return request.param


def rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    """A seeded normal tensor (made on CPU, then moved: the same values on every device)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)
