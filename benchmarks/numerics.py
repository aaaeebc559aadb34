"""Numerics report: error of each implementation against a float64 evaluation of the same
rotation, per dtype, written to benchmarks/results/numerics-<device>.md (+ .json).

    python benchmarks/numerics.py [--device cpu|cuda] [--tokens 512]

Inputs: Llama-3-8B q/k (Hq=32, Hk=8, D=128) as transposed views, real RoPE tables (theta 5e5)
at positions up to 32k, given to every implementation in the input dtype (as transformers
passes them) and, separately, in fp32. The float64 truth uses exactly those tables. Reported:
max and mean absolute error, max error in units of the dtype's ulp at the result, and the
fraction of elements equal to the correctly rounded truth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

import rotary_kernels as rk
from rotary_kernels.reference import rotate_half


def eager(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def implementations(device):
    impls = {"eager (transformers)": eager}
    try:
        impls["torch.compile(eager)"] = torch.compile(eager, dynamic=False)
    except Exception as e:  # pragma: no cover
        print(f"torch.compile unavailable: {e}")
    for be in rk.available_backends(device):
        if be != "reference":
            impls[f"rotary_kernels[{be}]"] = (lambda be: lambda q, k, c, s: rk.apply_rotary_transformers(
                q, k, c, s, backend=be))(be)
    return impls


MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def measure(device, tokens):
    g = torch.Generator().manual_seed(0)
    B, S, Hq, Hk, D = 1, tokens, 32, 8, 128
    pos = torch.randint(0, 32768, (B, S), generator=g).double()
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[..., None] * inv
    ang = torch.cat((ang, ang), -1)
    rows = []
    impls = implementations(device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q = torch.randn(B, S, Hq, D, generator=g).to(dtype).to(device).transpose(1, 2)
        k = torch.randn(B, S, Hk, D, generator=g).to(dtype).to(device).transpose(1, 2)
        for cs_mode, cs_dtype in (("input dtype", dtype), ("fp32", torch.float32)):
            cos, sin = ang.cos().to(cs_dtype).to(device), ang.sin().to(cs_dtype).to(device)
            truth = eager(q.double(), k.double(), cos.double(), sin.double())
            # the magnitude of the terms summed (|x cos| + |rotate_half(x) sin|): the scale the error
            # of any floating-point evaluation is measured against (cancellation makes the result tiny)
            ca, sa = cos.double().abs().unsqueeze(1), sin.double().abs().unsqueeze(1)
            scale = [x.double().abs() * ca + rotate_half(x.double()).abs() * sa for x in (q, k)]
            for name, fn in impls.items():
                try:
                    got = fn(q, k, cos, sin)
                except Exception as e:
                    print(f"{name} {dtype}: failed: {e}")
                    continue
                err = torch.cat([(g_.double() - t).abs().flatten() for g_, t in zip(got, truth)])
                units = torch.cat([((g_.double() - t).abs() / torch.exp2(torch.floor(torch.log2(
                    m.clamp_min(torch.finfo(dtype).tiny))) - MANTISSA[dtype])).flatten()
                    for g_, t, m in zip(got, truth, scale)])
                exact = torch.cat([(g_ == t.to(dtype)).flatten() for g_, t in zip(got, truth)])
                rows.append(dict(dtype=str(dtype)[6:], cos=cs_mode, impl=name, out=str(got[0].dtype)[6:],
                                 max_abs=err.max().item(),
                                 mean_abs=err.mean().item(), max_ulp=units.max().item(),
                                 correctly_rounded=exact.double().mean().item()))
    return rows


def write(rows, device, out: Path):
    import importlib.metadata as md

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    meta = dict(device=dev, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=md.version("triton") if _has("triton") else "-", rotary_kernels=rk.__version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Numerics: {dev}", "", " | ".join(f"{k} {v}" for k, v in meta.items()), "",
             "Error against a float64 evaluation of the same rotation with the same cos/sin tables "
             "(Llama-3-8B q/k, positions up to 32k; `benchmarks/numerics.py`). ulp = the input dtype's spacing at "
             "|x cos| + |rotate_half(x) sin| (the terms' magnitude); 'correctly rounded' = share of elements equal "
             "to the float64 result rounded once to the input dtype. Eager transformers with fp32 cos/sin and "
             "16-bit q/k returns fp32 (type promotion): twice the bytes, and never the input dtype.",
             "", "| dtype | cos/sin | implementation | output | max abs err | mean abs err | max err (ulp) | correctly rounded |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['cos']} | {r['impl']} | {r['out']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
                     f"{r['max_ulp']:.2f} | {100 * r['correctly_rounded']:.2f}% |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out.with_suffix(".md")


def _has(mod):
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = measure(device, args.tokens)
    out = args.out or Path(__file__).parent / "results" / f"numerics-{'cuda' if device.type == 'cuda' else 'cpu'}"
    print(f"wrote {write(rows, device, out)}")


if __name__ == "__main__":
    main()
