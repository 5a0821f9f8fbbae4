"""Compiles Triton kernels for a GPU target on a machine without a GPU: Triton's ahead-of-time path
(ASTSource -> triton.compile(target=GPUTarget("cuda", arch, 32))) runs the real compiler down to a
cubin, so a kernel that only the interpreter accepts (a runtime value used where a constexpr is
needed, a name defined in one branch only, a type the compiler rejects) fails here instead of on
the GPU machine. It runs in a subprocess: the test process has TRITON_INTERPRET=1, under which
@triton.jit gives interpreted functions that cannot be compiled.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

_SCRIPT = r"""
import importlib, json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.argv[1])
mod = importlib.import_module(spec["module"])
for arch in spec["archs"]:
    for k in spec["kernels"]:
        fn = getattr(mod, k["kernel"])
        sig = {n: "constexpr" if n in k["constexprs"] else k["types"].get(n, "i32") for n in fn.arg_names}
        try:
            triton.compile(ASTSource(fn, signature=sig, constexprs=k["constexprs"]),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": k.get("num_warps", 4)})
        except Exception as exc:
            sys.exit(f"{k['kernel']} for sm_{arch} with {k['constexprs']}: {type(exc).__name__}: {exc}")
print("compiled", len(spec["kernels"]) * len(spec["archs"]))
"""


def unavailable() -> str | None:
    """Why kernels cannot be compiled for a GPU here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "Triton's NVIDIA backend is not installed"
    return None


def compile_kernels(module: str, kernels: list[dict], archs=(90,)) -> None:
    """kernels: [{"kernel": name in `module`, "types": {arg: "*fp16" | "fp32" | ...} (other
    arguments are i32), "constexprs": {name: value}, "num_warps": n}]. Fails with the compiler's
    message."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    spec = json.dumps({"module": module, "kernels": kernels, "archs": list(archs)})
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, spec], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, f"Triton could not compile {module} for a GPU:\n{proc.stderr[-6000:]}"
