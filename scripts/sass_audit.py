"""Static audit of the machine code of every fastnets GPU kernel, against written expectations.

No GPU is needed: the Triton kernels are compiled by scripts/aot_compile_all.py exactly as Triton's
JIT would specialize them at run time (its own JITFunction.run on the real launch values of the
public ops and of the model family's layers, at batch 32 and 256), the CUDA C++ kernels of csrc/ by
nvcc (-cubin per architecture, the flags of setup.py), and both are read back with `cuobjdump -sass`
and `-res-usage` (scripts/sass_tools.py counts the instructions and computes occupancy). Two anchor
kernels (scripts/audit_anchors.py: a blocked tl.dot matmul and a minimal flash-attention forward)
go through the same path and show what a well-formed main loop compiles to.

Each kernel belongs to a class (KERNEL_CLASS), and each class has an expectation (CONTRIBUTING.md,
"Machine-code expectations"), checked on the kernel's fast-path specialization (16-bit dtype,
channels_last or contiguous, the most 16-aligned launch recorded; the first autotune config):

- gemm: tensor-core instructions (HGMMA on sm_90, HMMA on sm_80), at least 80% of the global bytes
  loaded inside the loops by 128-bit async copies (LDGSTS.128) or TMA, no spills;
- bandwidth: at least 90% of the global bytes moved by 128-bit instructions (the loop-weighted
  static proxy of sass_tools), no spills;
- aux (per-channel finalizers, column sums, the dropout-mask generator): no spills;
- every kernel: at least one CTA fits on an SM.

EXCEPTIONS relaxes a kernel's expectation with the reason; a kernel that misses without one fails.

Usage:
    python scripts/sass_audit.py --out DIR                       # full: sm_80 and sm_90, both Tritons
    python scripts/sass_audit.py --quick --out DIR               # the CI subset (tests/test_sass_audit.py)
    python scripts/sass_audit.py --pythons .venv/bin/python,/tmp/tri36/bin/python --root TREE --out DIR
    python scripts/sass_audit.py --compiled WORK --out DIR       # audit the cubins of an earlier compile
    python scripts/sass_audit.py --compare BEFORE/audit.json AFTER/audit.json   # a markdown comparison
Exit status: 0 when every audited kernel meets its expectation (or its written exception), 1 otherwise.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import sass_tools as S  # noqa: E402

MODELS = "resnet50,vgg16,efficientnet_b0,vit_b_16"
# --quick (the CI test): the anchors and one fast-path launch of a few kernels, one per class.
QUICK_CASES = "pool torch.float16 nhwc,layer_norm,conv"
QUICK_KERNELS = "anchor_matmul,anchor_attention,anchor_scale,_pool2d_fwd_kernel,ln_fwd_kernel,_conv_gemm"
GEMM_ASYNC_MIN = 0.8
BANDWIDTH_MIN = 0.9
SMEM_PER_CTA = {80: 166912, 90: 232448}  # the most shared memory one CTA may have

# Kernel name (Triton function name, or the CUDA kernel's unqualified name) -> class, by substring:
# GEMM-like main loops (implicit-GEMM conv, attention forward and backward, the matmul anchors),
# auxiliary kernels (per-channel finalizers, column sums, the dropout-mask generator), and the
# bandwidth kernels (everything else: pooling, BN-act, LRN, layer-norm, bias-act, statistics,
# depthwise conv, elementwise backward).
_GEMM = ("gemm", "matmul", "attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "anchor_attention")
_AUX = ("finalize", "column_sum", "dropout_mask")


def kernel_class(name: str) -> str:
    if any(g in name for g in _GEMM):
        return "gemm"
    if any(a in name for a in _AUX):
        return "aux"
    return "bandwidth"


# Per-kernel exceptions: {(backend, kernel): (what is expected instead, the reason)}. backend is
# "triton" or "cuda". An exception names the relaxed check: "frac64" (the bandwidth share counted
# with 64-bit instructions), "no-async" (a GEMM without the async-copy share), "hmma" (mma.sync
# accepted on sm_90), "none" (only no spills). Written down in CONTRIBUTING.md ("Machine-code expectations") as well.
EXCEPTIONS: dict[tuple[str, str], tuple[str, str]] = {
}


# ----------------------------------------------------------------------------------------------
# Compiling

def _triton_version(python: str) -> str:
    return subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                          text=True, check=True).stdout.strip()


def compile_triton(python: str, archs, root: str, work: str, quick: bool, jobs: int, log) -> str:
    """Runs scripts/aot_compile_all.py under `python` (its Triton); returns its work folder."""
    ver = _triton_version(python)
    d = os.path.join(work, f"triton-{ver}")
    os.makedirs(d, exist_ok=True)
    cmd = [python, os.path.join(HERE, "aot_compile_all.py"), "--archs", ",".join(map(str, archs)), "--root", root,
           "--jobs", str(jobs), "--json", os.path.join(d, "aot.json"), "--cubins", os.path.join(d, "cubins"),
           "--audit"]
    if quick:
        cmd += ["--only", QUICK_CASES, "--kernels", QUICK_KERNELS, "--quick-audit"]
    else:
        cmd += ["--models", MODELS]
    log(f"$ {' '.join(cmd)}")
    with open(os.path.join(d, "compile.log"), "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    log(f"  Triton {ver}: compile exit status {rc} (log {os.path.join(d, 'compile.log')})")
    return d


def compile_cuda(root: str, archs, work: str, jobs: int, log) -> str:
    """nvcc -cubin of every csrc/*.cu per architecture (setup.py's flags); returns the folder."""
    nvcc = os.environ.get("NVCC") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), "nvcc")
    d = os.path.join(work, "cuda")
    os.makedirs(d, exist_ok=True)
    srcs = sorted(glob.glob(os.path.join(root, "csrc", "*.cu")))
    todo = [(src, a) for a in archs for src in srcs]
    procs, results = [], []
    t0 = time.time()
    while todo or procs:
        while todo and len(procs) < jobs:
            src, a = todo.pop(0)
            out = os.path.join(d, f"sm{a}-{os.path.basename(src)[:-3]}.cubin")
            cmd = [nvcc, "-cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                   f"-arch=sm_{a}", f"-I{os.path.join(root, 'csrc')}", src, "-o", out]
            procs.append((src, a, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for p in list(procs):
            if p[2].poll() is not None:
                out = p[2].stdout.read()
                results.append((os.path.basename(p[0]), p[1], p[2].returncode, out))
                procs.remove(p)
        time.sleep(0.2)
    with open(os.path.join(d, "nvcc.log"), "w") as f:
        for name, a, rc, out in sorted(results):
            f.write(f"== {name} sm_{a}: exit {rc}\n{out}\n")
    bad = [r for r in results if r[2] != 0]
    log(f"  nvcc: {len(results) - len(bad)}/{len(results)} cubins in {time.time() - t0:.0f}s"
        + (f"; FAILED: {', '.join(f'{n} sm_{a}' for n, a, _, _ in bad)}" if bad else ""))
    return d


# ----------------------------------------------------------------------------------------------
# Reading

def _max_threads(cubin: str) -> dict[str, int]:
    """{mangled function: threads per CTA} from __launch_bounds__ (EIATTR_MAX_THREADS / REQNTID)."""
    out = subprocess.run([S.cuobjdump(), "-elf", cubin], capture_output=True, text=True).stdout
    res, cur, want = {}, None, False
    for line in out.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)", line)
        if m:
            cur, want = m.group(1), False
            continue
        if "EIATTR_MAX_THREADS" in line or "EIATTR_REQNTID" in line:
            want = True
            continue
        if want and cur and line.strip().startswith("Value:"):
            nums = [int(x, 16) for x in re.findall(r"0x[0-9a-f]+", line)]
            if nums:
                t = 1
                for n in nums[:3]:
                    t *= max(n, 1)
                res[cur] = t
            want = False
    return res


def _demangle(names):
    p = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, p.stdout.splitlines())) if p.returncode == 0 else {n: n for n in names}


def _cuda_short(demangled: str) -> tuple[str, str]:
    """(kernel name, template arguments) of a demangled CUDA kernel."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = s[5:] if s.startswith("void ") else s
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    m = re.match(r"(?:.*::)?(\w+)(?:<(.*)>)?$", s[:cut])
    if not m:
        return s[:cut], ""
    targs = (m.group(2) or "").replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")
    return m.group(1), targs


def read_triton(d: str, arch: int, jobs: int = 1) -> list[dict]:
    """Audit rows of the Triton jobs of one (Triton version, arch) compile folder."""
    path = os.path.join(d, f"aot.sm{arch}.json")
    if not os.path.exists(path):
        return []
    data = json.load(open(path))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        return list(ex.map(lambda r: _triton_row(d, arch, data, r), data["results"]))


def _triton_row(d, arch, data, r) -> dict:
    """One audited Triton job (its JSON record r) of folder d."""
    row = dict(backend="triton", triton=data.get("triton"), arch=arch, id=r["id"],
               kernel=r["kernel"].rsplit(".", 1)[-1], module=r["kernel"].rsplit(".", 1)[0], dtype=r.get("dtype"),
               case=r["case"], div16=r.get("div16", []), constexprs=r.get("constexprs", {}), options=r["options"],
               autotuned=r.get("autotuned"), config_index=r.get("config_index", 0),
               n_configs=r.get("n_configs", 1), compile_status=r["status"], notes=r.get("notes", []))
    if r.get("cubin"):
        a = S.audit_cubin(os.path.join(d, "cubins", r["cubin"]), arch, threads=32 * r["options"]["num_warps"],
                          dyn_shared=r.get("dyn_shared", 0))
        rep = a.get(r.get("function")) or next(iter(a.values()))
        row.update(rep)
        row["cubin_path"] = os.path.join(d, "cubins", r["cubin"])
        row["function"] = r.get("function") or next(iter(a))
    row["lead"] = r.get("lead")
    return row


def read_cuda(d: str, arch: int) -> list[dict]:
    rows = []
    for cub in sorted(glob.glob(os.path.join(d, f"sm{arch}-*.cubin"))):
        threads = _max_threads(cub)
        a = S.audit_cubin(cub, arch, threads=None)
        dem = _demangle(list(a))
        for mangled, rep in a.items():
            name, targs = _cuda_short(dem[mangled])
            t = threads.get(mangled)
            rep = dict(rep)
            rep["threads_known"] = t is not None
            t = t or 256
            rep["threads"] = t
            if rep.get("REG") is not None:
                rep.update(S.occupancy(arch, rep["REG"], rep["shared"], t))
            first = targs.split(",")[0].strip()
            dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(first, "")
            rep["cubin_path"], rep["function"] = cub, mangled
            rows.append(dict(backend="cuda", arch=arch, id=f"cuda-sm{arch}-{name}<{targs}>",
                             kernel=name, module=os.path.basename(cub)[len(f"sm{arch}-"):-6], targs=targs,
                             dtype=dtype, case="csrc", div16=[], config_index=0, n_configs=1, **rep))
    return rows


# ----------------------------------------------------------------------------------------------
# Expectations

def _fast(row) -> bool:
    """A fast-path launch: 16-bit dtype, not an NCHW case, and the contiguous axis of the kernel's
    first tensor a multiple of 16 bytes (8 channels in fp16/bf16)."""
    case = row.get("case", "")
    if row.get("dtype") not in ("float16", "bfloat16") or "nchw" in case:
        return False
    lead = row.get("lead")
    if not lead:
        return True
    runs = [n for n, st in zip(lead["shape"], lead["stride"]) if st == 1 and n > 1]
    return all(n * lead["itemsize"] % 16 == 0 for n in runs)


def _metric(row):
    """The number an expectation reads: the async share (gemm) or the 128-bit share (bandwidth)."""
    cls = kernel_class(row["kernel"])
    v = row.get("loop_async128_share") if cls == "gemm" else row.get("frac128") if cls == "bandwidth" else 1.0
    return -1.0 if v is None else v


def check(row) -> tuple[bool, list[str], str]:
    """(meets, the failed checks, the expectation applied) for one audited kernel."""
    cls = kernel_class(row["kernel"])
    exc = EXCEPTIONS.get((row["backend"], row["kernel"]))
    relax = exc[0] if exc else ""
    if row.get("fallback_of"):  # a scalar fallback beside its vector kernel: no spills only
        cls, relax = f"fallback of {row['fallback_of']}", "none"
    fails = []
    if row.get("REG") is None:
        return False, ["not compiled"], cls
    if row.get("LOCAL", 0) or row.get("LDL", 0) or row.get("STL", 0):  # a stack frame alone is not a spill
        fails.append(f"spills: {row.get('STACK', 0)} B stack, {row.get('LOCAL', 0)} B local, {row.get('LDL', 0)} LDL / "
                     f"{row.get('STL', 0)} STL")
    if row.get("ctas") == 0 or row.get("shared", 0) > SMEM_PER_CTA[row["arch"]]:
        fails.append(f"no CTA fits on an SM ({row.get('shared')} B shared, {row.get('REG')} regs)")
    if relax == "none":
        pass
    elif cls == "gemm":
        if row["backend"] == "cuda":  # ldmatrix + mma.sync or better (wgmma)
            if not (row["HGMMA"] or (row["HMMA"] and row["LDSM"])):
                fails.append("no HGMMA, nor HMMA fed by LDSM")
        elif relax == "hmma" and row["arch"] >= 90:
            if not (row["HGMMA"] or row["HMMA"]):
                fails.append("no HGMMA or HMMA")
        elif not (row["HGMMA"] if row["arch"] >= 90 else row["HMMA"]):
            fails.append("no " + ("HGMMA" if row["arch"] >= 90 else "HMMA"))
        if relax != "no-async":
            share = row.get("loop_async128_share")
            if share is None or share < GEMM_ASYNC_MIN:
                fails.append(f"loop loads by 128-bit async copy/TMA {share} < {GEMM_ASYNC_MIN}")
    elif cls == "bandwidth":
        share = row["frac64plus"] if relax == "frac64" else row["frac128"]
        if share is None or share < BANDWIDTH_MIN:
            fails.append(f"{'64/128' if relax == 'frac64' else '128'}-bit share {share} < {BANDWIDTH_MIN}")
    return not fails, fails, cls + (f" ({relax})" if relax and not row.get("fallback_of") else "")


def representatives(rows) -> list[dict]:
    """Per (backend, triton, arch, kernel [, CUDA template args]): the fast-path row (16-bit,
    channels_last/contiguous, most 16-aligned arguments, first config); the first row else."""
    groups = {}
    for r in rows:
        if r.get("case", "").startswith("mutant"):  # a deliberately degraded launch: its own row
            r["kernel_label"] = r["kernel"] + " (mutant)"
        key = (r["backend"], r.get("triton"), r["arch"], r.get("kernel_label", r["kernel"]),
               r.get("targs") if r["backend"] == "cuda" else "")
        groups.setdefault(key, []).append(r)
    reps = []
    cuda_groups = {}
    for key, rs in list(groups.items()):  # CUDA: one row per (kernel, dtype), its best instantiation
        if key[0] == "cuda":
            r = rs[0]
            cuda_groups.setdefault((key[2], key[3], r.get("dtype")), []).extend(rs)
            del groups[key]
    cuda_names = {(g[0], g[1]) for g in cuda_groups}
    for (arch, kernel, dtype), rs in cuda_groups.items():
        for sib in ("_vec_kernel", "_async_kernel"):  # the scalar / synchronous fallback of a fast kernel
            fast_k = kernel[:-len("_kernel")] + sib if kernel.endswith("_kernel") else None
            if fast_k and (arch, fast_k) in cuda_names:
                for r in rs:
                    r["fallback_of"] = fast_k
        if dtype == "float32" and any(g[1] == kernel and g[0] == arch and g[2] in ("float16", "bfloat16")
                                      for g in cuda_groups):
            continue  # the 16-bit instantiations are the fast path; fp32 stays in audit.json
        ok = [r for r in rs if r.get("REG") is not None]
        best = max(ok, key=lambda r: (check(r)[0], r.get("frac128") or 0, r.get("HGMMA", 0) + r.get("HMMA", 0),
                                      -(r.get("LOCAL") or 0), "int" in (r.get("targs") or "")))
        best = dict(best)
        best["fast_path"] = dtype in ("float16", "bfloat16")
        best["variants"] = len(rs)
        best["variants_fast_meeting"] = f"{sum(check(r)[0] for r in ok)}/{len(ok)}"
        reps.append(best)
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("REG") is not None]
        fast = [r for r in ok if _fast(r) and r.get("config_index", 0) == 0]
        # the worst fast-path specialization: a miss first, then the lowest share
        pick = min(fast, key=lambda r: (check(r)[0], _metric(r), r.get("dtype") != "float16")) if fast else \
            (ok[0] if ok else rs[0])
        pick = dict(pick)
        pick["fast_path"] = bool(fast)
        pick["variants"] = len(rs)
        pick["variants_fast_meeting"] = f"{sum(check(r)[0] for r in fast)}/{len(fast)}" if fast else "-"
        reps.append(pick)
    return reps


# ----------------------------------------------------------------------------------------------
# Autotune pruning (issue 12, item 5)

def pruning(rows) -> list[dict]:
    """Per launch compiled with every autotune config (the first fp16 and fp32 launch of each
    autotuned kernel; the configs are consecutive jobs, config_index 0..n-1): the configs that
    spill, those no CTA of which fits on an SM, and how many remain."""
    groups, cur = [], None
    for r in rows:
        if r["backend"] != "triton" or not r.get("autotuned"):
            cur = None
            continue
        if r.get("config_index", 0) == 0:
            cur = [r]
            groups.append(cur)
        elif cur is not None and r.get("config_index") == cur[-1].get("config_index", 0) + 1 and \
                r["kernel"] == cur[0]["kernel"]:
            cur.append(r)
    out = []
    for rs in groups:
        if len(rs) < 2:
            continue
        varying = sorted(k for k in rs[0]["constexprs"] if len({str(r["constexprs"].get(k)) for r in rs}) > 1)

        def label(r):
            return ",".join(f"{k}={r['constexprs'][k]}" for k in varying) + \
                f",w{r['options'].get('num_warps')},s{r['options'].get('num_stages')}"
        spill = [label(r) + f" ({r.get('LDL', 0)} LDL/{r.get('STL', 0)} STL)" for r in rs
                 if r.get("LOCAL", 0) or r.get("LDL", 0) or r.get("STL", 0)]
        nofit = [label(r) + f" ({r.get('shared')} B)" for r in rs
                 if r.get("REG") is None or r.get("ctas", 1) == 0 or r.get("shared", 0) > SMEM_PER_CTA[r["arch"]]]
        bad = {label(r) for r in rs if r.get("LOCAL", 0) or r.get("LDL", 0) or r.get("STL", 0) or r.get("REG") is None
               or r.get("ctas", 1) == 0 or r.get("shared", 0) > SMEM_PER_CTA[r["arch"]]}
        r0 = rs[0]
        out.append(dict(triton=r0["triton"], arch=r0["arch"], kernel=r0["kernel"], dtype=r0["dtype"], case=r0["case"],
                        configs=len(rs), spill=spill, nofit=nofit, remain=len(rs) - len(bad),
                        kept=[label(r) for r in rs if label(r) not in bad]))
    return sorted(out, key=lambda p: (p["triton"], p["arch"], p["kernel"], p["dtype"]))


# ----------------------------------------------------------------------------------------------
# Output

def _w(d):
    return " ".join(f"{w}b:{n}" for w, n in sorted(d.items(), key=lambda kv: -int(kv[0]))) if d else "-"


def table(reps) -> str:
    lines = ["| backend | Triton | arch | kernel | dtype / case | class | tensor cores | LDGSTS (width:n) | TMA | "
             "LDG (width:n) | LDG in loops | STG | LDSM | 128-bit share | loop async share | regs | stack+local B | "
             "shared B | threads | CTAs/SM | warps/SM | fast-path meeting | meets | why not |",
             "|" + " --- |" * 24]
    for r in sorted(reps, key=lambda r: (r["backend"], r.get("triton") or "", r["arch"], kernel_class(r["kernel"]),
                                         r["kernel"], r.get("targs") or "")):
        ok, fails, cls = check(r)
        tc = f"HGMMA {r['HGMMA']}" if r.get("HGMMA") else f"HMMA {r['HMMA']}" if r.get("HMMA") else "-"
        what = f"{r.get('dtype') or ''} {r.get('targs') or ''}".strip() + (
            f" ({r['case']})" if r["backend"] == "triton" else "")
        exc = EXCEPTIONS.get((r["backend"], r["kernel"]))
        why = "; ".join(fails) + (f" [exception: {exc[1]}]" if exc else "")
        lines.append("| " + " | ".join(str(x) for x in (
            r["backend"], r.get("triton") or "-", f"sm_{r['arch']}", r.get("kernel_label", r["kernel"]), what, cls, tc, _w(r.get("LDGSTS_w", {})),
            r.get("TMA", 0), _w(r.get("LDG", {})), _w(r.get("loop_LDG", {})), _w(r.get("STG", {})), r.get("LDSM", 0),
            r.get("frac128"), r.get("loop_async128_share") if cls.startswith("gemm") else "-", r.get("REG"),
            (r.get("STACK") or 0) + (r.get("LOCAL") or 0), r.get("shared"), f"{r.get('threads')}{'' if r.get('threads_known', True) else '?'}",
            r.get("ctas"), r.get("warps"), r.get("variants_fast_meeting"), "yes" if ok else "**no**",
            why.replace("|", "/"))) + " |")
    return "\n".join(lines)


def prune_table(pr) -> str:
    lines = ["| Triton | arch | kernel | dtype (first launch) | configs | spill | no CTA fits | remain |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in pr:
        lines.append(f"| {p['triton']} | sm_{p['arch']} | {p['kernel']} | {p['dtype']} ({p['case']}) | {p['configs']} | "
                     f"{'; '.join(p['spill']) or '-'} | {'; '.join(p['nofit']) or '-'} | {p['remain']} |")
    return "\n".join(lines)


def write(out: str, rows, reps, pr, meta, logs, sass: bool = True):
    os.makedirs(os.path.join(out, "raw"), exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("sass", "cubin_path")} for r in rows]
    with open(os.path.join(out, "audit.json"), "w") as f:
        json.dump(dict(meta=meta, representatives=[{k: v for k, v in r.items() if k not in ("sass", "cubin_path")}
                                                   for r in reps],
                       pruning=pr, all=slim), f, indent=1, default=str)
    n_ok = sum(check(r)[0] for r in reps)
    md = [f"# SASS audit ({meta['date']})", "",
          f"Command: `{meta['command']}`", "",
          f"Tree: {meta['tree']} (commit {meta['commit']}); Triton {', '.join(meta['tritons'])}; "
          f"archs {', '.join('sm_' + str(a) for a in meta['archs'])}; cuobjdump {meta['cuobjdump']}.", "",
          f"{n_ok} of {len(reps)} audited kernels meet their expectation. One row per Triton kernel: its worst "
          "fast-path specialization (16-bit dtype, channels_last or contiguous, contiguous axis a multiple of 16 "
          "bytes; first autotune config; 'fast-path meeting' counts all of them); one row per CUDA kernel and "
          "16-bit dtype: its best template instantiation (the launcher picks the vector path on the fast path). "
          "Widths in bits. '128-bit share': "
          f"loop-weighted ({S.LOOP_WEIGHT}x per loop level) share of global bytes moved by 128-bit instructions; "
          "'loop async share': share of the bytes loaded inside loops that arrive by LDGSTS.128 or TMA. "
          "CUDA threads marked '?' have no __launch_bounds__ (256 assumed for occupancy).", "",
          table(reps), "", "## Autotune candidates that spill or cannot fit one CTA per SM", "",
          prune_table(pr), ""]
    with open(os.path.join(out, "audit.md"), "w") as f:
        f.write("\n".join(md))
    for name, text in logs.items():
        with open(os.path.join(out, "raw", name), "w") as f:
            f.write(text)
    if not sass:
        return
    with gzip.open(os.path.join(out, "raw", "sass-representatives.txt.gz"), "wt") as f:
        for r in sorted(reps, key=lambda r: r["id"]):
            sass = ""
            if r.get("cubin_path"):
                sass = S.sass_text(S.parse_sass(S.dump(r["cubin_path"])[0]).get(r["function"], []))
            f.write(f"==== {r['backend']} {r.get('triton') or ''} sm_{r['arch']} {r['kernel']} {r.get('targs') or ''} "
                    f"{r['id']} ({r.get('case')})\n{sass}\n")


def compare(before: str, after: str) -> str:
    """A markdown table of two audits (their audit.json): per kernel row, the counts the
    expectations read, before and after, and whether it meets."""
    def load(path):
        reps = json.load(open(path))["representatives"]
        out = {}
        for r in reps:
            key = (r["backend"], r.get("triton") or "-", r["arch"], r.get("kernel_label", r["kernel"]),
                   r.get("dtype") if r["backend"] == "cuda" else "")
            out[key] = r
        return out

    def cell(r):
        if r is None:
            return "(absent)"
        ok, fails, cls = check(r)
        tc = f"HGMMA {r['HGMMA']}" if r.get("HGMMA") else f"HMMA {r['HMMA']}" if r.get("HMMA") else "no TC"
        spill = (r.get("STACK") or 0) + (r.get("LOCAL") or 0)
        main = (f"async {r.get('loop_async128_share')}, {tc}" if cls.startswith("gemm")
                else f"128-bit {r.get('frac128')}")
        return f"{'yes' if ok else '**no**'}: {main}, {r.get('REG')} regs{f', {spill} B stack' if spill else ''}"

    b, a = load(before), load(after)
    lines = ["| backend | Triton | arch | kernel | dtype | class | before | after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(set(b) | set(a), key=lambda k: (k[0], k[1], k[2], kernel_class(k[3].split(" ")[0]), k[3], k[4])):
        r = a.get(key) or b.get(key)
        lines.append(f"| {key[0]} | {key[1]} | sm_{key[2]} | {key[3]} | {key[4] or r.get('dtype') or ''} | "
                     f"{check(r)[2]} | {cell(b.get(key))} | {cell(a.get(key))} |")
    nb = sum(check(r)[0] for r in b.values() if "kernel_label" not in r)
    na = sum(check(r)[0] for r in a.values() if "kernel_label" not in r)
    lines += ["", f"Meeting their expectation: before {nb} of {len(b)}, after {na} of {len(a)}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":  # --compare BEFORE/audit.json AFTER/audit.json
        print(compare(sys.argv[2], sys.argv[3]))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--render":  # --render DIR: the tables again from DIR/audit.json
        data = json.load(open(os.path.join(sys.argv[2], "audit.json")))
        rows = data["all"]
        for r in rows:
            r.pop("fallback_of", None)
            r.pop("kernel_label", None)
        reps = representatives(rows)
        write(sys.argv[2], rows, reps, pruning(rows), data["meta"], {}, sass=False)
        print(f"{sum(check(r)[0] for r in reps)}/{len(reps)} kernels meet their expectation; re-rendered {sys.argv[2]}")
        return 0
    ap.add_argument("--out", required=True, help="output folder (audit.md, audit.json, raw/)")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--pythons", default=None, help="comma-separated Python interpreters, one per Triton version "
                                                    "(default: this one)")
    ap.add_argument("--root", default=ROOT, help="the fastnets tree to audit (default: this checkout)")
    ap.add_argument("--work", default=None, help="scratch folder for cubins (default: OUT/../.work-NAME, removed)")
    ap.add_argument("--compiled", default=None, help="audit the Triton compiles already in this work folder")
    ap.add_argument("--quick", action="store_true", help="the CI subset: a few kernels, no CUDA, no models")
    ap.add_argument("--no-cuda", action="store_true", help="skip csrc/*.cu")
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    archs = [int(x) for x in a.archs.split(",")]
    root = os.path.abspath(a.root)
    work = a.compiled or a.work or os.path.join("/tmp", f"sass-audit-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    pythons = (a.pythons or sys.executable).split(",")
    folders = []
    if a.compiled:
        folders = sorted(glob.glob(os.path.join(work, "triton-*")))
    else:
        for py in pythons:
            folders.append(compile_triton(py, archs, root, work, a.quick, a.jobs, log))
    cuda_dir = None
    if not (a.quick or a.no_cuda):
        cuda_dir = os.path.join(work, "cuda") if (a.compiled and os.path.isdir(os.path.join(work, "cuda"))) \
            else compile_cuda(root, archs, work, max(1, a.jobs), log)
    rows = []
    for d in folders:
        for arch in archs:
            rows += read_triton(d, arch, a.jobs)
    if cuda_dir:
        for arch in archs:
            rows += read_cuda(cuda_dir, arch)
    reps = representatives(rows)
    pr = pruning(rows)
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(["python"] + sys.argv),
                tree=root, commit=commit, archs=archs,
                tritons=sorted({r.get("triton") for r in rows if r.get("triton")}), cuobjdump=S.cuobjdump())
    logs = {"audit.log": "\n".join(log_lines) + "\n"}
    for d in folders:
        p = os.path.join(d, "compile.log")
        if os.path.exists(p):
            logs[f"compile-{os.path.basename(d)}.log"] = open(p).read()
    if cuda_dir and os.path.exists(os.path.join(cuda_dir, "nvcc.log")):
        logs["nvcc.log"] = open(os.path.join(cuda_dir, "nvcc.log")).read()
    write(a.out, rows, reps, pr, meta, logs)
    bad = [r for r in reps if not check(r)[0] and "kernel_label" not in r]
    for r in reps:
        if "kernel_label" in r:
            print(f"MUTANT {r['kernel_label']} sm_{r['arch']}: {'rejected: ' + '; '.join(check(r)[1]) if not check(r)[0] else 'ACCEPTED'}")
    for r in bad:
        print(f"MISS {r['backend']} {r.get('triton') or ''} sm_{r['arch']} {r['kernel']} {r.get('targs') or ''}: "
              f"{'; '.join(check(r)[1])}")
    print(f"{len(reps) - len(bad)}/{len(reps)} kernels meet their expectation; wrote {a.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
