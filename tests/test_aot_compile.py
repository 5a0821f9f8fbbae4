"""Every Triton kernel through Triton's real compiler for a GPU target, on a machine without one
(scripts/aot_compile_all.py): the quick subset here (one variant of each of the 26 kernels, as the
ops launch them, for sm_90); the full matrix (every autotune config, dtype and flag variant, sm_80
and sm_90) is the script's default run, logged under benchmarks/results/aot-compile-<date>/.
This proves the kernels compile to cubins with the installed Triton, not that they run."""
import os
import subprocess
import sys

import pytest

import aot_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_compiles_for_sm90():
    why = aot_compile.unavailable()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "aot_compile_all.py"), "--quick",
                           "--archs", "90"], capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    summary = [line for line in out.splitlines() if line.startswith("SUMMARY sm_90")]
    assert summary and " 0 failed" in summary[0] and " 0 capture errors" in summary[0], out[-8000:]
    compiled = int(summary[0].split(":")[1].split()[0])
    assert compiled >= 26, f"only {compiled} kernels compiled: {summary[0]}"
