"""Stage 3 of scripts/gpu_run.py (headline numbers, same-run ratios) and the Triton precompile of
stage 1, over the benchmark harness (fastnets/bench: ops.py cases, models.py, roofline.py).

Items, most decisive first (a deadline drops from the end):
  ceilings        copy bandwidth (the yardstick of the memory-bound ops) and the fp16/bf16 matrix rate
  conv b64/b256   conv-bn-act, fp16, channels_last and NCHW, at four ResNet-50 shapes, against stock
                  conv -> bn -> relu (the case's own stock variants) and stock conv alone (conv_only/*)
  attention       forward, then backward, bf16, head dim 64 and 128, sequence 1k / 4k / 8k (16k
                  tokens a batch, d_model 2048), TFLOP/s against torch SDPA (the stock variant)
  memory-bound    max-pool, global avg-pool, BN-act (inference and training), LRN, fp16: GB/s as a
                  fraction of the measured copy bandwidth
  resnet50        inference batch 256 fp16: eager, fuse(), fuse() + CUDA graphs; one AMP training step
                  (the fused model's Triton kernels at fixed tile configs: autotuning every layer does
                  not fit the window)
The Measurement records are the benchmark's own (results.json is a fastnets.bench results file),
so fastnets/bench/report.py and measured.py read them as they read `python -m fastnets.bench`.
"""
from __future__ import annotations

import hashlib
import threading

import torch
import torch.nn.functional as F

from fastnets.bench import harness, models, ops

F16, BF16 = torch.float16, torch.bfloat16

# (name, desc, cin, cout, hw, k, kw): ResNet-50's layers (torchvision's definitions)
CONV_SHAPES = [
    ("resnet50.layer1.conv2", "3x3 64->64, 56", 64, 64, 56, 3, dict(padding=1)),
    ("resnet50.layer2.conv2", "3x3/2 128->128, 56->28", 128, 128, 56, 3, dict(stride=2, padding=1)),
    ("resnet50.layer3.conv2", "3x3 256->256, 14", 256, 256, 14, 3, dict(padding=1)),
    ("resnet50.layer4.conv3", "1x1 512->2048 +residual, 7", 512, 2048, 7, 1, dict(residual=True)),
]


class ConvAlone(ops.ConvBNAct):
    """The stock convolution alone (no batch-norm, no activation): the floor conv-bn-act is judged by."""
    op = "conv2d"

    def stock(self, inp):
        return F.conv2d(inp["x"], inp["w"], inp["b"], **self._conv_kw())


def conv_cases(batch: int) -> tuple[list, list]:
    fused, alone = [], []
    for name, desc, cin, cout, hw, k, kw in CONV_SHAPES:
        c = ops._conv(f"conv_bn_act/{name}.b{batch}", desc, cin, cout, hw, k, batch=batch, **kw)
        a = ConvAlone(f"conv_only/{name}.b{batch}", desc + ", stock conv alone", cin=cin, cout=cout, hw=(hw, hw), k=k,
                      batch=batch, **kw)
        a.mode = "fwd"
        fused.append(c)
        alone.append(a)
    return fused, alone


def attention_cases(mode: str) -> list:
    out = []
    for d in (64, 128):
        for seq in (1024, 4096, 8192):
            b, h = 16384 // seq, 2048 // d
            tag = "sdpa" if mode == "fwd" else "sdpa.bwd"
            out.append(ops._attn(f"{tag}/seq{seq // 1024}k.d{d}", f"{mode}, B{b} H{h} L{seq} D{d}", (h, seq, d),
                                 batch=b, mode=mode))
    return out


def memory_cases() -> list:
    names = ("max_pool2d/resnet50.stem", "adaptive_avg_pool2d/resnet50.head", "batch_norm_act/densenet121.block1",
             "batch_norm_act.train/densenet121.block1", "local_response_norm/alexnet.norm1")
    by = {c.name: c for c in ops.CASES}
    return [by[n] for n in names]


def items(rehearse: bool) -> list[dict]:
    """(name, estimated GPU seconds) in priority order; the estimates are in gpu_run.py's ESTIMATES."""
    out = [{"name": "ceilings"}]
    out += [{"name": f"conv b{b}", "batch": b} for b in ((2,) if rehearse else (64, 256))]
    out += [{"name": "attention fwd", "mode": "fwd"}, {"name": "attention bwd", "mode": "bwd"}]
    out += [{"name": "memory-bound ops"}, {"name": "resnet50"}]
    return out


def cpu_copy_gbps() -> float:
    src = torch.rand(16 * 2 ** 20)
    dst = torch.empty_like(src)
    t = harness.time_cpu(lambda: dst.copy_(src), target_s=0.2)
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def run_item(it: dict, session: harness.Session, st: ops.Settings, results: dict, rehearse: bool) -> str:
    from fastnets.bench import roofline

    dev = session.device
    if it["name"] == "ceilings":
        if dev.type == "cuda":
            st.ceilings = roofline.measure(dev, [F16, BF16], quick=True)
            results["ceilings"] = st.ceilings.to_json()
            return f"copy {st.ceilings.copy_gbps:,.0f} GB/s, " + ", ".join(
                f"{k} {v:,.0f} TFLOP/s" for k, v in st.ceilings.matrix_tflops.items())
        results["ceilings"] = None
        results["cpu_copy_gbps"] = cpu_copy_gbps()
        return f"CPU copy {results['cpu_copy_gbps']:.1f} GB/s (no GPU: no matrix rate, no roofline)"
    if it["name"].startswith("conv"):
        fused, alone = conv_cases(it["batch"])
        ops.run(session, fused, st)
        ops.run(session, alone, ops.Settings(dtypes=st.dtypes, batch=st.batch, compile_on=False, ceilings=st.ceilings,
                                             quick=True, shrink=st.shrink, backends={
                                                 b: "the stock convolution alone has no fastnets variant"
                                                 for b in st.backends}))
        return f"{len(fused)} shapes"
    if it["name"].startswith("attention"):
        cases = attention_cases(it["mode"])
        if rehearse:
            cases = cases[:1]
        ops.run(session, cases, ops.Settings(dtypes=[BF16] if dev.type == "cuda" else st.dtypes, batch=st.batch,
                                             backends=st.backends, compile_on=False, ceilings=st.ceilings,
                                             quick=True, shrink=st.shrink))
        return f"{len(cases)} cases"
    if it["name"] == "memory-bound ops":
        cases = memory_cases()
        ops.run(session, cases, st)
        return f"{len(cases)} cases"
    if it["name"] == "resnet50":
        from fastnets.kernels import _common

        # fixed tiles: autotuning ~20 conv layer shapes x 11 configs does not fit the window
        _common.FIXED_CONFIG = True
        case = next(c for c in models.select(["resnet50"], dev, False))
        ms = models.Settings(dtype=F16 if dev.type == "cuda" else torch.float32,
                             batches=[2] if rehearse else [256], train_batch=2 if rehearse else 64,
                             compile_mode="none", image_size=32 if rehearse else None, quick=True)
        models.run(session, [case], ms)
        return "inference and one training step (Triton tiles fixed, FASTNETS_AUTOTUNE=fixed: not autotuned)"
    raise ValueError(it["name"])


# ----------------------------------------------------------------------------------------------
# Precompile (stage 1): run the fastnets side of every case with the Triton launches turned into
# compiles (JITFunction.run with warmup=True, Autotuner.run -> Autotuner.warmup: every pruned
# config), each worker compiling the variants whose key hashes to its index.

def _spec(v):
    if isinstance(v, torch.Tensor):
        return ("T", str(v.dtype), v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return ("i", v == 1, v % 16 == 0, abs(v) >= 2 ** 31)
    if isinstance(v, float):
        return "f"
    return repr(v)


def intercept(worker: int, workers: int, seen: set, counter: dict | None = None) -> None:
    """Turns Triton launches into compiles of this worker's share of the variants (counter["n"]:
    how many compiles were asked for)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    local = threading.local()
    run_jit = JITFunction.run

    def mine(name, args, kwargs) -> bool:
        key = repr((name, [_spec(a) for a in args],
                    sorted((k, _spec(v)) for k, v in kwargs.items() if k not in ("grid", "warmup"))))
        if key in seen:
            return False
        seen.add(key)
        return int(hashlib.sha1(key.encode()).hexdigest(), 16) % workers == worker

    def jit_run(self, *args, grid, warmup, **kwargs):
        if getattr(local, "inside", False) or mine(self.fn.__name__, args, kwargs):
            if counter is not None:
                counter["n"] = counter.get("n", 0) + 1
            return run_jit(self, *args, grid=grid, warmup=True, **kwargs)
        return None

    def tuned_run(self, *args, **kwargs):
        kwargs.pop("warmup", None)  # fn[grid](...) passes warmup=False; Autotuner.warmup sets its own
        if not mine(getattr(self, "base_fn", self.fn).__name__, args, kwargs):
            return None
        local.inside = True
        try:
            self.warmup(*args, **kwargs)
        finally:
            local.inside = False
        return None

    JITFunction.run = jit_run
    Autotuner.run = tuned_run
