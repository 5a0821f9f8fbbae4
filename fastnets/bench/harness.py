"""Timing, memory and the run's bookkeeping, shared by the CLI and the pytest-benchmark suite.

Timing:
- On a GPU: `triton.testing.do_bench` (CUDA events around each call, the L2 cache cleared before
  each timed call), asked for the median and the 20th/80th percentiles, after our own warm-up
  call (so that Triton autotuning, cuDNN heuristics and lazy initialization stay out of the
  numbers). When one input set fits in the L2 cache, the timed function rotates among several
  input sets, so that no call finds its inputs already on chip.
- On the CPU: the wall-clock median of repeated calls after a warm-up, repeating until a time
  target or a repeat limit is reached (at least `min_reps` calls). The variants of a model are
  timed in interleaved rounds, so that a change in a shared machine's load hits them alike.

Memory (models): the most bytes one call holds at once: what it needs that is live before it
(the model's weights, the input) plus the peak of what it allocates, by
torch.cuda.max_memory_allocated on a GPU; on the CPU, by the bytes of the tensor storages ops
create, tracked at op boundaries by a dispatch mode (scratch memory an op allocates and frees
inside itself is not seen there).

The Session holds the run: its time budget, the measurements, what was skipped and why, and the
progress reports; a CUDA error that poisons the context (an illegal address in an unproven
kernel, say) stops every later GPU measurement, each recorded as skipped with that reason.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
import weakref
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Skip(Exception):
    """A case or variant that cannot run here; the message says why."""


@dataclasses.dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    samples_ms: list[float] = dataclasses.field(default_factory=list, repr=False)  # CPU: every timed call
    runs_ms: list[float] | None = None  # with repeated runs (--repeat): each run's median


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotation_count(input_bytes: int, l2_bytes: int | None, max_sets: int = 8) -> int:
    """How many input sets to rotate among: enough that their total is at least twice the L2
    cache (at most max_sets); 1 when one set already exceeds it, or without an L2 figure."""
    if not l2_bytes or input_bytes <= 0 or input_bytes >= 2 * l2_bytes:
        return 1
    return max(1, min(max_sets, math.ceil(2 * l2_bytes / input_bytes)))


def rotating(fn: Callable[[Any], Any], input_sets: Sequence[Any]) -> Callable[[], Any]:
    """A no-argument callable that runs fn on the next input set at each call."""
    if len(input_sets) == 1:
        only = input_sets[0]
        return lambda: fn(only)
    cycle = itertools.cycle(input_sets)
    return lambda: fn(next(cycle))


def time_cpu(fn: Callable[[], Any], *, warmup: int = 1, min_reps: int = 3, max_reps: int = 50,
             target_s: float = 1.0) -> Timing:
    """Wall-clock median over repeated calls of fn (CPU work: no synchronization needed)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < target_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], *, min_reps: int = 3, max_reps: int = 10,
                         target_s: float = 1.0) -> dict[str, "Timing | Exception"]:
    """Wall-clock medians of several already warmed-up calls, timed in rounds (one call of each per
    round) so that a change in the machine's load affects them alike. Stops after max_reps rounds,
    or after min_reps once `target_s` per call has passed. A call that raises gets its exception."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    failed: dict[str, Exception] = {}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps:
        live = [k for k in fns if k not in failed]
        if not live or (rounds >= min_reps and time.perf_counter() - start >= target_s * len(live)):
            break
        for k in live:
            t0 = time.perf_counter()
            try:
                fns[k]()
            except Exception as exc:  # noqa: BLE001 - reported as that variant's failure
                failed[k] = exc
                continue
            times[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {k: failed[k] if k in failed else _summary(times[k]) for k in fns}


def repeated(timings: list["Timing | Exception"]) -> "Timing | Exception":
    """One Timing from the same variant's repeated runs (--repeat): the median and quantiles of
    every timed call together, and each run's median in runs_ms (the spread between runs). A run
    that raised makes the whole an error."""
    for t in timings:
        if isinstance(t, Exception):
            return t
    if len(timings) == 1:
        return timings[0]
    runs = [t.median_ms for t in timings]
    pooled = [x for t in timings for x in t.samples_ms]
    if pooled:
        out = _summary(pooled)
    else:  # GPU timings carry no samples: the median of the runs' medians
        out = Timing(statistics.median(runs), min(t.q20_ms for t in timings), max(t.q80_ms for t in timings),
                     sum(t.reps for t in timings))
    out.runs_ms = runs
    return out


def unwrap(result: "Timing | Exception") -> Timing:
    if isinstance(result, Exception):
        raise result
    return result


def time_gpu(fn: Callable[[], Any], *, warmup_ms: float = 10.0, rep_ms: float = 40.0, min_reps: int = 5) -> Timing:
    """do_bench median (with 20th/80th percentiles) of fn on the current CUDA device, after one
    warm-up call; the repetition time is stretched so that at least min_reps calls are timed."""
    from triton.testing import do_bench

    fn()  # compile, autotune, allocate: none of it belongs in the numbers
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one_ms = max(start.elapsed_time(end), 1e-3)
    rep = max(rep_ms, min_reps * one_ms * 1.05)
    warm = max(warmup_ms, one_ms)
    q50, q20, q80 = do_bench(fn, warmup=warm, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(q50), float(q20), float(q80), max(1, int(rep / one_ms)))


def _summary(times_ms: list[float]) -> Timing:
    ordered = sorted(times_ms)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]

    return Timing(statistics.median(ordered), q(0.2), q(0.8), len(ordered), list(times_ms))


# ----------------------------------------------------------------------------------------------
# Peak memory.

class _StorageTracker(TorchDispatchMode):
    """Bytes held by the storages that ops create, live at op boundaries, and their peak. A storage
    first met as an op's input was live before the block (weights, the input) and is not counted,
    nor are the views ops return of it."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()    # storages created inside the block, still alive
        self._before: set[int] = set()  # storages that existed before the block

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                if key not in self._seen:
                    self._before.add(key)
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen and key not in self._before:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct storages of the tensors in objs (modules: parameters and buffers)."""
    seen, total = set(), 0
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            leaves = list(obj.parameters()) + list(obj.buffers())
        else:
            leaves = torch.utils._pytree.tree_leaves(obj)
        for t in leaves:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
    return total


def peak_memory(fn: Callable[[], Any], device: torch.device, resident: int) -> int:
    """The most bytes one call of fn holds at once: `resident` (what is live before the call and the
    call needs: the model's weights, the input) plus the peak of what the call allocates."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return resident + int(torch.cuda.max_memory_allocated(device)) - before
    tracker = _StorageTracker()
    with tracker:
        result = fn()
    del result
    return resident + tracker.peak


# ----------------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class Measurement:
    """One timed variant of one case. `speedup` is over the case's baseline (stock eager, NCHW
    where the case has a layout); `vs_best_stock` over the fastest stock variant of the case."""
    kind: str                     # "op" or "model"
    case: str                     # e.g. "conv_bn_act/resnet50.layer1.conv2" or "resnet50/inference/b32"
    variant: str                  # e.g. "eager", "eager_cl", "compile", "triton_cl", "fastnets"
    label: str                    # human-readable variant name
    side: str                     # "stock" or "fastnets"
    status: str = "ok"            # "ok", "skipped" or "error"
    reason: str | None = None     # why skipped or what failed
    baseline: str | None = None   # the variant `speedup` is measured against
    median_ms: float | None = None
    q20_ms: float | None = None
    q80_ms: float | None = None
    reps: int | None = None               # timed calls (on a GPU, do_bench's count, estimated)
    speedup: float | None = None
    vs_best_stock: float | None = None
    gbps: float | None = None             # achieved bytes / time (ops)
    tflops: float | None = None           # achieved FLOPs / time (ops)
    roofline_fraction: float | None = None  # roofline floor time / measured time (ops, GPU)
    items_per_s: float | None = None      # images or sequences per second (models)
    peak_mem_bytes: int | None = None     # models
    check: str | None = None              # fastnets output against stock: "ok (rel 3e-4)" / "MISMATCH ..."
    runs_ms: list[float] | None = None    # with --repeat N: the median of each of the N runs
    vs_best_stock_runs: list[float] | None = None  # vs_best_stock within each run (same run's stock variants)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Budget:
    """A wall-clock budget for the run (None: unlimited)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self, share: float = 1.0, reserve: float = 0.0) -> bool:
        """True once the elapsed time plus `reserve` (what the next step is expected to take)
        passes `share` of the budget."""
        return self.seconds is not None and self.elapsed() + reserve >= share * self.seconds


class Session:
    """Collects the run's measurements and skips; reports progress through `progress`."""

    def __init__(self, device: torch.device, budget: Budget, progress=None):
        self.device = device
        self.budget = budget
        self.progress = progress
        self.measurements: list[Measurement] = []
        self.skipped: list[dict] = []  # {"what": ..., "reason": ...}: whole groups not run
        self.cases: dict[str, dict] = {}  # case name -> what it is (op, family, shapes, bytes, FLOPs, ...)
        self.gpu_lost: str | None = None
        self.checkpoint: Callable[[], Any] | None = None  # called after each case (writes the JSON so far)

    def case_done(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint()

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})
        if self.progress is not None:
            self.progress.note(f"skipped {what}: {reason}")

    def add(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        if self.progress is not None:
            self.progress.step(m)
        return m

    def guard(self, exc: BaseException) -> str:
        """The message of a failed measurement. On a GPU, checks that the CUDA context still works
        (an illegal address in a kernel poisons it for the rest of the process) and, if it does
        not, marks it lost so that every later GPU measurement is skipped with this reason."""
        text = str(exc).strip()
        msg = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        if self.device.type == "cuda":
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            elif not _context_alive(self.device):
                self.gpu_lost = msg
        return msg

    def run(self, m: Measurement, timed: Callable[[], Timing],
            after: Callable[[Timing], None] | None = None) -> Measurement:
        """Times one variant (unless the CUDA context is lost) and records the result."""
        if self.gpu_lost:
            m.status, m.reason = "skipped", f"the CUDA context was lost earlier ({self.gpu_lost})"
            return self.add(m)
        try:
            t = timed()
        except Exception as exc:  # noqa: BLE001 - a failed variant is a result, not a crash
            m.status, m.reason = "error", self.guard(exc)
            return self.add(m)
        m.median_ms, m.q20_ms, m.q80_ms, m.reps = t.median_ms, t.q20_ms, t.q80_ms, t.reps
        m.runs_ms = t.runs_ms
        if after is not None:
            after(t)
        return self.add(m)


def speedups(measurements: list[Measurement]) -> None:
    """Fills speedup (over the case's baseline: stock eager) and vs_best_stock (over the case's
    fastest stock variant) of every successful measurement; with repeated runs, also
    vs_best_stock_runs: the same ratio within each run (its fastest stock variant in that run
    over the variant's median in that run), whose range is the spread that repeating shows."""
    by_case: dict[str, list[Measurement]] = {}
    for m in measurements:
        by_case.setdefault(m.case, []).append(m)
    for ms in by_case.values():
        ok = [m for m in ms if m.status == "ok" and m.median_ms]
        stock = [m.median_ms for m in ok if m.side == "stock"]
        for m in ok:
            base = next((b for b in ok if b.variant == m.baseline), None)
            m.speedup = base.median_ms / m.median_ms if base else None
            m.vs_best_stock = min(stock) / m.median_ms if stock else None
            runs = [s.runs_ms for s in ok if s.side == "stock" and s.runs_ms]
            if m.runs_ms and runs and all(len(r) == len(m.runs_ms) for r in runs):
                m.vs_best_stock_runs = [min(r[i] for r in runs) / t for i, t in enumerate(m.runs_ms)]


def _context_alive(device: torch.device) -> bool:
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over all tensors of two matching structures (float64); inf when
    the structures differ or a NaN/Inf sits where the reference has none."""
    a_leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    b_leaves = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    if len(a_leaves) != len(b_leaves) or not a_leaves:
        return math.inf
    num = den = 0.0
    for a, b in zip(a_leaves, b_leaves):
        if a.shape != b.shape:
            return math.inf
        a, b = a.detach().double(), b.detach().double()
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return math.inf
        keep = torch.isfinite(b)
        num += (a[keep] - b[keep]).pow(2).sum().item()
        den += b[keep].pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# What a correct fastnets result can differ from stock PyTorch by, relative (both sides round in
# their dtype; fp32 convolutions and matmuls may use TF32 on a GPU).
CHECK_TOL = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check_text(err: float, dtype: torch.dtype) -> str:
    ok = err <= CHECK_TOL.get(dtype, 2e-2)
    return f"{'ok' if ok else 'MISMATCH'} (rel err {err:.1e})"
