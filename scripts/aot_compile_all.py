"""Compiles every Triton kernel of fastnets/kernels/ for sm_80 and sm_90 on a machine without a GPU.

The strongest check of the Triton code that a CPU machine allows: Triton's real compiler (ASTSource
-> triton.compile(target=GPUTarget("cuda", arch, 32)), down to a cubin through ptxas), for the
kernel variants the ops really launch. The interpreter accepts code that the compiler rejects (a
runtime value where a constexpr is needed, a name bound in one branch only, a type mismatch in
tl.where, an op a Triton version lacks); this finds those, under whichever Triton is installed.

How the variants are found. A worker process per architecture (the conv kernels' autotune list
depends on the architecture at import) turns the interpreter off, makes the Triton backend
selectable on CPU tensors, and replaces torch.library.wrap_triton with a recorder, so that a
launcher's `wrap_triton(kernel)[grid](*args, **kwargs)` records the launch instead of running it.
Then it calls the public ops (forward and backward) on a table of cases: every dtype, activation,
optional tensor, layout, mask kind, head dim, training mode and int64 path that selects different
code, at realistic sizes (the kernels never run, so sizes cost nothing but allocation). Each
recorded launch gives the kernel, its argument types as Triton's JIT would specialize them (an
integer equal to 1 becomes a constant, as at run time) and its constexprs. The launch's own
constexprs plus each autotune config (after the kernel's own pruning, as the autotuner would prune
it) give the compile jobs. The grid each config implies is checked against CUDA's limits (x < 2^31,
y and z < 65536).

Coverage: the first variant of each (kernel, input dtype) is compiled with every autotune
config; the other flag variants (activation, residual, mask, ...) with the first config of their
pruned list, unless --full (the whole product). Reported per compile: registers, local memory (the
spill and stack bytes per thread, cuobjdump -res-usage), shared memory; a non-autotuned kernel that
needs more shared memory than the architecture has is an error, an autotune config that does is a
warning (the autotuner skips it at run time). What this proves: the kernels compile to sm_80/sm_90
cubins under the installed Triton. What it does not: that they run, or run correctly.

Usage:
    python scripts/aot_compile_all.py [--archs 80,90] [--jobs 2] [--full] [--quick] [--only NAME]
                                      [--json out.json]
    AOT_LIST=1 python scripts/aot_compile_all.py   # the number of compile jobs per kernel, no compiling
Exit status: 0 when every job compiled and every grid is within limits, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # max dynamic shared memory per block
SMS = {80: 108, 90: 132}


# ----------------------------------------------------------------------------------------------
# Worker: capture the launches, then compile them.

def _patch_environment(arch: int):
    """Interpreter off, the Triton backend selectable for CPU tensors, launches recorded."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["FASTNETS_POISON"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, ROOT)
    import types

    import torch

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, grid, args, kwargs, _CASE[0]))
            return launch

    torch.library.wrap_triton = Recorder
    props = types.SimpleNamespace(multi_processor_count=SMS.get(arch, 108), name=f"sm_{arch} (compile only)",
                                  major=arch // 10, minor=arch % 10)
    torch.cuda.get_device_properties = lambda *a, **k: props
    # The kernel modules read the architecture at import (kernels/conv.py adds sm_90 tiles).
    real_avail, real_cap = torch.cuda.is_available, torch.cuda.get_device_capability
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda *a, **k: (arch // 10, arch % 10)
    try:
        import fastnets  # noqa: F401
        from fastnets.kernels import (attention, attention_bwd, bias_act, conv, conv_depthwise,  # noqa: F401
                                      layer_norm, lrn, norm_act, pool)
    finally:
        torch.cuda.is_available, torch.cuda.get_device_capability = real_avail, real_cap
    from fastnets import _dispatch

    _dispatch._triton_status = lambda device: (True, None)
    return launches


_CASE = ["?"]  # the case being captured, for the report
_JITS = []  # the JITFunctions of the jobs (a job names its function by index: forked workers share this)


def _cases(quick: bool):
    """(name, function) pairs; each calls public ops (forward and backward) under the Triton backend."""
    import torch

    import fastnets
    from fastnets import functional as FF
    from fastnets.kernels import attention as KA
    from fastnets.kernels import pool as KP
    from fastnets.ops import attention as OA

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    dtypes = [f16] if quick else [f32, f16, bf16]
    acts = ["relu", "relu6", "silu", "gelu", "sigmoid", None]

    def t(*shape, dtype=f32, cl=False, grad=False):
        x = torch.empty(*shape, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(grad)

    def back(*outs):
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])

    cases = []

    def case(name):
        def register(fn):
            cases.append((name, fn))
            return fn
        return register

    # pooling -------------------------------------------------------------------------------
    for dt in dtypes:
        for cl in (False, True):
            tag = f"pool {dt} {'nhwc' if cl else 'nchw'}"

            @case(tag + " max 3x3/2 fwd+bwd, avg, adaptive, global")
            def _(dt=dt, cl=cl):
                x = t(8, 64, 56, 56, dtype=dt, cl=cl, grad=True)
                back(FF.max_pool2d(x, 3, 2, 1))
                FF.max_pool2d(x.detach(), 2)  # no indices
                back(FF.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
                y = t(8, 256, 13, 13, dtype=dt, cl=cl, grad=True)
                back(FF.adaptive_avg_pool2d(y, 6), FF.adaptive_max_pool2d(y, (5, 7)))
                z = t(8, 512, 7, 7, dtype=dt, cl=cl, grad=True)
                back(FF.adaptive_avg_pool2d(z, 1), FF.adaptive_max_pool2d(z, 1))
                FF.adaptive_max_pool2d(z.detach(), 1, return_indices=True)
                if quick:
                    return
                saved = KP._I32_MAX  # the int64 (WIDE) variants, as for tensors past 2^31 elements
                KP._I32_MAX = -1
                try:
                    back(FF.max_pool2d(x, 3, 2, 1), FF.adaptive_avg_pool2d(z, 1), FF.adaptive_max_pool2d(z, 1))
                    back(FF.avg_pool2d(x, 2))
                finally:
                    KP._I32_MAX = saved

    # conv + batch-norm + activation ----------------------------------------------------------
    conv_dtypes = [(f16, True)] if quick else [(f32, True), (f32, False), (f16, True), (bf16, True)]
    for dt, tf32 in conv_dtypes:
        tag = f"conv {dt}{' tf32' if dt == f32 and tf32 else ''}"

        def bn(c, dt=dt):
            return dict(running_mean=torch.zeros(c, dtype=dt), running_var=torch.ones(c, dtype=dt),
                        bn_weight=torch.ones(c, dtype=dt), bn_bias=torch.zeros(c, dtype=dt))

        @case(tag + " eval/train/grad, gemm and depthwise")
        def _(dt=dt, tf32=tf32, bn=bn):
            torch.backends.cudnn.allow_tf32 = tf32
            x = t(8, 64, 28, 28, dtype=dt, cl=True)
            w = t(64, 64, 3, 3, dtype=dt)
            r = t(8, 64, 28, 28, dtype=dt, cl=True)
            for act in (acts if (dt == f16 and not quick) else ["relu"]):
                FF.conv_bn_act(x, w, None, **bn(64), padding=1, activation=act)
                FF.conv_bn_act(x, w, None, **bn(64), padding=1, activation=act, residual=r)
            if not quick:
                FF.conv_bn_act(t(8, 3, 64, 64, dtype=dt, cl=True), t(64, 3, 7, 7, dtype=dt), None, **bn(64),
                               stride=2, padding=3)  # stem: flattened reduction
                FF.conv_bn_act(x, t(256, 64, 1, 1, dtype=dt), t(256, dtype=dt), activation=None)  # 1x1, conv bias
                FF.conv_bn_act(x, t(64, 16, 3, 3, dtype=dt), None, **bn(64), padding=1, groups=4)  # grouped
            for act in (["silu"] if quick else ["silu", "relu"]):  # depthwise
                FF.conv_bn_act(x, t(64, 1, 3, 3, dtype=dt), None, **bn(64), padding=1, groups=64, activation=act)
                FF.conv_bn_act(x, t(64, 1, 5, 5, dtype=dt), None, **bn(64), padding=2, groups=64, activation=act,
                               residual=r)
            # training (statistics epilogue, then batch_norm_act_train) and backward, small shapes
            xs = t(2, 16, 9, 9, dtype=dt, cl=True, grad=True)
            for wshape, groups in (((16, 16, 3, 3), 1), ((16, 1, 3, 3), 16)):
                ws = t(*wshape, dtype=dt, grad=True)
                p = {k: v.float().requires_grad_() if "bn_" in k else v.float() for k, v in bn(16).items()}
                back(FF.conv_bn_act(xs, ws, None, **p, padding=1, groups=groups, training=True, activation="silu"))
                back(FF.conv_bn_act(xs, ws, None, padding=1, groups=groups, activation="gelu"))  # save_z, act grad
                back(FF.conv_bn_act(xs, ws, None, **p, padding=1, groups=groups, activation="relu"))  # unfolded eval

    # batch-norm + activation -----------------------------------------------------------------
    for dt in dtypes:
        for cl in (False, True):
            tag = f"norm_act {dt} {'nhwc' if cl else 'nchw'}"

            @case(tag)
            def _(dt=dt, cl=cl):
                C = 64
                x = t(8, C, 56, 56, dtype=dt, cl=cl, grad=True)
                r = t(8, C, 56, 56, dtype=dt, cl=cl, grad=True)
                w, b = t(C, grad=True), t(C, grad=True)
                for training in (True, False):
                    rm, rv = torch.zeros(C), torch.ones(C)
                    back(FF.batch_norm_act(x, rm, rv, w, b, training, activation="relu", residual=r))
                if quick:
                    return
                for act in acts:
                    back(FF.batch_norm_act(x, torch.zeros(C), torch.ones(C), None, None, True, activation=act))
                back(FF.batch_norm_act(x, None, None, w.detach(), b.detach(), True, activation="silu"))
                back(FF.batch_norm_act(t(512, C, dtype=dt, grad=True), torch.zeros(C), torch.ones(C), w, None,
                                       False, activation=None))

    # LRN ---------------------------------------------------------------------------------------
    for dt in dtypes:
        @case(f"lrn {dt}")
        def _(dt=dt):
            back(FF.local_response_norm(t(8, 96, 55, 55, dtype=dt, grad=True), 5, 1e-4, 0.75, 2.0))
            if quick:
                return
            back(FF.local_response_norm(t(8, 96, 55, 55, dtype=dt, cl=True, grad=True), 5))
            back(FF.local_response_norm(t(8, 96, 300, dtype=dt, grad=True), 3))
            v = t(4, 6, 5, 7, 9, dtype=dt).permute(0, 1, 4, 2, 3).requires_grad_()  # 2 spatial strides
            back(FF.local_response_norm(v, 4, beta=2.0))
            v = t(2, 5, 6, 7, 8, 9, dtype=dt).permute(0, 1, 5, 3, 2, 4).requires_grad_()  # 3 spatial strides
            back(FF.local_response_norm(v, 4, beta=0.0))

    # layer norm ----------------------------------------------------------------------------------
    for dt in dtypes:
        @case(f"layer_norm {dt}")
        def _(dt=dt):
            for N in ((768,) if quick else (768, 1000, 12288)):
                x, r = t(64, N, dtype=dt, grad=True), t(64, N, dtype=dt, grad=True)
                w, b = t(N, dtype=dt, grad=True), t(N, dtype=dt, grad=True)
                back(FF.layer_norm(x, (N,), w, b, residual=r))
                if quick:
                    continue
                back(FF.layer_norm(x, (N,)))
                back(*FF.add_layer_norm(x, r, (N,), w, b))
                back(FF.layer_norm(x, (N,), w.detach().float().requires_grad_(), None))

    # bias + activation ---------------------------------------------------------------------------
    for dt in dtypes:
        @case(f"bias_act {dt}")
        def _(dt=dt):
            x = t(512, 3072, dtype=dt, grad=True)
            for act in (["gelu"] if quick else acts):
                back(FF.bias_act(x, t(3072, dtype=dt, grad=True), act))
            if quick:
                return
            back(FF.bias_act(x, None, "relu"))
            back(FF.bias_act(x, t(3072, grad=True), "silu"))  # float32 bias
            back(FF.bias_act(x, t(3072, dtype=dt), "gelu"))  # no bias gradient

    # attention -----------------------------------------------------------------------------------
    att_dtypes = [(f16, False)] if quick else [(f32, False), (f32, True), (f16, False), (bf16, False)]
    for dt, tf32 in att_dtypes:
        @case(f"attention {dt}{' tf32' if tf32 else ''}")
        def _(dt=dt, tf32=tf32):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            L = 256
            dims = [64] if quick else ([16, 32, 40, 64, 80, 128, 256] if dt == f16 else [64, 128])
            for E in dims:
                q, k, v = (t(2, 4, L, E, dtype=dt, grad=True) for _ in range(3))
                back(FF.scaled_dot_product_attention(q, k, v))
                if not quick:
                    back(FF.scaled_dot_product_attention(q, k, v, is_causal=True))
            E = 64
            q, k, v = (t(2, 4, L, E, dtype=dt, grad=True) for _ in range(3))
            OA.dropout_mask(OA.draw_seed(q.device), 2, 4, L, L, 0.1, backend="triton")
            if quick:
                return
            back(FF.scaled_dot_product_attention(q, k, v, attn_mask=torch.empty(L, L, dtype=torch.bool)))
            back(FF.scaled_dot_product_attention(q, k, v, attn_mask=t(2, 1, L, L, grad=True)))  # float mask grad
            back(FF.scaled_dot_product_attention(q, k, v, attn_mask=t(L, L, dtype=dt)))
            back(FF.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True))
            kg, vg = t(2, 2, L, E, dtype=dt, grad=True), t(2, 2, L, 32, dtype=dt, grad=True)
            back(FF.scaled_dot_product_attention(q, kg, vg, enable_gqa=True))  # GQA, value head dim 32
            saved = KA.needs_int64  # the int64 offset variant (views whose offsets pass 2^31)
            from fastnets.kernels import attention_bwd as KB
            KA.needs_int64 = KB.needs_int64 = lambda *views: True
            try:
                back(FF.scaled_dot_product_attention(q, k, v, is_causal=True))
            finally:
                KA.needs_int64 = KB.needs_int64 = saved

    return cases


def _signature(kernel, args, kwargs):
    """(jit function, {arg: type} with "constexpr" entries, {name: constexpr value}, options)."""
    from triton.runtime.jit import JITFunction, mangle_type

    jit = kernel
    while not isinstance(jit, JITFunction):  # an Autotuner (or a Heuristics) wraps the JITFunction
        jit = jit.fn
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    names = jit.arg_names
    bound = dict(zip(names, args))
    bound.update(kwargs)
    sig, constexprs = {}, {}
    for p in jit.params:
        name = p.name
        if p.is_constexpr:
            if name in bound:
                constexprs[name] = bound[name]
            continue
        if name not in bound:
            raise TypeError(f"{jit.__name__}: argument {name} was not given")
        value = bound[name]
        kind = mangle_type(value, not getattr(p, "do_not_specialize", False))
        if kind == "constexpr":  # Triton's JIT makes an integer 1 (and None) a constant
            constexprs[name] = value
        sig[name] = kind
    return jit, sig, constexprs, options, bound


def _grid_ok(grid, meta) -> str | None:
    g = grid(meta) if callable(grid) else grid
    g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
    if g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
        return f"grid {g} exceeds CUDA's limits (x < 2^31, y and z < 65536)"
    return None


def _jobs(launches, full: bool):
    """Deduplicated compile jobs from the recorded launches."""
    jobs, seen, primary = [], set(), set()
    for kernel, grid, args, kwargs, case in launches:
        jit, sig, constexprs, options, bound = _signature(kernel, args, dict(kwargs))
        configs = list(getattr(kernel, "configs", None) or [None])
        prune = getattr(kernel, "early_config_prune", None)
        if prune is not None and configs[0] is not None:
            configs = prune(configs, bound)
        autotuned = configs[0] is not None
        first_ptr = next((s for s in sig.values() if s.startswith("*")), None)  # the input's dtype
        family = (jit.__module__, jit.__name__, first_ptr)
        all_configs = full or family not in primary
        primary.add(family)
        for cfg in (configs if all_configs else configs[:1]):
            cx = dict(constexprs)
            opts = {"num_warps": 4, "num_stages": 3, **options}
            if cfg is not None:
                cx.update(cfg.kwargs)
                opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            key = (jit.__module__, jit.__name__, tuple(sorted(sig.items())), tuple(sorted(cx.items(), key=str)),
                   tuple(sorted(opts.items())))
            if key in seen:
                continue
            seen.add(key)
            grid_error = _grid_ok(grid, {**bound, **cx})
            if jit not in _JITS:
                _JITS.append(jit)
            jobs.append(dict(jit=_JITS.index(jit), module=jit.__module__, kernel=jit.__name__, sig=sig, constexprs=cx, options=opts,
                             autotuned=autotuned, case=case, grid_error=grid_error))
    return jobs


def _resources(cubin: bytes) -> dict:
    import tempfile

    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        if "REG:" in line:
            for item in line.split():
                k, _, v = item.partition(":")
                if k in ("REG", "STACK", "SHARED", "LOCAL") and v.isdigit():
                    res[k] = int(v)
    return res


def _compile(job, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _JITS[job["jit"]]
    sig = {n: ("constexpr" if n in job["constexprs"] else s) for n, s in job["sig"].items()}
    for n in job["constexprs"]:
        sig[n] = "constexpr"
    t0 = time.time()
    try:
        ck = triton.compile(ASTSource(fn, signature=sig, constexprs=job["constexprs"]),
                            target=GPUTarget("cuda", arch, 32), options=dict(job["options"]))
    except Exception as exc:  # noqa: BLE001 - the compiler's message is the result
        msg = f"{type(exc).__name__}: {exc}"
        return dict(ok=False, error=msg[-3000:], seconds=time.time() - t0)
    res = _resources(ck.asm["cubin"])
    res["dyn_shared"] = int(getattr(ck.metadata, "shared", 0))
    return dict(ok=True, seconds=time.time() - t0, **res)


def _describe(job) -> str:
    dts = sorted({s[1:] for s in job["sig"].values() if s.startswith("*") and s[1:] not in ("i64", "u8", "u1")})
    cx = ",".join(f"{k}={v}" for k, v in job["constexprs"].items())
    o = job["options"]
    return (f"{job['module'].rsplit('.', 1)[-1]}.{job['kernel']} [{'/'.join(dts)}] {{{cx}}} "
            f"w{o.get('num_warps')} s{o.get('num_stages')}")


def _compile_one(args):
    job, arch = args
    return job, _compile(job, arch)


def worker(arch: int, quick: bool, full: bool, jobs_n: int, json_path: str | None, only: str | None = None) -> int:
    launches = _patch_environment(arch)
    import torch

    import fastnets

    capture_errors = []
    t0 = time.time()
    with fastnets.use_backend("triton"):
        for name, fn in _cases(quick):
            if only and only not in name:
                continue
            _CASE[0] = name
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a Python error in a launcher is a finding
                capture_errors.append(f"{name}: {type(exc).__name__}: {exc}")
            finally:
                torch.backends.cudnn.allow_tf32 = True
                torch.backends.cuda.matmul.allow_tf32 = False
    jobs = _jobs(launches, full)
    if quick:  # one job per kernel
        by_kernel = {}
        for j in jobs:
            by_kernel.setdefault((j["module"], j["kernel"]), j)
        jobs = list(by_kernel.values())
    print(f"sm_{arch}: {len(launches)} launches recorded in {time.time() - t0:.1f}s -> {len(jobs)} compile jobs "
          f"({len({(j['module'], j['kernel']) for j in jobs})} kernels)", flush=True)
    for e in capture_errors:
        print(f"CAPTURE-ERROR sm_{arch} {e}", flush=True)
    if os.environ.get("AOT_LIST"):  # the jobs per kernel, without compiling
        from collections import Counter

        for (m, k), n in sorted(Counter((j["module"], j["kernel"]) for j in jobs).items()):
            print(f"  {n:5d} {m}.{k}")
        return 1 if capture_errors else 0

    results = []
    if jobs_n > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs_n) as pool:
            it = pool.imap(_compile_one, [(j, arch) for j in jobs])
            for job, res in it:
                results.append(_report(job, res, arch))
    else:
        for job in jobs:
            results.append(_report(job, _compile(job, arch), arch))
    failed = [r for r in results if r["status"] == "FAIL"]
    warned = [r for r in results if r["status"] == "WARN"]
    spills = [r for r in results if r.get("LOCAL", 0) > 0]
    regs = max((r.get("REG", 0) for r in results), default=0)
    print(f"SUMMARY sm_{arch}: {len(results)} compiled, {len(failed)} failed, {len(warned)} warnings, "
          f"{len(capture_errors)} capture errors, {len(spills)} with local memory (spills), max {regs} registers, "
          f"{sum(r['seconds'] for r in results):.0f}s compiling", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(arch=arch, results=results, capture_errors=capture_errors), f, indent=1, default=str)
    return 1 if (failed or capture_errors) else 0


def _report(job, res, arch):
    status, notes = "ok", []
    if not res["ok"]:
        status = "FAIL"
        notes.append(res["error"].replace("\n", " | "))
    else:
        limit = SHARED_LIMIT.get(arch)
        if limit and res["dyn_shared"] > limit:
            status = "WARN" if job["autotuned"] else "FAIL"
            notes.append(f"needs {res['dyn_shared']} B of shared memory, sm_{arch} has {limit}"
                         + (" (the autotuner skips this config)" if job["autotuned"] else ""))
        threads = 32 * job["options"]["num_warps"]
        if res.get("REG", 0) * threads > 65536:
            status = "FAIL"
            notes.append(f"{res['REG']} registers x {threads} threads exceed the 64K register file")
    if job["grid_error"]:
        status = "FAIL"
        notes.append(job["grid_error"])
    info = (f"REG={res.get('REG', '?')} LOCAL={res.get('LOCAL', '?')} SHARED={res.get('dyn_shared', '?')}"
            if res["ok"] else "")
    print(f"{status:4} sm_{arch} {res['seconds']:5.1f}s {_describe(job)} {info} "
          f"({job['case']}){' -- ' + '; '.join(notes) if notes else ''}", flush=True)
    return dict(status=status, kernel=f"{job['module']}.{job['kernel']}", sig=job["sig"],
                constexprs={k: str(v) for k, v in job["constexprs"].items()}, options=job["options"],
                case=job["case"], notes=notes, seconds=round(res["seconds"], 2),
                **{k: v for k, v in res.items() if k in ("REG", "LOCAL", "STACK", "SHARED", "dyn_shared")})


# ----------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiles per architecture")
    parser.add_argument("--full", action="store_true", help="every config for every flag variant")
    parser.add_argument("--quick", action="store_true", help="one fp16 variant of each kernel (the CPU test)")
    parser.add_argument("--json", help="write the per-compile results here (one file per arch: .smXX.json)")
    parser.add_argument("--only", help="only the cases whose name contains this (e.g. 'bias_act')")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.worker, a.quick, a.full, a.jobs, a.json, a.only)

    import triton

    print(f"Triton {triton.__version__}, Python {sys.version.split()[0]}; compile-only targets: sm_{a.archs}; "
          f"{'quick subset' if a.quick else 'full product' if a.full else 'all configs per dtype, one per flag'}",
          flush=True)
    status = 0
    for arch in (int(s) for s in a.archs.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(arch), "--jobs", str(a.jobs)]
        cmd += ["--quick"] if a.quick else []
        cmd += ["--full"] if a.full else []
        cmd += ["--only", a.only] if a.only else []
        if a.json:
            cmd += ["--json", f"{os.path.splitext(a.json)[0]}.sm{arch}.json"]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        rc = subprocess.call(cmd, env=env)
        status = status or rc
    print("RESULT:", "every kernel compiled" if status == 0 else "FAILURES (see FAIL / CAPTURE-ERROR lines)")
    return status


if __name__ == "__main__":
    sys.exit(main())
