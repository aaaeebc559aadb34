"""Host time of the Triton launcher without a GPU.

    .venv/bin/python benchmarks/triton_host_time.py [--module path/to/_triton.py]

Imports rotary_kernels with the real Triton JIT (no interpreter) under a fake driver whose
compiled kernel does nothing, so a call runs everything on the host that a GPU launch runs:
the launcher's Python (``_triton.rotary_triton``) and Triton's ``JITFunction.run`` (argument
binding, specialisation key, cache lookup, launch metadata), but not the C launch stub
(``cuLaunchKernel`` and its argument packing). Reports us per call (median of repeats) for
``rotary_triton`` itself and with ``_launch`` stubbed out (the launcher's own share), and for
the public function on the Triton backend (validation, a launch replayed per geometry:
``_dispatch.rotate``; outputs allocated on the CPU here).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "torch-ext"))


class _FakeDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _FakeKernel:
    function = None
    packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = _FakeKernel()
    self.device_caches[device][0][key] = kernel
    return kernel


def main():
    driver.set_active(_FakeDriver())
    JITFunction._do_compile = _do_compile
    if len(sys.argv) == 3 and sys.argv[1] == "--module":  # e.g. an older _triton.py, for a before/after
        import importlib.util

        spec = importlib.util.spec_from_file_location("rotary_kernels._triton_alt", sys.argv[2])
        T = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(T)
    else:
        from rotary_kernels import _triton as T

    bf = torch.bfloat16

    def qk(b, s, hq=32, hk=8, d=128):
        return (torch.empty(b, s, hq, d, dtype=bf).transpose(1, 2).transpose(1, 2),
                torch.empty(b, s, hk, d, dtype=bf).transpose(1, 2).transpose(1, 2))

    cases = {}
    q, k = qk(1, 1)
    c, s = torch.empty(1, 1, 128), torch.empty(1, 1, 128)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    cases["decode b1, per-token cos/sin"] = lambda: T.rotary_triton(q, k, c, s, qo, ko, False, False)
    cc, cs = torch.empty(8192, 128), torch.empty(8192, 128)
    off = torch.zeros(1, dtype=torch.int64)
    cases["decode b1, cache + seqlen_offsets"] = lambda: T.rotary_triton(q, k, cc, cs, qo, ko, False, False,
                                                                     None, None, off, 0)
    pos = torch.zeros(1, 1, 1, dtype=torch.int64)
    cases["decode b1, cache + positions"] = lambda: T.rotary_triton(q, k, cc, cs, qo, ko, False, False, pos)
    if T.__name__ == "rotary_kernels._triton":  # the public function, the Triton backend on CPU tensors
        import rotary_kernels as rk
        from rotary_kernels import _dispatch

        _dispatch._interpret = lambda: True  # (lets the backend take CPU tensors; the fake driver runs it)
        qv, kv = q.transpose(1, 2), k.transpose(1, 2)  # transformers' [B, H, S, D] views
        cb, sb = c.to(bf), s.to(bf)
        cases["api: apply_rotary_transformers"] = lambda: rk.apply_rotary_transformers(qv, kv, cb, sb, backend="triton")

    def bench(fn, n=2000, reps=7):
        fn()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t0) / n * 1e6)
        return statistics.median(out)

    orig = T._launch
    print(f"{'case':<36} {'call us':>12} {'without the launch us':>22}")
    for name, fn in cases.items():
        full = bench(fn)
        T._launch = lambda *a, **k: None
        own = bench(fn)
        T._launch = orig
        print(f"{name:<36} {full:12.1f} {own:22.1f}")


if __name__ == "__main__":
    main()
