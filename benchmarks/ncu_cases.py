"""The kernels of the open GPU questions, for Nsight Compute (``scripts/gpu_session.sh``, step ncu).

    ncu --kernel-name regex:rotary -c 8 python benchmarks/ncu_cases.py

Llama-3-8B layer, 16k tokens, bf16 q/k as transformers' transposed views, forward: the Triton
kernel with bf16 and with fp32 cos/sin (the same code but four table loads' width, yet 0.107
against 0.090 ms on an H200), then the CUDA kernel with both (fp32 tables: 85% of a copy, bf16
ones 94%). Each case runs twice (the first compiles and warms); ncu profiles every launch.
"""

from __future__ import annotations

import torch

import rotary_kernels as rk
from rotary_kernels.demo import make_inputs


def main():
    if not torch.cuda.is_available():
        print("no GPU: nothing to profile")
        return
    dev = torch.device("cuda")
    q, k, cos, sin = make_inputs(16384, torch.bfloat16, dev)
    for backend in ("triton", "cuda"):
        if backend not in rk.available_backends(dev):
            print(f"{backend}: not available")
            continue
        for name, (c, s) in {"bf16 tables": (cos, sin), "fp32 tables": (cos.float(), sin.float())}.items():
            for _ in range(2):
                torch.cuda.nvtx.range_push(f"{backend} {name}")
                rk.apply_rotary_transformers(q, k, c, s, backend=backend)
                torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            print(f"{backend} {name}: launched twice", flush=True)


if __name__ == "__main__":
    main()
