"""`kernels benchmark .` entry point: Benchmark classes run against get_local_kernel(<repo>).

Each workload rotates q and k of one attention layer laid out as transformers passes them
(transposed views of the [B, S, H, D] projection) and verifies ``self.out`` (q_embed) against
transformers' formula computed in fp32. ``kernels benchmark`` sets ``device = "cuda"`` from the torch
build even without a GPU, so the classes fall back to CPU tensors (and smaller shapes) then.
"""

from __future__ import annotations

import torch
from kernels.benchmark import Benchmark


def _device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return requested


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class _RotaryWorkloads:
    """The workloads (a mixin, so `kernels benchmark` does not run it as a benchmark itself)."""

    seed = 0
    dtype = torch.bfloat16
    Hq, Hk, D = 32, 8, 128  # Llama-3-8B

    def _make(self, batch: int, seqlen: int, rotary_dim: int | None = None):
        dev = _device(self.device)
        if dev == "cpu":  # keep CPU runs short
            batch, seqlen = min(batch, 1), min(seqlen, 512)
        r = rotary_dim or self.D
        # |values| < ~1.5 so that one bf16 ulp stays under verify's atol of 1e-2
        self.q = (0.25 * torch.randn(batch, seqlen, self.Hq, self.D, device=dev)).to(self.dtype).transpose(1, 2)
        self.k = (0.25 * torch.randn(batch, seqlen, self.Hk, self.D, device=dev)).to(self.dtype).transpose(1, 2)
        ang = torch.rand(batch, seqlen, r // 2, device=dev) * 100
        ang = torch.cat((ang, ang), -1)
        self.cos, self.sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)

    def _run(self):
        self.out, self.k_out = self.kernel.apply_rotary_transformers(self.q, self.k, self.cos, self.sin)

    def _eager(self):
        """transformers' formula in fp32, rounded once (as the kernels compute)."""
        r = self.cos.shape[-1]
        cos, sin = self.cos.unsqueeze(1).float(), self.sin.unsqueeze(1).float()
        q = self.q[..., :r].float()
        q_rot = (q * cos + _rotate_half(q) * sin).to(self.dtype)
        return torch.cat((q_rot, self.q[..., r:]), -1)

    # prefill / training: 16k tokens
    def setup_prefill_16k(self):
        self._make(4, 4096)

    def benchmark_prefill_16k(self):
        self._run()

    def verify_prefill_16k(self):
        return self._eager()

    # decode: one token for 64 sequences
    def setup_decode_b64(self):
        self._make(64, 1)

    def benchmark_decode_b64(self):
        self._run()

    def verify_decode_b64(self):
        return self._eager()

    # partial rotary (first half of the head dim), Qwen3-Next / NeoX style
    def setup_partial_16k(self):
        self._make(4, 4096, rotary_dim=64)

    def benchmark_partial_16k(self):
        self._run()

    def verify_partial_16k(self):
        return self._eager()


class RotaryBF16(_RotaryWorkloads, Benchmark):
    dtype = torch.bfloat16


class RotaryFP32(_RotaryWorkloads, Benchmark):
    dtype = torch.float32
