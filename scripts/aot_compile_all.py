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
code, at realistic sizes (the kernels never run, so sizes cost nothing but allocation); with
--models, also the forward of ResNet-50, VGG-16, EfficientNet-B0 and ViT-B/16 at batch 32 and 256
(scripts/model_shapes.py), so the launch values are those of the model family's real layers.

How a launch is specialized: exactly as Triton's JIT does it at run time, by Triton's own code. A
fake driver answers the JIT's questions (device, stream, target = GPUTarget("cuda", arch, 32)) and
triton.compile is replaced by a recorder; then, for each autotune config the Autotuner would time
(its own prune_configs: the kernel's early_config_prune), JITFunction.run(*args, warmup=True,
**kwargs, **config.all_kwargs()) runs on the real launch values. What the JIT hands to
triton.compile is the job: its ASTSource (signature; constants, including integers equal to 1;
attributes, tt.divisibility=16 on the pointers whose data_ptr is 16-byte aligned and the integers
divisible by 16, unless the kernel opts out) and its parsed options. The worker then calls the
real triton.compile on exactly that. `--specializations aot|runtime` prints these specializations
as this tool makes them, or as Triton's real launch path (wrap_triton, Autotuner, JIT, compile
intercepted) makes them, and tests/test_sass_audit.py checks that the two agree. The grid each
config implies is checked against CUDA's limits (x < 2^31, y and z < 65536).

Coverage: the first variant of each (kernel, input dtype) is compiled with every autotune
config; the other flag variants (activation, residual, mask, ...) with the first config of their
pruned list, unless --full (the whole product). --audit is the set scripts/sass_audit.py reads
(the synthetic cases in fp16, the model layers, the anchors of scripts/audit_anchors.py; every
config only for the first fp16 and fp32 launch of a kernel). Reported per compile: registers,
local memory (the spill and stack bytes per thread, cuobjdump -res-usage), shared memory, the
arguments with tt.divisibility=16; --cubins keeps each cubin. A non-autotuned kernel that needs
more shared memory than the architecture has is an error, an autotune config that does is a
warning (the autotuner skips it at run time). What this proves: the kernels compile to sm_80/sm_90
cubins under the installed Triton, as the JIT would compile them. What it does not: that they run,
or run correctly.

Usage:
    python scripts/aot_compile_all.py [--archs 80,90] [--jobs 2] [--full] [--quick] [--only NAME[,NAME]]
                                      [--json out.json] [--cubins DIR] [--models resnet50,...] [--audit]
                                      [--root TREE] [--specializations aot|runtime]
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

class _FakeDriver:
    """Stands in for Triton's CUDA driver in a process without a GPU: the JIT asks it for the
    current device, stream and target, and nothing else before it compiles (a warmup call)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        """The autotuner's timer, for the real launch path: calls the candidate once (so the JIT
        specializes and "compiles" it, as on a GPU) and reports the same time for every one."""
        def bench(fn, quantiles=None, **kw):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench

    def set_current_device(self, device):
        pass


class _FakeKernel:
    """What the intercepted compile returns to the JIT: launching it does nothing."""

    def __init__(self, record):
        self.record = record
        self.function = self.packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        pass

    def __getitem__(self, grid):
        return lambda *a, **k: None


COMPILED = []  # (ASTSource, target, options dict) as the JIT handed them to triton.compile
_REAL_COMPILE = []


def intercept_jit(arch: int):
    """Makes Triton's JIT specialize and "compile" without a GPU: a fake driver answers for the
    target, and triton.compile is replaced by a recorder of exactly what the JIT passes to it (its
    ASTSource with signature, constexprs and attributes such as tt.divisibility, and its parsed
    options). JITFunction.run's own specialization code runs unchanged on the real launch values."""
    import triton.compiler
    from triton.runtime import driver

    driver.set_active(_FakeDriver(arch))
    if not _REAL_COMPILE:
        _REAL_COMPILE.append(triton.compiler.compile)

    def recording_compile(src, target=None, options=None, _env_vars=None):
        COMPILED.append((src, target, dict(options or {})))
        return _FakeKernel(COMPILED[-1])

    triton.compiler.compile = recording_compile
    return COMPILED


def _patch_environment(arch: int, root: str = ROOT, record: bool = True):
    """Interpreter off, the Triton backend selectable for CPU tensors, launches recorded (with
    record=False they go through Triton's real launch path, JIT and Autotuner, whose compiles are
    intercepted: see runtime_specializations)."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["FASTNETS_POISON"] = "0"
    os.environ["FASTNETS_AUTOTUNE_CACHE"] = "0"  # no timings of the fake benchmarker on disk
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, root)
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

    if record:
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
        import fastnets.kernels as K
        for info in __import__("pkgutil").iter_modules(K.__path__):
            if not info.name.startswith("_"):
                __import__(f"fastnets.kernels.{info.name}")
    finally:
        torch.cuda.is_available, torch.cuda.get_device_capability = real_avail, real_cap
    from fastnets import _dispatch

    _dispatch._triton_status = lambda device: (True, None)
    intercept_jit(arch)
    return launches


_CASE = ["?"]  # the case being captured, for the report


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
        # AlexNet's and ZFNet's LRN layers (96 x 55x55, 256 x 27x27, 256 x 13x13). NCHW with an odd
        # plane (every channel row 2 bytes off alignment in fp16) is not a fast path (the audit
        # reads the plane's width from the launch); channels_last and an NCHW plane that is a
        # multiple of 8 positions (16 bytes of fp16) are.
        @case(f"lrn {dt} nchw alexnet 55x55 (odd plane)")
        def _(dt=dt):
            back(FF.local_response_norm(t(8, 96, 55, 55, dtype=dt, grad=True), 5, 1e-4, 0.75, 2.0))

        @case(f"lrn {dt} channels_last alexnet/zfnet")
        def _(dt=dt):
            for c, hw in ((96, 55), (256, 27), (256, 13)):
                back(FF.local_response_norm(t(8, c, hw, hw, dtype=dt, cl=True, grad=True), 5, 5e-4, 0.75, 2.0))

        @case(f"lrn {dt} contiguous 56x56")
        def _(dt=dt):
            back(FF.local_response_norm(t(8, 96, 56, 56, dtype=dt, grad=True), 5, 5e-4, 0.75, 2.0))

        @case(f"lrn {dt} other layouts")
        def _(dt=dt):
            if quick:
                return
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


def _unwrap(kernel):
    """The JITFunction under an Autotuner (or Heuristics) wrapper."""
    from triton.runtime.jit import JITFunction

    jit = kernel
    while not isinstance(jit, JITFunction):
        jit = jit.fn
    return jit


def _grid_ok(grid, meta) -> str | None:
    g = grid(meta) if callable(grid) else grid
    g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
    if g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
        return f"grid {g} exceeds CUDA's limits (x < 2^31, y and z < 65536)"
    return None


def autotune_configs(kernel, args, kwargs):
    """The configs Triton's Autotuner would time for this launch (its own prune_configs: the
    kernel's early_config_prune and perf model), or [None] for a kernel that is not autotuned."""
    configs = getattr(kernel, "configs", None)
    if not configs:
        return [None]
    if len(configs) == 1:
        return list(configs)
    kernel.nargs = dict(zip(kernel.arg_names, args))
    try:
        return list(kernel.prune_configs(dict(kwargs)))
    finally:
        kernel.nargs = None


def jit_specialize(kernel, grid, args, kwargs, config=None):
    """Runs Triton's own JITFunction.run (warmup: compile, no launch) on the real launch values,
    with the config's meta-parameters and options merged as the Autotuner merges them. Returns
    the (ASTSource, target, options) the JIT passed to triton.compile, or None when the JIT's
    kernel cache already held this specialization (the same compile as an earlier job)."""
    jit = _unwrap(kernel)
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    n = len(COMPILED)
    jit.run(*args, grid=grid, warmup=True, **kw)
    return COMPILED[n] if len(COMPILED) > n else None


def describe_src(src) -> dict:
    """Names for a JIT-made ASTSource: {arg: type} (constexpr for constants), constants by name,
    and the arguments with tt.divisibility=16."""
    names = src.fn.arg_names
    const = {}
    for path, v in src.constants.items():
        name = names[path[0]] + "".join(f"[{i}]" for i in path[1:])
        const[name] = v
    attrs = {}
    for path, items in src.attrs.items():
        name = names[path[0]] + "".join(f"[{i}]" for i in path[1:])
        for k, v in items:
            attrs.setdefault(name, {})[k] = v
    div16 = sorted(n for n, a in attrs.items() if a.get("tt.divisibility") == 16)
    return dict(signature=dict(src.signature), constants=const, attrs=attrs, div16=div16)


def _dtype_of(args) -> str:
    """The dtype of the first tensor argument (the kernel's input), e.g. 'float16'."""
    return next((str(a.dtype).replace("torch.", "") for a in args if hasattr(a, "data_ptr")), "?")


def spec_of(rec) -> dict:
    """What decides the machine code of one compile: the kernel, the JIT's signature, constants and
    attributes (by argument name) and every compile option (JSON-able, for comparisons)."""
    src, target, options = rec
    d = describe_src(src)
    return dict(kernel=src.fn.__name__, target=f"{target.backend}:{target.arch}", signature=d["signature"],
                constants={k: str(v) for k, v in d["constants"].items()}, attrs=d["attrs"],
                options={k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                         for k, v in sorted(options.items())})


def specializations(arch: int, mode: str, only: str, root: str = ROOT) -> list[dict]:
    """The compiles of the cases matching `only` (and the anchors with their mutants) for arch:
    mode "aot": as this tool makes them (recorded launches -> autotune configs -> JIT warmup);
    mode "runtime": as Triton's real launch path makes them at run time (kernel[grid](...) through
    torch.library.wrap_triton, the Autotuner timing every pruned candidate, JITFunction.run), with
    only the device faked and triton.compile intercepted. The two must agree (tests/test_sass_audit.py)."""
    if mode == "aot":
        os.environ["AUDIT_MUTANTS"] = "1"
        launches, errors = capture(arch, True, only, root, anchors=True)
        if errors:
            raise RuntimeError("; ".join(errors))
        return [spec_of(COMPILED[j["src"]]) for j in _jobs(launches, True)]
    _patch_environment(arch, root, record=False)
    import torch

    import audit_anchors
    import fastnets

    for name, kernel, grid, args, kwargs in audit_anchors.launches() + audit_anchors.mutants():
        kernel[grid](*args, **kwargs)
    with fastnets.use_backend("triton"):
        for name, fn in _cases(True):
            if any(o in name for o in only.split(",")):
                fn()
                torch.backends.cudnn.allow_tf32 = True
                torch.backends.cuda.matmul.allow_tf32 = False
    return [spec_of(rec) for rec in COMPILED]


def _jobs(launches, full: bool, all_config_dtypes=None):
    """Deduplicated compile jobs from the recorded launches, each specialized by the JIT itself.
    The first launch of each (kernel, input dtype) gets every autotune config (all launches with
    `full`; with all_config_dtypes, only the input dtypes named), the others the first config."""
    jobs, primary = [], set()
    for kernel, grid, args, kwargs, case in launches:
        jit = _unwrap(kernel)
        kwargs = dict(kwargs)
        configs = autotune_configs(kernel, args, kwargs)
        autotuned = configs[0] is not None and len(getattr(kernel, "configs", [])) > 1
        family = (jit.__module__, jit.__name__, _dtype_of(args))
        all_configs = full or (family not in primary and (all_config_dtypes is None or family[2] in all_config_dtypes))
        primary.add(family)
        bound = dict(zip(jit.arg_names, args), **kwargs)
        t = next((a for a in args if hasattr(a, "data_ptr") and hasattr(a, "stride")), None)
        lead = None if t is None else dict(shape=list(t.shape), stride=list(t.stride()), itemsize=t.element_size())
        for i, cfg in enumerate(configs if all_configs else configs[:1]):
            rec = jit_specialize(kernel, grid, args, kwargs, cfg)
            if rec is None:
                continue
            src, target, options = rec
            cx = dict(cfg.kwargs) if cfg is not None else {}
            d = describe_src(src)
            opts = {k: options.get(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in options}
            jobs.append(dict(src=COMPILED.index(rec), module=jit.__module__, kernel=jit.__name__, dtype=family[2],
                             sig=d["signature"],
                             constexprs=d["constants"], div16=d["div16"], options=opts, autotuned=autotuned,
                             config_index=i, n_configs=len(configs), case=case, lead=lead,
                             grid_error=_grid_ok(grid, {**bound, **cx})))
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


def _compile(job, arch, cubin_dir=None):
    """triton.compile on exactly what the JIT handed over (the same call JITFunction._do_compile
    makes); the cubin is kept in cubin_dir when given."""
    src, target, options = COMPILED[job["src"]]
    t0 = time.time()
    try:
        ck = _REAL_COMPILE[0](src, target=target, options=dict(options))
    except Exception as exc:  # noqa: BLE001 - the compiler's message is the result
        msg = f"{type(exc).__name__}: {exc}"
        return dict(ok=False, error=msg[-3000:], seconds=time.time() - t0)
    res = _resources(ck.asm["cubin"])
    res["dyn_shared"] = int(getattr(ck.metadata, "shared", 0))
    if cubin_dir:
        name = f"{job['id']}.cubin"
        with open(os.path.join(cubin_dir, name), "wb") as f:
            f.write(ck.asm["cubin"])
        res["cubin"] = name
        res["function"] = ck.metadata.name
    return dict(ok=True, seconds=time.time() - t0, **res)


def _describe(job) -> str:
    dts = sorted({s[1:] for s in job["sig"].values() if s.startswith("*") and s[1:] not in ("i64", "u8", "u1")})
    cx = ",".join(f"{k}={v}" for k, v in job["constexprs"].items())
    o = job["options"]
    return (f"{job['module'].rsplit('.', 1)[-1]}.{job['kernel']} [{'/'.join(dts)}] {{{cx}}} "
            f"w{o.get('num_warps')} s{o.get('num_stages')}")


def _compile_one(args):
    job, arch, cubin_dir = args
    return job, _compile(job, arch, cubin_dir)


def capture(arch: int, quick: bool, only: str | None = None, root: str = ROOT, models: str | None = None,
            batches=(32, 256), anchors: bool = False, model_dtypes=("float16", "bfloat16", "float32")):
    """Records the launches of the cases (and of the model family's layers when `models` names
    some), in this process. Returns (launches, capture errors)."""
    launches = _patch_environment(arch, root)
    import torch

    import fastnets

    capture_errors = []
    cases = [] if only == "none" else _cases(quick)
    if models:
        import model_shapes  # scripts/model_shapes.py: the model family's layers at real batch sizes

        cases += model_shapes.cases(models.split(","), batches, model_dtypes)
    if anchors:  # scripts/audit_anchors.py: reference GEMM and attention kernels, through the same path
        import audit_anchors

        extra = audit_anchors.mutants() if os.environ.get("AUDIT_MUTANTS") == "1" else []
        for name, kernel, grid, args, kwargs in audit_anchors.launches() + extra:
            launches.append((kernel, grid, args, kwargs, name))
    with fastnets.use_backend("triton"):
        for name, fn in cases:
            if only and only != "none" and not any(o in name for o in only.split(",")):
                continue
            _CASE[0] = name
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a Python error in a launcher is a finding
                capture_errors.append(f"{name}: {type(exc).__name__}: {exc}")
            finally:
                torch.backends.cudnn.allow_tf32 = True
                torch.backends.cuda.matmul.allow_tf32 = False
    return launches, capture_errors


def worker(arch: int, quick: bool, full: bool, jobs_n: int, json_path: str | None, only: str | None = None,
           root: str = ROOT, cubin_dir: str | None = None, models: str | None = None, batches=(32, 256),
           audit: bool = False, kernels: str | None = None, quick_audit: bool = False,
           model_dtypes=("float16", "bfloat16", "float32")) -> int:
    t0 = time.time()
    audit = audit or quick_audit
    launches, capture_errors = capture(arch, quick or audit, only, root, models, batches, anchors=audit,
                                       model_dtypes=model_dtypes)
    if kernels:  # only these kernels (function names)
        launches = [l for l in launches if _unwrap(l[0]).__name__ in kernels.split(",")]
    jobs = _jobs(launches, full, () if quick_audit else ("float16", "float32") if audit else None)
    if quick_audit:  # the first job of each (kernel, case)
        by_case = {}
        for j in jobs:
            by_case.setdefault((j["module"], j["kernel"], j["case"]), j)
        jobs = list(by_case.values())
    if quick and not audit:  # one job per kernel
        by_kernel = {}
        for j in jobs:
            by_kernel.setdefault((j["module"], j["kernel"]), j)
        jobs = list(by_kernel.values())
    for i, j in enumerate(jobs):
        j["id"] = f"sm{arch}-{i:04d}-{j['kernel']}"
    if cubin_dir:
        os.makedirs(cubin_dir, exist_ok=True)
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
            it = pool.imap(_compile_one, [(j, arch, cubin_dir) for j in jobs])
            for job, res in it:
                results.append(_report(job, res, arch))
    else:
        for job in jobs:
            results.append(_report(job, _compile(job, arch, cubin_dir), arch))
    failed = [r for r in results if r["status"] == "FAIL"]
    warned = [r for r in results if r["status"] == "WARN"]
    spills = [r for r in results if r.get("LOCAL", 0) > 0 or r.get("STACK", 0) > 0]  # spills land in the stack frame
    regs = max((r.get("REG", 0) for r in results), default=0)
    print(f"SUMMARY sm_{arch}: {len(results)} compiled, {len(failed)} failed, {len(warned)} warnings, "
          f"{len(capture_errors)} capture errors, {len(spills)} with local memory (stack frame: spills), max {regs} "
          f"registers, "
          f"{sum(r['seconds'] for r in results):.0f}s compiling", flush=True)
    if json_path:
        import triton

        with open(json_path, "w") as f:
            json.dump(dict(arch=arch, triton=triton.__version__, results=results, capture_errors=capture_errors),
                      f, indent=1, default=str)
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
    info = (f"REG={res.get('REG', '?')} STACK={res.get('STACK', '?')} LOCAL={res.get('LOCAL', '?')} "
            f"SHARED={res.get('dyn_shared', '?')}"
            if res["ok"] else "")
    print(f"{status:4} sm_{arch} {res['seconds']:5.1f}s {_describe(job)} div16=[{','.join(job['div16'])}] {info} "
          f"({job['case']}){' -- ' + '; '.join(notes) if notes else ''}", flush=True)
    return dict(status=status, id=job["id"], kernel=f"{job['module']}.{job['kernel']}", dtype=job["dtype"],
                sig=job["sig"],
                constexprs={k: str(v) for k, v in job["constexprs"].items()}, div16=job["div16"],
                options=job["options"], autotuned=job["autotuned"], config_index=job["config_index"],
                n_configs=job["n_configs"], case=job["case"], lead=job.get("lead"), notes=notes,
                seconds=round(res["seconds"], 2),
                **{k: v for k, v in res.items() if k in ("REG", "LOCAL", "STACK", "SHARED", "dyn_shared", "cubin",
                                                         "function")})


# ----------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiles per architecture")
    parser.add_argument("--full", action="store_true", help="every config for every flag variant")
    parser.add_argument("--quick", action="store_true", help="one fp16 variant of each kernel (the CPU test)")
    parser.add_argument("--json", help="write the per-compile results here (one file per arch: .smXX.json)")
    parser.add_argument("--only", help="only the cases whose name contains this (e.g. 'bias_act'); 'none': "
                                       "no synthetic case (with --models: the model layers alone)")
    parser.add_argument("--models", help="also the layers of these models (resnet50,vgg16,efficientnet_b0,vit_b_16)")
    parser.add_argument("--batches", default="32,256", help="batch sizes of the model layers (default 32,256)")
    parser.add_argument("--model-dtypes", default="float16,bfloat16,float32",
                        help="dtypes of the model layers (16-bit ones channels_last, float32 NCHW)")
    parser.add_argument("--root", default=ROOT, help="the fastnets tree to compile (default: this checkout)")
    parser.add_argument("--cubins", help="keep each job's cubin in this folder (the SASS audit reads them)")
    parser.add_argument("--audit", action="store_true",
                        help="the SASS audit's set: the synthetic cases in fp16 (as --quick, every specialization "
                             "kept) plus the model layers; every autotune config for the first fp16 and fp32 "
                             "launch of each kernel, the first config elsewhere")
    parser.add_argument("--quick-audit", action="store_true",
                        help="as --audit, but the first config only and one job per (kernel, case)")
    parser.add_argument("--kernels", help="only these kernels (comma-separated function names)")
    parser.add_argument("--specializations", choices=("aot", "runtime"),
                        help="print (JSON) the JIT specializations of the --only cases for the first arch, as this "
                             "tool makes them or as Triton's run-time launch path makes them; no compiling")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args()
    batches = tuple(int(b) for b in a.batches.split(","))
    if a.specializations:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        specs = specializations(int(a.archs.split(",")[0]), a.specializations, a.only or "none", os.path.abspath(a.root))
        print(json.dumps(specs, sort_keys=True, default=str))
        return 0
    if a.worker:
        return worker(a.worker, a.quick, a.full, a.jobs, a.json, a.only, os.path.abspath(a.root), a.cubins, a.models,
                      batches, a.audit, a.kernels, a.quick_audit, tuple(a.model_dtypes.split(",")))

    import triton

    print(f"Triton {triton.__version__}, Python {sys.version.split()[0]}; compile-only targets: sm_{a.archs}; "
          f"{'quick subset' if a.quick else 'full product' if a.full else 'all configs per dtype, one per flag'}; "
          f"tree {os.path.abspath(a.root)}", flush=True)
    status = 0
    for arch in (int(s) for s in a.archs.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(arch), "--jobs", str(a.jobs),
               "--root", os.path.abspath(a.root), "--batches", a.batches, "--model-dtypes", a.model_dtypes]
        cmd += ["--quick"] if a.quick else []
        cmd += ["--full"] if a.full else []
        cmd += ["--audit"] if a.audit else []
        cmd += ["--quick-audit"] if a.quick_audit else []
        cmd += ["--kernels", a.kernels] if a.kernels else []
        cmd += ["--only", a.only] if a.only else []
        cmd += ["--models", a.models] if a.models else []
        cmd += ["--cubins", a.cubins] if a.cubins else []
        if a.json:
            cmd += ["--json", f"{os.path.splitext(a.json)[0]}.sm{arch}.json"]
        path = [os.path.abspath(a.root), os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        rc = subprocess.call(cmd, env=env)
        status = status or rc
    print("RESULT:", "every kernel compiled" if status == 0 else "FAILURES (see FAIL / CAPTURE-ERROR lines)")
    return status


if __name__ == "__main__":
    sys.exit(main())
