"""Correctness + speed report on whatever device this machine has.

    python -m rotary_kernels.demo [--device cuda|cpu] [--tokens N]

For each available backend: the max error against the reference (forward and backward)
and the time of ``apply_rotary_transformers`` next to transformers' eager formula, on a
Llama-3-8B-shaped attention layer (Hq=32, Hk=8, D=128, q/k as transposed views of the
[B, S, H, D] projection, as transformers passes them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .reference import apply_rotary_transformers_reference, rotate_half

rk = sys.modules[__package__]  # this package: the pip install's, or a Hub kernel's (under its build's name)


def eager_transformers(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb, verbatim semantics (cos/sin in q's dtype)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def time_fn(fn, device: torch.device, reps: int = 20, warmup: int = 3) -> list[float]:
    """Per-call times in ms. On GPUs: the GPU's time alone, CUDA events around each call with the
    L2 flushed before it and the GPU held busy (``gpu_hold``) while the host enqueues the call;
    on CPUs, wall clock."""
    host = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        hold, held_s = gpu_hold(device, max(host[1:] or host))
        for _ in range(reps):
            # A call still being enqueued when the hold ended may have left the GPU idle between
            # its events: timed again under a longer hold. Whether the hold outlasted the
            # enqueueing is asked of the GPU itself (an event after the hold, not yet reached),
            # not inferred from the hold's calibrated length: the fourth GPU session still had
            # decode rows timing their host (cuda fwd+bwd 0.085 ms against 0.007) with holds
            # sized at twice the host time, as a spin calibrated at a low clock ends early once
            # the clock rises.
            for _attempt in range(4):
                flush.zero_()
                hold()
                held = torch.cuda.Event()
                held.record()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                fn()
                end.record()
                enqueued_s = time.perf_counter() - t0
                covered = not held.query()  # the GPU was still in the hold: it never waited for the host
                torch.cuda.synchronize()
                if covered:
                    break
                hold, held_s = gpu_hold(device, max(enqueued_s, 2 * held_s))
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


_SLEEP_CYCLES_PER_S: dict = {}


def gpu_hold(device: torch.device, host_s: float):
    """A function that keeps the GPU busy (``torch.cuda._sleep``, a spin kernel touching no memory)
    for twice ``host_s`` seconds, at least 0.2 ms and at most 50 ms, and that time in seconds
    (the caller re-times a call the hold did not cover, under a longer one): enqueued before a timed call,
    the host has enqueued the call before the GPU reaches it, so its events time the GPU's work and
    not the host's. Without it a call whose host time (Python, launches, autograd) outlasted the L2
    flush was timed by its host (the second GPU session's Triton and backward rows); the host time
    of a call is measured on its own (scripts/gpu_session.sh, host step)."""
    key = torch.cuda.get_device_properties(device).name
    if key not in _SLEEP_CYCLES_PER_S:  # calibrate: the spin kernel's cycles per second
        torch.cuda._sleep(10**7)  # (first raise the clock from idle: a spin measured there ends early later)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10**7)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_S[key] = 10**7 / (start.elapsed_time(end) / 1e3)
    held_s = min(max(2 * host_s, 2e-4), 0.05)
    cycles = int(held_s * _SLEEP_CYCLES_PER_S[key])
    return (lambda: torch.cuda._sleep(cycles)), held_s


def qk_bytes(q, k, cos, with_cs: bool = True) -> int:
    """Minimal traffic of one call: read q and k, write q_embed and k_embed, read cos/sin once."""
    b = 2 * (q.numel() + k.numel()) * q.element_size()
    return b + (2 * cos.numel() * cos.element_size() if with_cs else 0)


def make_inputs(tokens: int, dtype, device, B=1, Hq=32, Hk=8, D=128):
    S = tokens // B
    q = torch.randn(B, S, Hq, D, dtype=dtype, device=device).transpose(1, 2)
    k = torch.randn(B, S, Hk, D, dtype=dtype, device=device).transpose(1, 2)
    pos = torch.arange(S, device=device, dtype=torch.float32)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    ang = torch.outer(pos, inv)
    ang = torch.cat((ang, ang), -1)[None].expand(B, S, D)
    return q, k, ang.cos().to(dtype), ang.sin().to(dtype)


def report(device: torch.device, tokens: int, dtypes) -> list[dict]:
    rows = []
    backends = [b for b in rk.available_backends(device) if b != "reference"]
    for dtype in dtypes:
        q, k, cos, sin = make_inputs(tokens, dtype, device)
        want = apply_rotary_transformers_reference(q, k, cos, sin)
        g = (torch.randn_like(want[0]), torch.randn_like(want[1]))
        qr, kr = q.detach().requires_grad_(), k.detach().requires_grad_()
        torch.autograd.backward(apply_rotary_transformers_reference(qr, kr, cos, sin), g)
        nbytes = qk_bytes(q, k, cos)
        base = statistics.median(time_fn(lambda: eager_transformers(q, k, cos, sin), device))
        rows.append(dict(dtype=dtype, impl="eager transformers", fwd_err=_err(eager_transformers(q, k, cos, sin), want),
                         bwd_err=float("nan"), ms=base, gbs=nbytes / base / 1e6, speedup=1.0))
        for be in backends:
            got = rk.apply_rotary_transformers(q, k, cos, sin, backend=be)
            qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
            torch.autograd.backward(rk.apply_rotary_transformers(qq, kk, cos, sin, backend=be), g)
            ms = statistics.median(time_fn(lambda: rk.apply_rotary_transformers(q, k, cos, sin, backend=be), device))
            rows.append(dict(dtype=dtype, impl=f"rotary_kernels[{be}]", fwd_err=_err(got, want),
                             bwd_err=_err((qq.grad, kk.grad), (qr.grad, kr.grad)),
                             ms=ms, gbs=nbytes / ms / 1e6, speedup=base / ms))
    return rows


def _err(got, want) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(got, want))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="B*S (default: 16384 on GPU, 1024 on CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    tokens = args.tokens or (16384 if device.type != "cpu" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"rotary_kernels {rk.__version__} | torch {torch.__version__} | {name}")
    print(f"Llama-3-8B layer: q [1, 32, {tokens}, 128], k [1, 8, {tokens}, 128] (transposed views), forward")
    print(f"backends here: {', '.join(rk.available_backends(device))}\n")
    rows = report(device, tokens, [torch.bfloat16, torch.float32])
    hdr = f"{'dtype':<9} {'implementation':<26} {'fwd max err':>12} {'bwd max err':>12} {'ms':>9} {'GB/s':>8} {'vs eager':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{str(r['dtype']).replace('torch.', ''):<9} {r['impl']:<26} {r['fwd_err']:>12.3g} {r['bwd_err']:>12.3g} "
              f"{r['ms']:>9.3f} {r['gbs']:>8.1f} {r['speedup']:>8.2f}x")
    print("\nerrors are vs the fp32 reference (one rounding); eager rounds three times in bf16.")
    print("GB/s counts the minimal traffic: read q, k, cos, sin once and write q_embed, k_embed.")


if __name__ == "__main__":
    main()
