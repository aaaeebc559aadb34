"""pytest-benchmark suite (not part of the tests CI runs):

    .venv/bin/python -m pytest benchmarks/ --benchmark-only [--benchmark-compare]

Forward and forward+backward of every implementation on a Llama-3-8B layer (Hq=32, Hk=8,
D=128; q/k as transposed views of [B, S, H, D], as transformers passes them), on the GPU when
there is one (16k tokens), else the CPU (2k tokens). GPU timings synchronize after each call.
benchmarks/bench.py writes the full report (GB/s, % of copy bandwidth, peers, plots).
"""

import pytest
import torch

import rotary_kernels as rk
from bench import eager, make

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, S = (4, 4096) if DEVICE.type == "cuda" else (1, 2048)
IMPLS = {"eager": eager} | {
    f"rotary_kernels[{be}]": (lambda be: lambda q, k, c, s: rk.apply_rotary_transformers(q, k, c, s, backend=be))(be)
    for be in rk.available_backends(DEVICE) if be != "reference"
}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_llama3_8b(benchmark, impl, dtype, pass_):
    q, k, cos, sin = make(B, S, 32, 8, 128, 128, dtype, dtype, DEVICE)
    fn = IMPLS[impl]
    if pass_ == "fwd":
        def call():
            fn(q, k, cos, sin)
            _sync()
    else:
        qq, kk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        gq, gk = torch.randn_like(q), torch.randn_like(k)

        def call():
            torch.autograd.grad(fn(qq, kk, cos, sin), (qq, kk), (gq, gk))
            _sync()
    benchmark.extra_info.update(device=str(DEVICE), tokens=B * S)
    benchmark(call)
