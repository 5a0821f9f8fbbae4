"""Backend registry and selection: `use_backend`, `backends()`, and `choose()` for the ops.

Every op has three implementations: a Triton kernel, a CUDA C++ kernel (fastnets._C) and a torch
reference built from stock ops (the CPU path and the oracle of the tests). The public functions in
fastnets/ops/ check their arguments, then ask `choose()` which implementation runs:

- backend "torch" always runs the reference;
- on a CPU tensor, "auto" runs the reference, "triton" runs the Triton kernel through the
  interpreter when TRITON_INTERPRET=1 is set (else raises), "cuda" raises;
- on a CUDA tensor, "auto" runs the implementation that committed benchmark runs measured fastest
  for that op on this GPU class (fastnets/_measured.py); without a measurement, Triton. It never
  picks a CUDA C++ kernel that has not passed its tests natively on a GPU; it falls back to the
  reference only when no kernel can take the input (say float64), and `explain()` says why.

Each implementation declares what it cannot take (a reason string, as xformers' ops do), so a
forced backend fails with that reason instead of silently running something else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
from typing import Iterator

import torch

from fastnets import _measured

BACKENDS = ("auto", "triton", "cuda", "torch")
KERNEL_BACKENDS = ("triton", "cuda")


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


# A plain module global (not thread-local), so that torch.compile reads it as a guarded constant.
_current = _checked(os.environ.get("FASTNETS_BACKEND", "auto").strip().lower() or "auto",
                    "FASTNETS_BACKEND")


def current_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Runs the enclosed code with one backend: "auto", "triton", "cuda" or "torch".

    The default comes from the environment variable FASTNETS_BACKEND (else "auto"). The setting is
    process-wide, not per thread.
    """
    global _current
    previous = _current
    _current = _checked(str(name).strip().lower(), "use_backend")
    try:
        yield _current
    finally:
        _current = previous


# The reference backend's training path takes stock shortcuts on the CPU (conv -> batch-norm ->
# activation as the stock ops with their own autograd) where the kernels' formulation (statistics
# from the convolution's epilogue, batch_norm_act_train with given statistics, the pre-activation
# recomputed in the backward) would cost extra passes. Tests switch the shortcuts off to run the
# kernels' formulation through torch ops, whole models included (tests/test_fuse_formulation.py).
_kernel_formulation = False


def kernel_formulation_forced() -> bool:
    return _kernel_formulation


@contextlib.contextmanager
def kernel_formulation(enabled: bool = True) -> Iterator[None]:
    """Within the block the torch reference follows the kernels' formulation everywhere (no stock
    shortcut), so that the math the GPU kernels implement can be checked on a CPU, in float64.
    Process-wide, not per thread."""
    global _kernel_formulation
    previous = _kernel_formulation
    _kernel_formulation = bool(enabled)
    try:
        yield
    finally:
        _kernel_formulation = previous


# ----------------------------------------------------------------------------------------------
# What is available here, and why not.

def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> tuple[bool, str | None]:
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install triton)"
    return True, None


def _triton_status(device: torch.device | None) -> tuple[bool, str | None]:
    ok, why = _triton_installed()
    if not ok:
        return False, why
    if device is not None and device.type == "cpu":
        if not interpreter_enabled():
            return False, ("Triton kernels run on CPU tensors only through the interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported, or use a CUDA tensor")
        return True, None
    if device is not None and device.type != "cuda":
        return False, f"Triton kernels run on CUDA tensors, not {device.type}"
    if device is None and not torch.cuda.is_available() and not interpreter_enabled():
        return False, "no CUDA device, and the Triton interpreter is off (TRITON_INTERPRET=1)"
    return True, None


def _cuda_status(device: torch.device | None) -> tuple[bool, str | None]:
    from fastnets import _ext

    mod, why = _ext.load()
    if mod is None:
        return False, why
    if device is not None and device.type != "cuda":
        return False, f"the CUDA C++ kernels take CUDA tensors, got a {device.type} tensor"
    n, why = _ext.device_status()
    if n == 0:
        return False, why
    return True, None


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str | None  # why it is unavailable; None when available
    proven_on_gpu: tuple[str, ...]  # ops whose kernels passed their tests natively on a GPU
    note: str = ""

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        proven = (f"proven natively on a GPU for: {', '.join(self.proven_on_gpu)}" if self.proven_on_gpu
                  else "never run natively on a GPU in a committed run (unproven)")
        text = f"{self.name}: {state}"
        if self.name in KERNEL_BACKENDS:
            text += f"; {proven}"
        if self.note:
            text += f"; {self.note}"
        return text


def backends() -> dict[str, BackendStatus]:
    """Each backend, whether it can run here, and the reason when it cannot."""
    t_ok, t_why = _triton_status(None)
    t_note = ""
    if t_ok and not torch.cuda.is_available():
        t_note = "running through the CPU interpreter (TRITON_INTERPRET=1): correct but slow"
    c_ok, c_why = _cuda_status(None)
    from fastnets import _ext

    info, c_note = _ext.build_info(), ""
    if info.get("cuda_built"):
        c_note = f"extension built for sm_{info.get('archs', '?').replace(';', ', sm_')}"
    return {
        "auto": BackendStatus("auto", True, None, (),
                              "picks the measured-fastest proven kernel per op on a GPU, the reference on the CPU"),
        "triton": BackendStatus("triton", t_ok, t_why, tuple(sorted(_measured.PROVEN.get("triton", {}))), t_note),
        "cuda": BackendStatus("cuda", c_ok, c_why, tuple(sorted(_measured.PROVEN.get("cuda", {}))), c_note),
        "torch": BackendStatus("torch", True, None, (), "the reference: stock PyTorch ops"),
    }


# ----------------------------------------------------------------------------------------------
# Selection.

class BackendError(RuntimeError):
    """A backend was asked for that cannot run this input here."""


def gpu_class(device: torch.device) -> str:
    """A short name of the GPU for the measurement table, e.g. "H100" or "A100"."""
    name = torch.cuda.get_device_name(device)
    for known in _measured.GPU_CLASSES:
        if known.lower() in name.lower():
            return known
    return name


def _is_proven(backend: str, op: str) -> bool:
    return op in _measured.PROVEN.get(backend, {})


def choose(op: str, device: torch.device, unsupported: dict[str, str | None] | None = None,
           probe=None) -> str:
    """The backend that runs `op` on a tensor of `device` under the current setting.

    unsupported maps "triton"/"cuda" to the reason that implementation cannot take this input (or
    None when it can). A forced backend that cannot run raises BackendError with the reason.
    probe: optional; a call of the torch reference on the same input. When a forced kernel
    backend cannot take an input (its dtype, say), the probe runs first, so that an input torch
    itself rejects (a bool or complex tensor) raises torch's own error, not a BackendError; its
    result is discarded (never a silent fallback).
    """
    unsupported = unsupported or {}
    wanted = _current
    if wanted == "torch":
        return "torch"
    if wanted in KERNEL_BACKENDS:
        ok, why = (_triton_status if wanted == "triton" else _cuda_status)(device)
        if not ok:
            raise BackendError(f"{op}: backend {wanted!r} cannot run here: {why}")
        why = unsupported.get(wanted)
        if why:
            if probe is not None:
                with torch.no_grad():
                    probe()
            raise BackendError(f"{op}: the {wanted} kernel does not support this input: {why}")
        return wanted
    # auto
    if device.type != "cuda":
        return "torch"
    return _auto_choice(op, device, unsupported)[0]


def explain(op: str, device: torch.device, unsupported: dict[str, str | None] | None = None) -> str:
    """Why `auto` picks what it picks for this op and input (for users and error messages)."""
    if device.type != "cuda":
        return f"{op}: auto runs the torch reference on {device.type} tensors"
    return f"{op}: auto picks {_auto_choice(op, device, unsupported or {})[1]}"


def _auto_choice(op: str, device: torch.device, unsupported: dict[str, str | None]) -> tuple[str, str]:
    fastest = _measured.FASTEST.get(op, {}).get(gpu_class(device))
    order = [fastest[0]] if fastest else []
    order += [b for b in ("triton", "cuda") if b not in order]
    skipped = []
    for b in order:
        if b == "torch":
            return "torch", f"torch: measured fastest in {fastest[1]}"
        if b == "cuda" and not _is_proven("cuda", op):
            skipped.append("cuda (its kernel has not passed its tests natively on a GPU)")
            continue
        ok, why = (_triton_status if b == "triton" else _cuda_status)(device)
        why = why if not ok else unsupported.get(b)
        if why:
            skipped.append(f"{b} ({why})")
            continue
        source = f"measured fastest in {fastest[1]}" if fastest and fastest[0] == b else "no measurement: Triton first"
        return b, f"{b}: {source}"
    return "torch", "the torch reference, because " + "; ".join(skipped)


# ----------------------------------------------------------------------------------------------
# Launch tracing: tests use it to prove which implementation produced a result.

_traces: list[list[tuple[str, str]]] = []


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Collects (op, backend) for every kernel launched or reference run inside the block."""
    record: list[tuple[str, str]] = []
    _traces.append(record)
    try:
        yield record
    finally:
        _traces.remove(record)


def record(op: str, backend: str) -> None:
    """Called by each launcher (Triton, CUDA) and each reference when it runs."""
    for r in _traces:
        r.append((op, backend))


# ----------------------------------------------------------------------------------------------
# Output allocation. With FASTNETS_POISON=1 (the tests set it) outputs start as NaN (floats) or
# a sentinel (integers), so that an element a kernel forgot to write cannot pass as a result.

def _poison() -> bool:
    return os.environ.get("FASTNETS_POISON", "0") == "1"


def empty(*size, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(*size, dtype=dtype, device=device, memory_format=memory_format)
    if _poison() and out.numel():
        out.fill_(float("nan") if out.is_floating_point() else -7)
    return out


def empty_like(t: torch.Tensor, **kw) -> torch.Tensor:
    out = torch.empty_like(t, **kw)
    if _poison() and out.numel():
        out.fill_(float("nan") if out.is_floating_point() else -7)
    return out

