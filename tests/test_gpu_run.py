"""The GPU window's script, rehearsed on the CPU (issue 13): `bash scripts/gpu_run.sh --rehearse`
runs the same stages (Triton interpreter, tiny shapes, GPU-only steps skipped with their reason).

Two rehearsals run at once: one whose last stage fails (GPU_RUN_FAIL_STAGE=4), one killed with
SIGTERM during stage 2. Each must leave at most 8 files, none deeper than two folders, every stage
accounted for with its time and within its share of the budget, and a summary. check_out (the
script's own check of its output) is tested on folders that break each rule. Then the one
command from returned files to committed results (`python -m fastnets.bench.measured ingest`) on a
synthetic returned run, and the precompile's launch interception with the fixed tile configs of
stage 2. About 60 s on 2 cores (the rehearsals take 45 s of it, side by side).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_run  # noqa: E402

BUDGET = 45


def _start(out, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_RUN_FAIL_STAGE", "FASTNETS_AUTOTUNE")}
    e.update(env)
    return subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "gpu_run.sh"), "--rehearse", "--budget", str(BUDGET),
                             "--out", str(out)], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stages(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return {s["stage"]: s for s in json.load(f)["gpu_run"]["stages"]}


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory):
    failing, killed = tmp_path_factory.mktemp("failing"), tmp_path_factory.mktemp("killed")
    a = _start(failing, GPU_RUN_FAIL_STAGE="4")
    b = _start(killed)
    deadline = time.time() + BUDGET + 30
    while time.time() < deadline:  # SIGTERM once stage 2 runs
        try:
            if _stages(killed)[2]["status"] == "running":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    else:
        pytest.fail("the killed rehearsal never reached stage 2")
    time.sleep(1.0)
    b.send_signal(signal.SIGTERM)
    b_out = b.communicate(timeout=30)[0]
    a_out = a.communicate(timeout=BUDGET + 60)[0]
    return {"failing": (failing, a.returncode, a_out), "killed": (killed, b.returncode, b_out)}


def _files(out):
    return sorted(os.path.relpath(os.path.join(d, n), out) for d, _, ns in os.walk(out) for n in ns)


def test_failing_stage_still_leaves_a_full_account(rehearsals):
    out, rc, log = rehearsals["failing"]
    assert rc != 0, log
    assert gpu_run.check_out(str(out)) == [], log  # <= 8 files, depth, every stage timed within its share
    assert len(_files(out)) <= 8
    stages = _stages(out)
    assert sorted(stages) == [1, 2, 3, 4]
    for n, s in stages.items():
        assert s["status"] not in ("pending", "running") and s["elapsed_s"] is not None, s
        assert s["elapsed_s"] <= s["allotted_s"] + gpu_run.GRACE_S, s
        assert not s["status"].startswith("failed") or n == 4, s
    assert stages[4]["status"].startswith("failed"), stages[4]
    env = next(i for i in stages[1]["items"] if i["name"] == "environment")
    assert env["status"] == "ok", env
    skipped = {i["name"]: i["detail"] for i in stages[1]["items"] if i["status"] == "skipped"}
    assert "no GPU" in skipped["build fastnets._C"] and "no GPU" in skipped["Triton precompile"]
    summary = (out / "summary.md").read_text()
    assert "rehearsal" in summary and "4 remaining" in summary and "failed" in summary


def test_killed_run_leaves_a_summary(rehearsals):
    out, rc, log = rehearsals["killed"]
    assert rc == 128 + signal.SIGTERM, log
    assert gpu_run.check_out(str(out)) == [], log
    stages = _stages(out)
    assert stages[1]["status"] in ("ok", "stopped at deadline") and stages[1]["elapsed_s"] is not None, stages[1]
    assert stages[2]["status"] == "killed (SIGTERM)" and stages[2]["elapsed_s"] is not None, stages[2]
    assert stages[3]["status"] == stages[4]["status"] == "not started"
    summary = (out / "summary.md").read_text()
    assert "killed (SIGTERM)" in summary and "2 correctness" in summary


def _fake_run(tmp_path, *, elapsed=5.0, extra=()):
    out = tmp_path / "out"
    out.mkdir(parents=True)
    stages = [{"stage": n, "name": name, "status": "ok", "deadline_s": 10.0 * n, "allotted_s": 10.0,
               "elapsed_s": elapsed, "items": []} for n, name, _, _ in gpu_run.STAGES]
    (out / "results.json").write_text(json.dumps({"gpu_run": {"stages": stages, "killed": None}}))
    (out / "summary.md").write_text("x")
    for rel in extra:
        os.makedirs(out / os.path.dirname(rel), exist_ok=True)
        (out / rel).write_text("x")
    return str(out)


def test_check_out_catches_each_broken_rule(tmp_path):
    assert gpu_run.check_out(_fake_run(tmp_path / "ok")) == []
    nine = _fake_run(tmp_path / "nine", extra=[f for f in gpu_run.FILES if f not in ("summary.md", "results.json")]
                     + ["extra.log"])
    assert any("9 files" in p for p in gpu_run.check_out(nine))
    deep = _fake_run(tmp_path / "deep", extra=["a/b/c/file.log"])
    assert any("deeper than two folders" in p for p in gpu_run.check_out(deep))
    over = _fake_run(tmp_path / "over", elapsed=10.0 + gpu_run.GRACE_S + 1)
    assert any("overran its share" in p for p in gpu_run.check_out(over))
    gone = _fake_run(tmp_path / "gone")
    os.remove(os.path.join(gone, "summary.md"))
    assert "no summary.md" in gpu_run.check_out(gone)


def test_deadlines_follow_the_shares():
    d = gpu_run.deadlines(540)
    assert d == sorted(d) and d[-1] == 540 - gpu_run.MARGIN_S and gpu_run.deadlines(40)[-1] == 38
    assert abs(sum(s for _, _, s, _ in gpu_run.STAGES) - 1.0) < 1e-9
    assert len(gpu_run.FILES) <= 8


# ----------------------------------------------------------------------------------------------
# From returned files to committed results.

def _returned(tmp_path, device="cuda"):
    from fastnets.bench import harness

    src = tmp_path / "returned"
    src.mkdir()
    case = "conv_bn_act/resnet50.layer1.conv2.b64 fp16"
    ms = []
    for variant, side, t in (("eager", "stock", 1.0), ("eager_cl", "stock", 0.9), ("triton", "fastnets", 0.8),
                             ("triton_cl", "fastnets", 0.6), ("cuda", "fastnets", 0.9), ("cuda_cl", "fastnets", 0.7)):
        m = harness.Measurement("op", case, variant, f"{side} {variant}", side, baseline="eager", median_ms=t,
                                check="ok (rel err 1e-3)" if side == "fastnets" else None)
        ms.append(m)
    harness.speedups(ms)
    items = [{"name": f"{fam} {b} fp16 nchw small", "status": st, "seconds": 0.1, "detail": "", "family": fam,
              "backend": b, "dtype": "fp16", "layout": "nchw", "size": "small", "ops": [op]}
             for fam, op, b, st in (("conv", "conv_bn_act", "triton", "ok"), ("conv", "conv_bn_act", "cuda", "ok"),
                                    ("pool", "max_pool2d", "triton", "ok"), ("pool", "max_pool2d", "cuda", "failed"))]
    results = {"schema": 1, "meta": {"device": device, "gpu": "NVIDIA H200" if device == "cuda" else None,
                                     "date": "2026-12-01T23:00:00+00:00", "torch": "2.11.0", "triton": "3.6.0",
                                     "cuda": "13.0", "command": "bash scripts/gpu_run.sh"},
               "measurements": [m.to_json() for m in ms], "skipped": [],
               "cases": {case: {"op": "conv_bn_act", "family": "conv", "dispatch_ops": ["conv_bn_act"]}},
               "gpu_run": {"stages": [{"stage": 2, "name": "correctness", "items": items}]}}
    (src / "results.json").write_text(json.dumps(results))
    (src / "summary.md").write_text("# GPU run\n")
    (src / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_conv" name="test_gpu_parity[cuda-fp16]"/>'
        '<testcase classname="tests.test_pool" name="test_gpu_parity[triton-fp16]"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    (src / "bench.log").write_text("log\n")
    return src


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "fastnets").mkdir(parents=True)
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "fastnets", "_measured.py"), repo / "fastnets" / "_measured.py")
    shutil.copy(os.path.join(ROOT, "README.md"), repo / "README.md")
    return repo


def test_ingest_returned_files(tmp_path):
    from fastnets.bench import measured, report

    src, repo = _returned(tmp_path), _repo(tmp_path)
    assert measured.main(["ingest", str(src), "--repo", str(repo)]) == 0
    folder = repo / "benchmarks" / "results" / "nvidia-h200-2026-12-01"
    assert sorted(os.listdir(folder)) == ["bench.log", "results.json", "summary.md", "table.md", "tests.xml"]
    readme = (repo / "README.md").read_text()
    inside = readme.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    assert "conv_bn_act/resnet50.layer1.conv2.b64 fp16" in inside and "benchmarks/results/nvidia-h200-2026-12-01" in inside
    ns = {}
    exec((repo / "fastnets" / "_measured.py").read_text(), ns)
    where = "benchmarks/results/nvidia-h200-2026-12-01"
    assert ns["PROVEN"] == {"triton": {"conv_bn_act": where}, "cuda": {"conv_bn_act": where}}
    assert ns["FASTEST"] == {"conv_bn_act": {"H200": ("triton", where)}}
    with pytest.raises(SystemExit, match="exists"):
        measured.ingest(str(src), repo=str(repo))
    # a second run merges into the table rather than replacing it
    measured.ingest(str(src), repo=str(repo), name="nvidia-h200-2026-12-02")
    ns = {}
    exec((repo / "fastnets" / "_measured.py").read_text(), ns)
    assert ns["FASTEST"]["conv_bn_act"]["H200"] == ("triton", "benchmarks/results/nvidia-h200-2026-12-02")


def test_ingest_refuses_a_rehearsal(tmp_path):
    from fastnets.bench import measured

    with pytest.raises(SystemExit, match="CPU run"):
        measured.ingest(str(_returned(tmp_path, device="cpu")), repo=str(_repo(tmp_path)))


_INTERCEPT = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[2], "scripts"), sys.argv[2]]
import torch
import kmod
from triton.runtime.jit import JITFunction
calls = []
JITFunction.run = lambda self, *a, grid, warmup, **kw: calls.append((self.fn.__name__, warmup, kw.get("B")))
import gpu_bench
gpu_bench.intercept(0, 1, set())
x = torch.zeros(4)
kmod.k[(1,)](x, 7)
kmod.k[(1,)](x, 7)  # the same variant again: compiled once
kmod.k[(1,)](x, 1)  # an argument equal to 1 is another specialization
kmod.j[(1,)](x, 7, B=16)
if os.environ["FASTNETS_AUTOTUNE"] == "fixed":  # the real kernels: one config each after their own pruning
    from fastnets.kernels import attention, conv, pool
    for kern in (conv._conv_gemm_tuned, pool._fwd, attention._attn_fwd):
        kern.nargs = {}
        assert len(kern.configs) > 1 and len(kern.prune_configs({})) == 1, kern
print(calls)
'''

_KMOD = '''import triton
import triton.language as tl
from fastnets.kernels import _common


@_common.autotune([triton.Config({"B": 16}), triton.Config({"B": 32})], key=["n"])
@triton.jit
def k(x, n, B: tl.constexpr):
    pass


@triton.jit
def j(x, n, B: tl.constexpr):
    pass
'''


@pytest.mark.parametrize("mode", ["search", "fixed"])
def test_precompile_turns_launches_into_compiles(tmp_path, mode):
    """Stage 1's precompile: a launch compiles (warmup=True) instead of running, every pruned
    autotune config under search and one under fixed (stage 2's pinned tiles; the real conv,
    pool and attention kernels keep one config each), each variant once."""
    (tmp_path / "kmod.py").write_text(_KMOD)
    env = dict(os.environ, FASTNETS_AUTOTUNE=mode, TRITON_INTERPRET="0")
    p = subprocess.run([sys.executable, "-c", _INTERCEPT, str(tmp_path), ROOT], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    calls = eval(p.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printout
    per_variant = [("k", True, 16), ("k", True, 32)] if mode == "search" else [("k", True, 16)]
    assert calls == per_variant * 2 + [("j", True, 16)], calls
