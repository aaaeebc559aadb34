"""Codegen check of the CUDA kernels, no GPU needed: rotary_cuda.cu compiled by nvcc with
setup.py's flags for sm_80 and sm_90 (once, a module fixture), then ``-Xptxas -v`` (registers,
spills), ``cuobjdump -xelf`` + ``nvdisasm -gi`` (every global load/store with the kernel source
line it comes from). The kernel instances checked are the ones the launch planning picks for
the cases below (captured by running the planner in the CPU simulation, tests/cuda_sim.cpp),
with the block shape plan_launch gives Llama-3-8B prefill. Asserts: compiles; no spills or
local memory; 128-bit q/k accesses; one memory round trip per step (the first q/k load comes
before any instruction consuming cos/sin); floors on sm_90 for the warps with loads in flight. Writes
benchmarks/results/codegen-cuda.md. Skips where there is no CUDA toolkit.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from test_cpp_ops import canonical, tables

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "rotary_kernels" / "rotary_cuda.cu"
KERNELS = ROOT / "rotary_kernels" / "rotary_cuda_kernels.cuh"
ARCHS = (80, 90)
SMS = {80: 108, 90: 132}
HBM = 3.35e12  # H100 SXM spec bandwidth, bytes/s
S, HQ, HK, D = 4096, 32, 8, 128  # Llama-3-8B prefill, one sequence
# Floors on sm_90 for the warps an SM keeps busy (fraction of 64 warps: resident blocks x the
# warps of a block that hold a row, averaged over its steps; a block's registers are freed only
# when all its warps end). Every case 45%: 6 blocks of 8x20 at 64 registers, 30 warps, each with a
# row's loads in flight at every step; interleaved per-pair tables and MLA's rope (chunks of
# pairs) included; fp32 q/k 16x14 blocks, 4 of them, 26.7 warps (42%). bf16 x with fp32 cos/sin,
# half-split: 39% (72 registers in blocks of at most 224 threads: products rounded on their own,
# no FMA, min_blocks in rotary_cuda_kernels.cuh; 5 blocks, 25 warps; at 77 registers under (256, 3)
# 4 blocks, 20 warps, as Nsight Compute measured on an H100). The 8x32 plan before kept 20 (15 with fp32
# tables) of its 32 (24) resident warps busy on average: its second step held 8 of a block's 40
# rows, and the H200 measured it at 82-86% (74-76%) of a copy's bandwidth.
BUSY_FLOOR = {"default": 0.45, ("bf16", "float", False, False): 0.39, ("bf16", "float", False, True): 0.39,
              ("float", "float", False, False): 0.4, ("float", "float", True, False): 0.4}


def _tool(name):
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name), shutil.which(name)]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def _nvcc_cmd(out, archs):
    """setup.py's nvcc flags plus torch's (what CUDAExtension passes), for `archs`."""
    from torch.utils import cpp_extension as ce

    inc = [f"-I{p}" for p in ce.include_paths(device_type="cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    return [_tool("nvcc"), "-c", str(SRC), "-o", out, *inc, *ce.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC",
            "-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DPy_LIMITED_API=0x03090000",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            # setup.py's nvcc list and define_macros (less --threads: ptxas -v's lines per arch must
            # not interleave)
            "-O3", "-DTORCH_EXTENSION_NAME=_rotary_kernels_C", "--expt-relaxed-constexpr", "-lineinfo",
            "-DROTARY_WITH_CUDA", *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs], "-Xptxas", "-v"]


def _short(name):
    name = name.replace("rotary_kernels::", "").replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16")
    return re.sub(r"\(.*\)$", "", re.sub(r"^void ", "", name))


def _line_class(path_line, lines):
    """The role of a memory access from the kernel source line it comes from."""
    if not path_line or not path_line[0].endswith("rotary_cuda_kernels.cuh"):
        return "other"
    text = lines[path_line[1] - 1] if 0 < path_line[1] <= len(lines) else ""
    if "pass-through" in text:
        return "pass"
    if "load_cs" in text:
        return "cs"
    if "token_position" in text:
        return "idx"
    if "load_n" in text or "store_n" in text:
        return "x"
    return "other"


def _width(op):
    for w in (128, 64):
        if f".{w}" in op:
            return w
    return 16 if (".U16" in op or ".S16" in op) else 32


def _disasm(cubin, lines):
    """{mangled: [(op, args, class)]} in address order; class from the outermost source line
    (the kernel's own line: nvdisasm -gi lists the inlining chain innermost first)."""
    out = subprocess.run([_tool("nvdisasm"), "-gi", "-c", cubin], capture_output=True, text=True, check=True).stdout
    funcs, fn, outer = {}, None, None
    for line in out.splitlines():
        m = re.match(r"\.text\.(\S+):", line)
        if m:
            fn, outer = m.group(1), None
            funcs[fn] = []
            continue
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)(.*)', line)
        if m:
            if "inlined at" not in m.group(3):
                outer = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if m and fn:
            funcs[fn].append((m.group(1), m.group(2), _line_class(outer, lines)))
    return funcs


def _one_round_trip(instrs):
    """True when the first q/k load precedes every instruction reading a cos/sin load's result."""
    pending = set()
    for op, args, cls in instrs:
        ops = [a.strip() for a in args.split(",")]
        if op.startswith("LDG") and cls == "x":
            return True
        if op.startswith("LDG") and cls == "cs":
            m = re.match(r"R(\d+)", ops[0])
            if m:
                pending |= set(range(int(m.group(1)), int(m.group(1)) + max(1, _width(op) // 32)))
            continue
        is_store = op.startswith(("ST", "RED", "ATOM", "BRA", "EXIT", "BSSY", "BSYNC", "CALL", "RET"))
        srcs = ops if is_store else ops[1:]
        if pending & {int(r) for a in srcs for r in re.findall(r"\bR(\d+)\b", a)}:
            return False
        m = re.fullmatch(r"R(\d+)", ops[0]) if ops and not is_store else None
        if m:
            pending.discard(int(m.group(1)))
    return True  # no q/k load at all: nothing waits twice


def occupancy(regs, threads):
    """(blocks per SM, fraction of 64 warps): 64K registers, 64 warps, 32 blocks, no smem. A warp's
    registers (in units of 256) come from one of the SM's four 16K-register quarters, so 80 a thread
    (2560 a warp) fit 6 warps a quarter, 24 an SM: 4 blocks of 5 warps, not 65536 / 12800 = 5 (Nsight
    Compute on an H100, benchmarks/results/cuda-NVIDIA_H100_80GB_HBM3/session-2026-11-28.md)."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(regs * 32 / 256) * 256
    blocks = min(32, 4 * (16384 // per_warp) // warps, 64 // warps)
    return blocks, blocks * warps / 64


def busy_rows(block, rows):
    """Rows a block holds at each of its steps (TY rows a step, the last step the rest)."""
    ty = block[1]
    return [min(ty, rows - i) for i in range(0, rows, ty)]


def busy(regs, block, rows):
    """Fraction of an SM's 64 warps holding a row's loads, averaged over a block's steps: resident
    blocks x the warps that hold rows (threads x-fastest: a warp covers 32 / TX rows)."""
    blocks, _ = occupancy(regs, block[0] * block[1])
    steps = busy_rows(block, rows)
    return blocks * sum(math.ceil(n * block[0] / 32) for n in steps) / len(steps) / 64


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    if not (_tool("nvcc") and _tool("cuobjdump") and _tool("nvdisasm")):
        pytest.skip("no CUDA toolkit (nvcc, cuobjdump, nvdisasm)")
    if torch.version.cuda is None:
        pytest.skip("torch without CUDA headers")
    work = tmp_path_factory.mktemp("codegen")
    obj = str(work / "rotary_cuda.o")
    p = subprocess.run(["nice", *_nvcc_cmd(obj, ARCHS)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    res, cur = {}, None
    for line in (p.stderr + p.stdout).splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)", line)
        if m:
            cur = (m.group(1), int(m.group(2)))
            res[cur] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            res[cur].update(stack=int(m.group(1)), spill=int(m.group(2)) + int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            res[cur]["regs"] = int(m.group(1))
    subprocess.run([_tool("cuobjdump"), "-xelf", "all", obj], cwd=work, check=True, capture_output=True)
    lines = KERNELS.read_text().splitlines()
    sass = {}
    for cubin in work.glob("*.cubin"):
        arch = int(re.search(r"sm_(\d+)", cubin.name).group(1))
        for fn, instrs in _disasm(str(cubin), lines).items():
            sass[(fn, arch)] = instrs
    names = subprocess.run(["c++filt"], input="\n".join(fn for fn, _ in res), capture_output=True,
                           text=True).stdout.splitlines()
    demangled = dict(zip([fn for fn, _ in res], names))
    by_name = {(_short(demangled[fn]), a): dict(r, mangled=fn, sass=sass.get((fn, a), [])) for (fn, a), r in res.items()}
    return by_name


def _sim():
    from torch.utils import cpp_extension

    return cpp_extension.load(name="rotary_cuda_sim", sources=[str(ROOT / "tests" / "cuda_sim.cpp")],
                              extra_include_paths=[str(ROOT / "rotary_kernels"), str(ROOT / "torch-ext")],
                              extra_cflags=["-O1"], verbose=False)


# Llama-3-8B prefill cases: (name, x dtype, cos/sin dtype, interleaved, conj[, k's own tables[,
# per-pair tables [..., R/2] (pair_tables)[, swap_layout (DeepSeek-V3's MLA rope)]]])
CASES = [
    ("prefill bf16, cos fp32", torch.bfloat16, torch.float32, False, False),
    ("prefill bf16, cos bf16", torch.bfloat16, torch.bfloat16, False, False),
    ("backward (conj) bf16, cos bf16", torch.bfloat16, torch.bfloat16, False, True),
    ("backward (conj) bf16, cos fp32", torch.bfloat16, torch.float32, False, True),
    ("interleaved bf16, cos fp32", torch.bfloat16, torch.float32, True, False),
    ("interleaved bf16, cos bf16", torch.bfloat16, torch.bfloat16, True, False),
    ("prefill fp32", torch.float32, torch.float32, False, False),
    ("interleaved fp32", torch.float32, torch.float32, True, False),
    ("prefill bf16, cos fp32, k's own cos_k/sin_k", torch.bfloat16, torch.float32, False, False, True),
    ("prefill bf16, per-pair cos fp32 (gpt-oss)", torch.bfloat16, torch.float32, False, False, False, True),
    ("backward (conj) bf16, per-pair cos bf16", torch.bfloat16, torch.bfloat16, False, True, False, True),
    ("interleaved bf16, per-pair cos fp32", torch.bfloat16, torch.float32, True, False, False, True),
    ("MLA rope (DeepSeek-V3) bf16, per-pair cos fp32", torch.bfloat16, torch.float32, True, False, False, True, True),
    ("MLA rope backward (conj) bf16, per-pair cos fp32", torch.bfloat16, torch.float32, False, True, False, True,
     True),
]
TNAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "float", torch.float64: "double"}


@pytest.fixture(scope="module")
def plans():
    """The instance and block shape the launch planning picks for each case (transformers'
    layout: q/k [B, H, S, D] viewed [B, S, H, D]; the planner runs in the simulation on a short
    sequence of the same layout, and plan_launch gives the full-size block)."""
    try:
        sim = _sim()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot build the CUDA-kernel simulation: {e}")
    out = []
    for name, dt, cdt, il, conj, *opt in CASES:
        kt, pt, sw = bool(opt and opt[0]), bool(len(opt) > 1 and opt[1]), bool(len(opt) > 2 and opt[2])
        q = canonical(1, 2, HQ, D, dt, "cpu", "heads_outer")
        k = canonical(1, 2, HK, D, dt, "cpu", "heads_outer", seed=2)
        width = D // 2 if pt else D
        cos, sin = tables(1, 2, width, cdt, "cpu")
        ck, sk = tables(1, 2, width, cdt, "cpu", seed=5) if kt else (None, None)
        info = sim.rotary_sim(q, k, cos, sin, torch.empty_like(q), torch.empty_like(k), il, conj, 132, cos_k=ck,
                              sin_k=sk, pair_tables=pt, swap_layout=sw)
        vec, vector, cs_vector, pairs, max_threads = info[4:9]
        cs_t = TNAME[cdt] if cdt == dt else "float"
        b = lambda x: "true" if x else "false"  # noqa: E731
        inst = f"rotary_kernel<{TNAME[dt]}, {cs_t}, {vec}, {b(vector)}, {b(cs_vector)}, {b(il)}, {b(kt)}, {b(pairs)}>"
        gx, gy, bx, by, rps = sim.plan(S, HQ + HK, D // 2 // vec, SMS[90], max_threads)
        out.append(dict(name=name, dt=dt, cdt=cdt, cs_t=cs_t, il=il, inst=inst, grid=(gx, gy), block=(bx, by),
                        rows=rps, vec=vec, kt=kt, pt=pt, sw=sw))
    return out


def test_compiles_without_spills(codegen):
    for (name, arch), r in codegen.items():
        assert r.get("spill", 0) == 0 and r.get("stack", 0) == 0, (name, arch, r)
        lmem = [op for op, _, _ in r["sass"] if op.split(".")[0] in ("LDL", "STL")]
        assert not lmem, (name, arch, lmem[:4])


def test_no_fused_multiply_add(codegen):
    """rotary_math.h's mul_rn: every product rounded on its own (nvcc contracts x1 c - x2 s by
    default), so every instance gives the bits of the CPU kernel and PyTorch's fp32 ops."""
    for (name, arch), r in codegen.items():
        fused = [op for op, _, _ in r["sass"] if op.split(".")[0] in ("FFMA", "DFMA")]  # (HFMA2.MMA: a register move idiom)
        assert not fused, (name, arch, fused[:4])


def test_hot_instances(codegen, plans):
    for pl in plans:
        for arch in ARCHS:
            r = codegen.get((pl["inst"], arch))
            assert r is not None, f"{pl['inst']} (used by {pl['name']}) not compiled for sm_{arch}"
            xw = {_width(op) for op, _, cls in r["sass"] if cls == "x" and op.split(".")[0] in ("LDG", "STG")}
            assert xw == {128}, (pl["name"], arch, xw)  # (swap_layout too: VEC pairs a chunk)
            assert _one_round_trip(r["sass"]), (pl["name"], arch, "cos/sin consumed before the first q/k load")
            if arch == 90:
                frac = busy(r["regs"], pl["block"], pl["rows"])
                key = (TNAME[pl["dt"]], pl["cs_t"], pl["il"] or pl["sw"], pl["pt"]) + ((True,) if pl["sw"] else ())
                floor = BUSY_FLOOR.get(key, BUSY_FLOOR["default"])
                assert frac >= floor, (pl["name"], r["regs"], pl["block"], frac)


def test_elementwise_vectorized(codegen):
    for arch in ARCHS:
        r = codegen[("apply_rotary_kernel<bf16, float, 8, true, true>", arch)]
        x = [_width(op) for op, _, cls in r["sass"] if cls == "x" and op.split(".")[0] in ("LDG", "STG")]
        assert x and min(x) == 128, (arch, x)
        # no 64-bit division (a CALL to nvcc's routine) where rows < 2^32: 32-bit, once per row
        assert not any(op.startswith("CALL") for op, _, _ in r["sass"]), arch


def test_write_report(codegen, plans):
    rows = []
    for pl in plans:
        es, cs = torch.empty(0, dtype=pl["dt"]).element_size(), torch.empty(0, dtype=pl["cdt"]).element_size()
        if pl["cs_t"] == "float":
            cs = 4
        width = D // 2 if pl["pt"] else D  # table entries a token reads
        moved = 2 * S * (HQ + HK) * D * es + 2 * S * width * cs * (2 if pl["kt"] else 1)
        threads = pl["block"][0] * pl["block"][1]
        for arch in ARCHS:
            r = codegen[(pl["inst"], arch)]
            blocks, occ = occupancy(r["regs"], threads)
            frac = busy(r["regs"], pl["block"], pl["rows"])
            acc = {}
            for op, _, cls in r["sass"]:
                base = op.split(".")[0]
                if base in ("LDG", "STG") and cls in ("x", "cs"):
                    key = f"{cls} {'ld' if base == 'LDG' else 'st'}"
                    acc.setdefault(key, set()).add(_width(op))
            widths = "; ".join(f"{k} {'/'.join(str(w) for w in sorted(v))}" for k, v in sorted(acc.items()))
            # bytes a block has in flight, averaged over its steps: its rows' q/k + its cos/sin
            steps = busy_rows(pl["block"], pl["rows"])
            per_block = sum(steps) / len(steps) * D * es + 2 * width * cs
            kb_sm = min(blocks, pl["grid"][0] * pl["grid"][1] / SMS[arch]) * per_block / 1024
            rows.append(f"| {pl['name']} | sm_{arch} | `{pl['inst']}` | {pl['block'][0]}x{pl['block'][1]} | "
                        f"{r['regs']} | {blocks} | {occ:.1%} | {frac:.1%} | {widths} | "
                        f"{'yes' if _one_round_trip(r['sass']) else 'NO'} | {kb_sm:.1f} | {moved / 1e6:.1f} | "
                        f"{moved / HBM * 1e6:.1f} |")
    text = "\n".join([
        "# CUDA codegen (tests/test_codegen_cuda.py)",
        "",
        f"Llama-3-8B prefill: q [1, {S}, {HQ}, {D}], k [1, {S}, {HK}, {D}] (transformers' [B, H, S, D] views), "
        "nvcc with setup.py's flags, no GPU involved. Occupancy is theoretical (registers; 64 warps, "
        "64K registers per SM). Widths: bits per access of q/k (x) and cos/sin (cs) in SASS. "
        "One round trip: the first q/k load precedes every instruction consuming cos/sin. "
        "Busy: warps holding a row's loads (resident blocks x a block's warps with a row, averaged over "
        "its steps; a block's registers are freed only when all its warps end). "
        "KB/SM: resident blocks x the q/k and cos/sin bytes a block has in flight, averaged over its steps. "
        "Ideal us: bytes moved at H100 spec bandwidth (3.35 TB/s).",
        "",
        "| case | arch | instance | block | regs | blocks/SM | occupancy | busy | widths | one round trip | KB/SM "
        "| MB moved | ideal us (H100) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    out = ROOT / "benchmarks" / "results" / "codegen-cuda.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
