"""Codegen check of the Triton kernels with the real compiler, no GPU needed.

The launcher's own specialisations are captured: the public API is called (backend="triton")
on CPU tensors with Llama-3-8B shapes under a fake driver, and ``JITFunction._do_compile`` is
replaced by a recorder, so the signature, constexprs, divisibility attributes and num_warps
are exactly what ``_triton.py`` would launch on a GPU, and nothing runs. Each specialisation
is compiled with ``triton.compile`` for sm_90 and sm_80, and checked:

* it compiles, with no spills and no local memory (``cuobjdump -res-usage``, SASS LDL/STL);
* q and k (in the hot cases: half-split and interleaved, bf16 and fp32) are read and written
  with 128-bit accesses only (PTX ``ld/st.global.v4.b32``, attributed to q or k by the
  kernel line the access is inlined at);
* every q/k load is issued before the first barrier and nothing else is (the cos/sin loads
  and their layout conversion come after it): a program waits one memory round trip;
* every address offset is 64-bit: no i32 ``arith.muli`` and no ``tt.addptr`` with i32 offsets
  in the TTIR (a stride times an index overflows in 32 bits once it reaches 2^31).

The capture and compilation run in a subprocess (this file with ``--worker``), since the
test session imports Triton in interpreter mode. It also writes
``benchmarks/results/codegen-triton.md``: registers, access widths, bytes per program and the
ideal time at H100 bandwidth per case. Skips when Triton's NVIDIA backend or ptxas is absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "torch-ext", "rotary_kernels", "_triton.py")
REPORT = os.path.join(ROOT, "benchmarks", "results", "codegen-triton.md")
ARCHS = (90, 80)
H100_BW = 3.35e12  # bytes/s, H100 SXM spec
B, S, HQ, HK, D = 1, 4096, 32, 8, 128  # Llama-3-8B prefill

# case -> (hot: 128-bit q/k required, description)
CASES = {
    "prefill_bf16": (True, "Llama-3-8B prefill: q,k bf16 [1,32|8,4096,128] transposed views, "
                     "cos/sin fp32 [1,4096,128]"),
    "prefill_fp32": (True, "same, q,k fp32"),
    "prefill_bf16_bwd": (True, "same, backward (conj) through autograd, cos/sin bf16"),
    "interleaved_bf16": (True, "same, GPT-J interleaved pairs"),
    "prefill_bf16_same": (True, "prefill_bf16 with cos/sin bf16 (transformers' own tables, in the model's dtype)"),
    "decode_b64": (True, "decode: q,k bf16 [64,32|8,1,128], cos/sin fp32 [64,1,128]"),
    "decode_b1_offsets": (True, "decode batch 1, cache [8192,128] fp32 + seqlen_offsets"),
    "prefill_positions": (True, "prefill, cache [8192,128] fp32 + positions [1,4096]"),
    "partial_r64": (False, "prefill, rotary dim 64 of 128, out of place (dims 64..127 copied)"),
    "elementwise": (False, "apply_rotary(x1, x2, cos[S,1,64], ...) in place, x [1,4096,32,128] bf16"),
    "prefill_bf16_k_tables": (True, "prefill_bf16 with k's own tables, cos_k/sin_k fp32 [1,4096,128]"),
    "prefill_bf16_pair": (True, "gpt-oss: prefill_bf16 with per-pair cos/sin fp32 [1,4096,64] (pair_tables)"),
    "interleaved_bf16_pair": (True, "interleaved_bf16 with per-pair cos/sin fp32 [1,4096,64]"),
    "decode_b64_pair_cache": (True, "vLLM decode: q,k bf16 [64,32|8,1,128], per-pair cache [8192,64] fp32 "
                              "+ positions [64,1]"),
    "mla_bf16": (True, "DeepSeek-V3 MLA rope (apply_rotary_pos_emb_interleave): prefill_bf16's q,k read "
                 "interleaved, written half-split (swap_layout), cos/sin fp32 [1,4096,128] read per pair"),
    "mla_bf16_bwd": (True, "mla_bf16's backward through autograd: read half-split, written interleaved, conj"),
}


# ----------------------------------------------------------------------------------------------
# Worker (subprocess): capture, compile, inspect
# ----------------------------------------------------------------------------------------------


def _nv_tool(name):
    import triton

    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return p if os.path.exists(p) else None


def _capture():
    """[(case, launch record)] and {spec key: spec} from calls of the public API."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class FakeDriver:  # enough for JITFunction.run up to compilation
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(FakeDriver())
    sys.path.insert(0, os.path.join(ROOT, "torch-ext"))
    import rotary_kernels as rk
    from rotary_kernels import _dispatch
    from rotary_kernels import _triton as T

    assert os.path.realpath(T.__file__) == os.path.realpath(SRC), T.__file__
    _dispatch._interpret = lambda: True  # backend="triton" on CPU tensors (nothing is launched)

    specs, launches, state = {}, [], {}

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        skey = (self.fn.__name__, repr(sorted(signature.items())),
                repr(sorted(constexprs.items(), key=str)), repr(sorted(attrs.items(), key=str)), options.num_warps)
        specs.setdefault(skey, dict(fn=self, name=self.fn.__name__, signature=signature, constexprs=constexprs,
                                    attrs=attrs, num_warps=options.num_warps, num_stages=options.num_stages))
        state["rec"]["spec"] = skey
        return None

    JITFunction._do_compile = do_compile
    orig = T._launch

    def launch(kernel, grid, *args, **kwargs):
        rec = dict(case=state["case"], kernel=kernel.fn.__name__, grid=tuple(grid), args=args, kwargs=kwargs)
        state["rec"] = rec
        launches.append(rec)
        orig(kernel, grid, *args, **kwargs)

    T._launch = launch
    bf, f32, T_ = torch.bfloat16, torch.float32, "triton"

    def qk(b, s, dt=bf):
        return (torch.empty(b, s, HQ, D, dtype=dt).transpose(1, 2), torch.empty(b, s, HK, D, dtype=dt).transpose(1, 2))

    def cs(b, s, r=D, dt=f32):
        return torch.empty(b, s, r, dtype=dt), torch.empty(b, s, r, dtype=dt)

    def prefill(dt, cs_dt=f32, **kw):
        q, k = qk(B, S, dt)
        c, s_ = cs(1, S, dt=cs_dt)
        rk.apply_rotary_transformers(q, k, c, s_, backend=T_, **kw)

    def k_tables():
        q, k = qk(B, S)
        c, s_ = cs(1, S)
        ck, sk = cs(1, S)
        rk.apply_rotary_transformers(q, k, c, s_, cos_k=ck, sin_k=sk, backend=T_)

    def bwd():
        q, k = qk(B, S)
        q.requires_grad_(True)
        k.requires_grad_(True)
        c, s_ = cs(1, S, dt=bf)
        qe, ke = rk.apply_rotary_transformers(q, k, c, s_, backend=T_)
        torch.autograd.backward([qe, ke], [torch.empty_like(qe), torch.empty_like(ke)])

    def decode():
        q, k = qk(64, 1)
        c, s_ = cs(64, 1)
        rk.apply_rotary_transformers(q, k, c, s_, backend=T_)

    def pair_prefill(**kw):
        q, k = qk(B, S)
        c, s_ = cs(1, S, r=D // 2)
        rk.apply_rotary_transformers(q, k, c, s_, backend=T_, pair_tables=True, **kw)

    def pair_decode():
        q, k = qk(64, 1)
        c, s_ = torch.empty(8192, D // 2), torch.empty(8192, D // 2)
        rk.apply_rotary_transformers(q, k, c, s_, backend=T_, pair_tables=True,
                                     positions=torch.zeros(64, 1, dtype=torch.int64))

    def mla(backward=False):
        q, k = qk(B, S)
        q.requires_grad_(backward)
        k.requires_grad_(backward)
        c, s_ = cs(1, S)
        outs = rk.apply_rotary_pos_emb_interleave(q, k, c, s_, backend=T_)
        if backward:
            torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])

    def decode_offsets():
        q, k = qk(1, 1)
        c, s_ = torch.empty(8192, D), torch.empty(8192, D)
        rk.apply_rotary_transformers(q, k, c, s_, backend=T_, seqlen_offsets=torch.zeros(1, dtype=torch.int64))

    def positions():
        q, k = qk(B, S)
        c, s_ = torch.empty(8192, D), torch.empty(8192, D)
        rk.apply_rotary_transformers(q, k, c, s_, backend=T_, positions=torch.zeros(1, S, dtype=torch.int64))

    def partial():
        q, k = qk(B, S)
        c, s_ = cs(1, S, r=D // 2)
        rk.apply_rotary_transformers(q, k, c, s_, backend=T_)

    def elementwise():
        x = torch.empty(B, S, HQ, D, dtype=bf)
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        c, s_ = torch.empty(S, 1, D // 2), torch.empty(S, 1, D // 2)
        with torch.no_grad():
            rk.apply_rotary(x1, x2, c, s_, x1, x2, False, backend=T_)

    thunks = {
        "prefill_bf16": lambda: prefill(bf), "prefill_fp32": lambda: prefill(f32), "prefill_bf16_bwd": bwd,
        "prefill_bf16_same": lambda: prefill(bf, cs_dt=bf),
        "interleaved_bf16": lambda: prefill(bf, interleaved=True), "decode_b64": decode,
        "decode_b1_offsets": decode_offsets, "prefill_positions": positions, "partial_r64": partial,
        "elementwise": elementwise, "prefill_bf16_k_tables": k_tables, "prefill_bf16_pair": pair_prefill,
        "interleaved_bf16_pair": lambda: pair_prefill(interleaved=True), "decode_b64_pair_cache": pair_decode,
        "mla_bf16": mla, "mla_bf16_bwd": lambda: mla(backward=True),
    }
    for name in CASES:
        state["case"] = name
        _dispatch._TRITON_LAUNCHES.clear()  # (a replayed launch passes the caller's tensors, not the kernel views)
        thunks[name]()
    return specs, launches


def _ptx_accesses(ptx, src_lines):
    """[(kind, bits, role)] of ld/st.global; role from the kernel line the access is inlined at."""
    acc, in_asm, loc = [], False, (0, 0)
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith("// begin inline asm"):
            in_asm = True
            continue
        if s.startswith("// end inline asm"):
            in_asm = False
            continue
        if s.startswith(".loc") and not in_asm:
            m = re.match(r"\.loc\s+\d+\s+(\d+)\s+\d+(?:.*inlined_at\s+\d+\s+(\d+))?", s)
            if m:
                loc = (int(m.group(1)), int(m.group(2) or 0))
            continue
        m = re.search(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)", s)
        if m:
            vec, bits = 1, 32
            for t in m.group(2).split("."):
                if re.fullmatch(r"v\d+", t):
                    vec = int(t[1:])
                elif re.fullmatch(r"[bufs]\d+", t):
                    bits = int(t[1:])
            acc.append((m.group(1), vec * bits, _role(loc, src_lines)))
    return acc


def _role(loc, src_lines):
    line, inl = loc
    text = src_lines[line - 1] if 0 < line <= len(src_lines) else ""
    call = " ".join(src_lines[i - 1] for i in range(inl, min(inl + 2, len(src_lines) + 1))) if inl else ""
    if "_copy_pass" in call or "offs_p" in text:
        return "pass"
    if any(t in call for t in ("_load_cs(", "_position(")) or "cu_ptr" in text:
        return "cs" if "_load_cs(" in call else "idx"
    if re.search(r"_load_pairs\(q_ptr|_store_pairs\(qo_ptr", call):
        return "q"
    if re.search(r"_load_pairs\(k_ptr|_store_pairs\(ko_ptr", call):
        return "k"
    if "c_ptr" in text or "s_ptr" in text:
        return "cs"
    return "x"


def _res_usage(cubin_path, name):
    out = subprocess.run([_nv_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True).stdout
    fn = None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn == name and "REG:" in line:
            return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return {}


def _offsets32(ttir):
    """TTIR lines that compute or apply a 32-bit offset: integer multiplies in i32 (every
    product in these kernels is part of an address) and ``tt.addptr`` with i32 offsets."""
    bad = []
    for line in ttir.splitlines():
        if re.search(r"arith\.muli .*: (tensor<[0-9x]*xi32.*>|i32)\b", line):
            bad.append(line.strip())
        elif "tt.addptr" in line and not re.search(r"xi64[,>]|, i64\b|: !tt\.ptr<\w+>, i64", line):
            bad.append(line.strip())
    return bad


def _worker(out_json):
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    specs, launches = _capture()
    from rotary_kernels import _triton as T  # (importable once _capture has set the path)

    with open(SRC) as f:
        src_lines = f.read().splitlines()
    work = tempfile.mkdtemp(prefix="codegen_triton_")
    compiled = {}
    for i, (skey, sp) in enumerate(specs.items()):
        for arch in ARCHS:
            tgt = GPUTarget("cuda", arch, 32)
            opts = make_backend(tgt).parse_options(dict(num_warps=sp["num_warps"], num_stages=sp["num_stages"],
                                                        **T.COMPILE_OPTIONS))
            ck = triton.compile(ASTSource(sp["fn"], sp["signature"], sp["constexprs"], sp["attrs"]), target=tgt,
                                options=opts.__dict__)
            cubin = os.path.join(work, f"{i}_{arch}.cubin")
            with open(cubin, "wb") as f:
                f.write(ck.asm["cubin"])
            sass = subprocess.run([_nv_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
            acc = _ptx_accesses(ck.asm["ptx"], src_lines)
            instrs = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]
            first_bar = next((j for j, ln in enumerate(instrs) if "BAR.SYNC" in ln), len(instrs))
            compiled[(i, arch)] = dict(
                ldg_before_bar=sum(1 for ln in instrs[:first_bar] if re.search(r"\bLDG\b", ln)),
                res=_res_usage(cubin, sp["name"]), lmem=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                acc=acc, mul32=_offsets32(ck.asm["ttir"]), fma=len(re.findall(r"\bfma\.rn\.f(?:32|64)", ck.asm["ptx"])))
    ids = {skey: i for i, skey in enumerate(specs)}
    out = []
    for rec in launches:
        i = ids[rec["spec"]]
        per_arch = {}
        for arch in ARCHS:
            c = compiled[(i, arch)]
            per_arch[arch] = dict(regs=c["res"].get("REG"), local=c["res"].get("LOCAL", 0),
                                  stack=c["res"].get("STACK", 0), lmem=c["lmem"], mul32=c["mul32"], acc=c["acc"],
                                  ldg_before_bar=c["ldg_before_bar"], fma=c["fma"])
        out.append(dict(case=rec["case"], kernel=rec["kernel"], spec=i, grid=rec["grid"],
                        num_warps=specs[rec["spec"]]["num_warps"], bytes=_bytes(rec), arch=per_arch,
                        constexprs={str(sp_k): str(v) for sp_k, v in rec["kwargs"].items()}))
    with open(out_json, "w") as f:
        json.dump(dict(launches=out, n_specs=len(specs)), f)


def _bytes(rec):
    """(bytes moved by the launch, bytes one program moves): x read + written (rotary dims
    only when in place), cos/sin (and k's own cos_k/sin_k) read once per token."""
    a = rec["args"]
    programs = math.prod(rec["grid"])
    if rec["kernel"] == "_elementwise_kernel":
        x1, c = a[0], a[2]
        n = x1.numel()
        uniq_c = math.prod(s for s, st in zip(c.shape, c.stride()) if st != 0)
        block = a[-1][2]  # CFG: (CONJ, ACC, BLOCK, EMU)
        return 4 * n * x1.element_size() + 2 * uniq_c * c.element_size(), \
            block * (4 * x1.element_size() + 2 * c.element_size())
    q, qo, k, ko, cos, _, cos_k = a[:7]
    A_, S_, hq, d = q.shape
    hk = k.shape[2] if k is not None else 0
    r = cos.shape[-1]  # table entries a token reads (R, or R/2 with per-pair tables)
    inplace = qo.data_ptr() == q.data_ptr()
    width = (2 * r if a[-1][20] else r) if inplace else d  # (CFG[20]: PER_PAIR)
    x = A_ * S_ * (hq + hk) * width * q.element_size() * 2
    cs = A_ * S_ * 2 * r * (cos.element_size() + (cos_k.element_size() if cos_k.data_ptr() != cos.data_ptr() else 0))
    return x + cs, (x + cs) / programs


def _markdown(data):
    lines = [
        "# Triton codegen (gpuless: triton.compile for sm_90 / sm_80, no GPU)",
        "",
        "Generated by `tests/test_codegen_triton.py` (the launcher's own specialisations, captured",
        "from the public API). Access widths: PTX `ld/st.global` per thread, bits x count, by role",
        "(q, k, cos/sin `cs`, index `idx`, pass-through `pass`, elementwise `x`). Ideal us: bytes",
        f"moved at H100 spec bandwidth ({H100_BW / 1e12:.2f} TB/s); not a measurement.",
        "",
        "| case | spec | grid | warps | regs sm90/sm80 | local | q/k/x accesses (sm_90) | cs "
        "| bytes/program | MB | ideal us H100 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for L in data["launches"]:
        a90, a80 = L["arch"]["90"], L["arch"]["80"]
        groups = {}
        for kind, bits, role in a90["acc"]:
            groups.setdefault(role, {}).setdefault(kind, {}).setdefault(bits, 0)
            groups[role][kind][bits] += 1

        def fmt(role):
            g = groups.get(role)
            if not g:
                return ""
            return f"{role}: " + " ".join(f"{k} " + " ".join(f"{b}x{n}" for b, n in sorted(v.items(), reverse=True))
                                          for k, v in sorted(g.items()))

        xs = "; ".join(f for f in (fmt("q"), fmt("k"), fmt("x"), fmt("pass")) if f)
        total, per_prog = L["bytes"]
        lines.append(f"| {L['case']} | #{L['spec']} {L['kernel']} | {'x'.join(map(str, L['grid']))} | {L['num_warps']} "
                     f"| {a90['regs']}/{a80['regs']} | {a90['local'] + a90['lmem']} | {xs} | {fmt('cs')[4:]} "
                     f"| {per_prog / 1024:.1f} KiB | {total / 1e6:.1f} | {total / H100_BW * 1e6:.1f} |")
    lines += ["", f"{data['n_specs']} distinct specialisations compiled for sm_90 and sm_80. "
              "bytes/program: bytes one program moves (x read + written, cos/sin read), on average.", "",
              "Cases:", ""]
    lines += [f"* `{name}`: {desc}" for name, (_, desc) in CASES.items()]
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Test
# ----------------------------------------------------------------------------------------------


def _backend_present():
    try:
        import triton
        from triton.backends import backends
    except Exception:  # noqa: BLE001
        return False
    return "nvidia" in backends and all(_nv_tool(t) for t in ("ptxas", "cuobjdump"))


def test_codegen_triton(tmp_path):
    import pytest

    if not _backend_present():
        pytest.skip("Triton's NVIDIA backend / ptxas / cuobjdump not available")
    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, __file__, "--worker", str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    data = json.loads(out.read_text())
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as f:
        f.write(_markdown(data))
    failures = []
    for L in data["launches"]:
        hot = CASES[L["case"]][0]
        for arch, r in L["arch"].items():
            where = f"{L['case']} sm_{arch}"
            if r["local"] or r["stack"] or r["lmem"]:
                failures.append(f"{where}: local memory / spills (LOCAL {r['local']}, STACK {r['stack']}, "
                                f"LDL/STL {r['lmem']})")
            if r["fma"]:  # products rounded on their own: the same bits as the CPU kernel and PyTorch's ops
                failures.append(f"{where}: {r['fma']} fused multiply-adds in the PTX (launch options: no fp fusion)")
            if r["mul32"]:
                failures.append(f"{where}: 32-bit offset arithmetic (offsets must be 64-bit): {r['mul32'][:3]}")
            if hot:
                n_qk = sum(1 for kind, _, rl in r["acc"] if kind == "ld" and rl in ("q", "k"))
                if L["kernel"] == "_rotary_qk_kernel" and r["ldg_before_bar"] != n_qk:
                    failures.append(f"{where}: {r['ldg_before_bar']} global loads before the first barrier, expected "
                                    f"exactly the {n_qk} q/k loads (all in flight before anything waits)")
                for role in ("q", "k"):
                    ws = [bits for kind, bits, rl in r["acc"] if rl == role]
                    if not ws:
                        failures.append(f"{where}: no {role} accesses found")
                    elif set(ws) != {128}:
                        failures.append(f"{where}: {role} accesses not all 128-bit: {sorted(ws)}")
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        print(__doc__)
