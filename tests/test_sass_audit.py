"""The machine-code audit on the CPU (no GPU): faithful compiles and the written expectations.

1. scripts/aot_compile_all.py specializes each kernel exactly as Triton's JIT does at run time:
   the same op calls are made twice, once through the tool (recorded launches, autotune configs,
   JITFunction.run in warmup) and once through Triton's real launch path (torch.library.wrap_triton,
   the Autotuner timing every pruned candidate, JITFunction.run), with only the device faked and
   triton.compile intercepted; the signatures, constants, tt.divisibility attributes and compile
   options must agree. Hand-checked rules on top: an integer argument equal to 1 is a constant, an
   integer or a 16-byte-aligned pointer gets tt.divisibility=16 only when the launch value allows it.
2. scripts/sass_audit.py --quick (sm_90, the installed Triton, a few kernels of each class and the
   anchors): every kernel meets its expectation (CONTRIBUTING.md, "Machine-code expectations") or
   its written exception, and the deliberately degraded launches of the anchors (odd K for the
   matmul, a stride-3 read for the elementwise kernel) are rejected: the check can fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aot_compile import unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

# Autotune meta-parameters: the tool compiles every config of each launch, the run-time Autotuner
# only those of a new tuning key (then the cached winner), so compare specializations without them.
_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_C", "GROUP_M"}
_CONFIG_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg"}


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, SCRIPTS, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


def _specs(mode: str, only: str):
    return subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "aot_compile_all.py"), "--archs", "90",
                             "--specializations", mode, "--only", only], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _key(spec, drop_config=False):
    s = dict(spec)
    if drop_config:
        s["constants"] = {k: v for k, v in s["constants"].items() if k not in _CONFIG_KEYS}
        s["options"] = {k: v for k, v in s["options"].items() if k not in _CONFIG_OPTIONS}
    return json.dumps(s, sort_keys=True)


def test_aot_specializations_are_the_jits():
    only = "lrn,layer_norm,attention,conv"
    procs = {m: _specs(m, only) for m in ("aot", "runtime")}
    specs = {}
    for m, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{m}: {err[-4000:]}"
        specs[m] = json.loads(out.strip().splitlines()[-1])
    aot, run = specs["aot"], specs["runtime"]
    kernels = {s["kernel"] for s in run}
    assert {"_conv_gemm", "_attn_fwd", "_attn_bwd_dq", "lrn_fwd_kernel", "ln_fwd_kernel", "anchor_matmul"} <= kernels
    # every compile Triton makes at run time is one of the tool's jobs, config included
    missing = {_key(s) for s in run} - {_key(s) for s in aot}
    assert not missing, f"compiled at run time, not by the tool: {sorted(missing)[:2]}"
    # and every specialization of the tool's jobs is one Triton makes (the autotune config aside)
    extra = {_key(s, True) for s in aot} - {_key(s, True) for s in run}
    assert not extra, f"specialized by the tool, never at run time: {sorted(extra)[:2]}"
    # the rules, by hand, on launches whose values are known (scripts/audit_anchors.py)
    by = {}
    for s in run:
        by.setdefault(s["kernel"], []).append(s)
    scale = {("stride" in s["constants"]): s for s in by["anchor_scale"]}
    assert scale[True]["constants"]["stride"] == "1"            # stride == 1: a constant
    assert scale[False]["signature"]["stride"] == "i32"         # stride == 3: a plain integer
    assert "stride" not in scale[False]["attrs"]
    assert set(scale[True]["attrs"]) == {"n", "x_ptr", "y_ptr"}  # 2**20 and aligned buffers
    odd = [s for s in by["anchor_matmul"] if "K" not in s["attrs"]]
    assert len(odd) == 1, "the odd-K matmul launch"
    # M = N = 4096, C's row stride 4096: divisible; K = 4093, A's and B's row strides 4093, 4099: not
    assert set(odd[0]["attrs"]) == {"M", "N", "stride_cm", "a_ptr", "b_ptr", "c_ptr"}
    assert all(a == {"tt.divisibility": 16} for a in odd[0]["attrs"].values())


def test_quick_audit_meets_expectations_and_rejects_mutants(tmp_path):
    env = dict(_env(), AUDIT_MUTANTS="1")
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "sass_audit.py"), "--quick", "--archs", "90",
                        "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    log = p.stdout + p.stderr
    assert "MUTANT anchor_matmul (mutant) sm_90: rejected" in log, log[-4000:]
    assert "MUTANT anchor_scale (mutant) sm_90: rejected" in log, log[-4000:]
    report = json.load(open(tmp_path / "out" / "audit.json"))
    reps = {r.get("kernel_label", r["kernel"]): r for r in report["representatives"]}
    for k in ("anchor_matmul", "anchor_attention", "anchor_scale", "_conv_gemm", "ln_fwd_kernel",
              "_pool2d_fwd_kernel"):
        assert k in reps, f"{k} was not audited: {sorted(reps)}\n{log[-3000:]}"
    assert reps["anchor_matmul"]["HGMMA"] > 0 and reps["anchor_matmul"]["loop_async128_share"] >= 0.8
    assert reps["anchor_matmul (mutant)"]["loop_async128_share"] in (None, 0.0) or \
        reps["anchor_matmul (mutant)"]["loop_async128_share"] < 0.8
    assert reps["anchor_scale"]["frac128"] >= 0.9 and reps["anchor_scale (mutant)"]["frac128"] < 0.9
    assert p.returncode == 0, f"a kernel misses its expectation:\n{log[-4000:]}"
