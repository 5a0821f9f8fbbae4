"""The benchmark harness (fastnets.bench) on the CPU: a quick run writes a complete, valid JSON and a
table; the pieces it is built from (timing statistics, peak memory, checks, speedups, targets, the
README table, the _measured.py tool, the pytest-benchmark suite) do what they say. No assertion
here is about how fast anything is."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastnets
from fastnets.bench import harness, measured, models, ops, report
from fastnets.bench.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")

MEASUREMENT_KEYS = {"kind", "case", "variant", "label", "side", "status", "reason", "baseline", "median_ms", "q20_ms",
                    "q80_ms", "reps", "speedup", "vs_best_stock", "gbps", "tflops", "roofline_fraction", "items_per_s",
                    "peak_mem_bytes", "check", "runs_ms", "vs_best_stock_runs"}


def _validate(results: dict) -> None:
    """Everything a results file must hold, whatever ran."""
    assert results["schema"] == report.SCHEMA and results["complete"] is True
    meta = results["meta"]
    for key in ("device", "date", "command", "torch", "triton", "cuda", "gpu", "driver", "python", "backends", "git"):
        assert key in meta, key
    gpu = torch.cuda.is_available()
    assert meta["device"] == ("cuda" if gpu else "cpu") and meta["command"].startswith("python -m fastnets.bench")
    assert set(meta["backends"]) == {"auto", "triton", "cuda", "torch"}
    if gpu:
        assert meta["gpu"] and meta["cuda"]
        if results["config"]["ops"]:
            ceil = results["ceilings"]
            assert ceil["copy_gbps"] > 0 and all(v > 0 for v in ceil["matrix_tflops"].values())
    else:
        assert results["ceilings"] is None  # no roofline on a CPU, and the skip says why
        assert any(s["what"] == "roofline fractions" for s in results["skipped"]) or not results["config"]["ops"]
    for m in results["measurements"]:
        assert set(m) == MEASUREMENT_KEYS, set(m) ^ MEASUREMENT_KEYS
        assert m["status"] in ("ok", "skipped", "error") and m["side"] in ("stock", "fastnets")
        if m["status"] == "ok":
            assert m["median_ms"] > 0 and m["q20_ms"] <= m["median_ms"] <= m["q80_ms"] and m["reps"] >= 1
            assert m["speedup"] is None or m["speedup"] > 0
            if m["kind"] == "op":
                assert m["gbps"] > 0 and (m["roofline_fraction"] is None) == (not gpu)
            else:
                assert m["items_per_s"] > 0 and m["peak_mem_bytes"] > 0
            if m["side"] == "fastnets":
                assert m["check"] and m["check"].startswith("ok"), m
        else:
            assert m["reason"], m
    for t in results["targets"]:
        assert set(t) == {"target", "goal", "measured", "how", "detail", "met"}


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run (a GPU runs the gpu-marked test)")


@CPU_ONLY
def test_quick_run_writes_a_complete_json_and_a_table(tmp_path, capsys):
    out = tmp_path / "run"
    cases = ["local_response_norm/alexnet.norm1", "conv_bn_act/resnet50.layer1.conv3", "max_pool2d/resnet50.stem",
             "sdpa/vit_b_16", "batch_norm_act.train/densenet121.block1"]
    # a real model and fuse() at a tiny size, inference only (test_model_measurements_of_a_pair
    # covers the training step)
    rc = main(["--quick", "--ops", *cases, "--shrink", "8", "--op-batch", "2", "--models", "resnet18",
               "--batch", "2", "--train-batch", "0", "--image-size", "32", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    _validate(results)
    # every variant of every case is accounted for: timed, or skipped/failed with a reason
    op_cases = {m["case"] for m in results["measurements"] if m["kind"] == "op"}
    assert op_cases == {c + " fp32" for c in cases}
    per_case = {c: {m["variant"] for m in results["measurements"] if m["case"] == c} for c in op_cases}
    assert per_case["conv_bn_act/resnet50.layer1.conv3 fp32"] == {
        "eager", "eager_cl", "compile", "triton", "triton_cl", "cuda", "cuda_cl", "torch", "torch_cl"}
    assert per_case["sdpa/vit_b_16 fp32"] == {"eager", "compile", "triton", "cuda", "torch"}
    stock = [m for m in results["measurements"]
             if m["kind"] == "op" and m["side"] == "stock" and m["variant"] != "compile"]
    assert stock and all(m["status"] == "ok" for m in stock)  # the baselines always run
    kernels = [m for m in results["measurements"] if m["variant"].split("_")[0] in ("triton", "cuda")]
    assert kernels and all(m["status"] == "skipped" and "no GPU" in m["reason"] for m in kernels)
    assert {m["case"] for m in results["measurements"] if m["kind"] == "model"} == {"resnet18 inference b2 fp32"}
    # the table: each case once, and the skipped list with its reasons
    for c in cases:
        assert c in printed
    assert "Skipped, and why:" in printed and "no GPU" in printed
    assert (out / "table.md").read_text().startswith("Measured on")
    assert (out / "speedup_ops.png").stat().st_size > 1000


@pytest.mark.gpu
def test_quick_gpu_run_times_the_kernels_against_the_roofline(tmp_path):
    """On a GPU: do_bench timings, the measured ceilings and roofline fractions, every fastnets
    kernel variant checked against stock, CUDA graphs of the fused model (a small subset)."""
    out = tmp_path / "run"
    rc = main(["--quick", "--ops", "local_response_norm/alexnet.norm1", "conv_bn_act/resnet50.layer1.conv3",
               "max_pool2d/vgg16.pool1", "sdpa/vit_b_16", "--op-batch", "16", "--models", "resnet18", "--batch", "8",
               "--train-batch", "8", "--budget", "240", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    _validate(results)
    ms = results["measurements"]
    kernels = [m for m in ms if m["variant"].split("_")[0] in ("triton", "cuda") and m["status"] == "ok"]
    assert any(m["variant"].startswith("triton") for m in kernels)
    assert all(0 < m["roofline_fraction"] for m in kernels)
    graphs = next(m for m in ms if m["case"] == "resnet18 inference b8 fp16" and m["variant"] == "fastnets_graphs")
    assert graphs["status"] == "ok" and graphs["check"].startswith("ok"), graphs
    assert (out / "speedup_models.png").exists() and (out / "speedup_ops.png").exists()


def _tiny_cnn(*, fused: bool = True, num_classes: int = 5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


@CPU_ONLY
def test_model_measurements_of_a_pair(tmp_path, monkeypatch):
    """The model machinery on a tiny stock/"fused" pair that is the same network (the harness, not
    fastnets, is under test): every variant is timed or skipped with its reason; the check, the
    throughput and the peak memory are filled in."""
    import fastnets.models as M

    monkeypatch.setattr(M, "tiny_cnn", _tiny_cnn, raising=False)
    monkeypatch.setattr(models, "CASES", models.CASES + [models.ModelCase("tiny_cnn", size=16, min_size=8)])
    monkeypatch.setattr(models, "fastnets_of", lambda case, stock: (copy.deepcopy(stock), "the same network"))
    rc = main(["--models", "tiny_cnn", "--batch", "1", "3", "--train-batch", "4", "--quick", "--no-plots",
               "--repeat", "2", "--out", str(tmp_path)])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    _validate(results)
    ms = {(m["case"], m["variant"]): m for m in results["measurements"]}
    assert set(ms) == {(f"tiny_cnn {mode} b{b} fp32", v) for mode, b in (("inference", 1), ("inference", 3),
                                                                          ("training", 4)) for v in models.VARIANTS}
    for case in ("tiny_cnn inference b1 fp32", "tiny_cnn inference b3 fp32", "tiny_cnn training b4 fp32"):
        for v in ("eager", "eager_cl", "fastnets"):
            m = ms[(case, v)]
            assert m["status"] == "ok", m
            assert math.isclose(m["items_per_s"], int(case.split(" b")[1].split()[0]) / (m["median_ms"] * 1e-3))
            assert m["peak_mem_bytes"] >= harness.tensor_bytes(_tiny_cnn())
        assert ms[(case, "fastnets")]["check"].startswith("ok (rel err")  # same network, same weights
        # --repeat 2: two runs of each variant, and the fused variant's ratio within each run
        assert len(ms[(case, "eager")]["runs_ms"]) == 2 and len(ms[(case, "fastnets")]["vs_best_stock_runs"]) == 2
        assert "runs: min / median / max (2 runs)" in (tmp_path / "table.md").read_text()
        assert ms[(case, "eager")]["speedup"] == 1.0
        assert "CUDA graphs" in ms[(case, "fastnets_graphs")]["reason"]
        assert "torch.compile is off" in ms[(case, "compile")]["reason"]


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--shrink", "0"], ["--op-batch", "0"], ["--batch", "0"], ["--dtype", "fp8"], ["--repeat", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert main(["--ops", "no_such_op"]) == 2
    assert "no op case matches 'no_such_op'" in capsys.readouterr().out
    assert main(["--models", "resnet5"]) == 2
    assert "unknown model(s) resnet5" in capsys.readouterr().out
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(c.name in listed for c in ops.CASES) and all(c.name in listed for c in models.CASES)


# ----------------------------------------------------------------------------------------------
# The op cases.

@pytest.mark.parametrize("case", ops.CASES, ids=[c.name for c in ops.CASES])
def test_op_case_runs_stock_and_the_reference_path(case):
    """Every case builds its inputs, runs its stock composite, counts its bytes and FLOPs, and (where
    its op has landed) its fastnets call on the reference path matches stock and records the
    dispatch key the op uses."""
    inp = case.make(CPU, torch.float32, 1, ops.CL if case.dims == 4 else ops.NCHW, shrink=32)
    assert all(not isinstance(v, torch.Tensor) or torch.isfinite(v).all() for v in inp.values())
    nbytes, flops = case.cost(inp)
    assert nbytes > 0 and flops >= 0 and (flops > 0) == (case.family in ("conv", "attention"))
    fn, why = ops.fastnets_function(case.op)
    if fn is None:
        pytest.skip(why)
    spec = ops.Spec("torch", "fastnets reference", "fastnets", ops.CL if case.dims == 4 else ops.NCHW, "torch")
    info = {}
    with ops._backend(spec):
        try:
            text = ops._check(case, spec, ops._function(case, spec), inp, {}, torch.float32, info)
        except ImportError as exc:  # an op family this op builds on has not landed yet
            pytest.skip(f"{case.op}: {exc}")
    assert text.startswith("ok"), text
    assert info["dispatch_ops"]


def test_check_marks_a_variant_that_ran_elsewhere_or_computed_something_else(monkeypatch):
    case = next(c for c in ops.CASES if c.name == "local_response_norm/alexnet.norm1")
    inp = case.make(CPU, torch.float32, 1, ops.NCHW, shrink=8)
    spec = ops.Spec("torch", "fastnets reference", "fastnets", ops.NCHW, "torch")
    # stock ops pretending to be fastnets: nothing fastnets records ran
    assert ops._check(case, spec, case.stock, inp, {}, torch.float32) == \
        "MISMATCH: ran on nothing that fastnets records, not torch"

    def wrong(inp):  # records the right backend, returns the wrong values
        fastnets._dispatch.record("lrn", "torch")
        return case.stock(inp) * 1.1
    assert ops._check(case, spec, wrong, inp, {}, torch.float32).startswith("MISMATCH (rel err 1.0e-01")


@CPU_ONLY
def test_a_triton_variant_runs_the_kernel_in_the_interpreter():
    """The harness's fastnets call reaches the Triton kernel it names (interpreter, tiny shape)."""
    case = next(c for c in ops.CASES if c.name == "local_response_norm/alexnet.norm2")
    inp = case.make(CPU, torch.float32, 1, ops.CL, shrink=16)
    spec = ops.Spec("triton_cl", "fastnets triton channels_last", "fastnets", ops.CL, "triton")
    with ops._backend(spec):
        assert ops._check(case, spec, ops._function(case, spec), inp, {}, torch.float32).startswith("ok")


def test_variants_and_their_skip_reasons():
    conv = next(c for c in ops.CASES if c.name == "conv_bn_act/resnet50.stem")
    attn_bwd = next(c for c in ops.CASES if c.name == "sdpa.bwd/vit_b_16")
    backends = {"triton": "no GPU", "cuda": "no GPU", "torch": None}
    names = {s.name: why for s, why in ops.specs(conv, CPU, backends, compile_on=True)}
    assert names == {"eager": None, "eager_cl": None, "triton": "no GPU", "triton_cl": "no GPU", "cuda": "no GPU",
                     "cuda_cl": "no GPU", "torch": None, "torch_cl": None, "compile": None}
    names = {s.name: why for s, why in ops.specs(attn_bwd, CPU, backends, compile_on=True)}
    assert set(names) == {"eager", "triton", "cuda", "torch", "compile"} and "backward" in names["compile"]
    assert [c.name for c in ops.select(["pool"], False)] == [c.name for c in ops.CASES if c.family == "pool"]
    assert {c.op for c in ops.select(["conv_bn_act"], False)} == {"conv_bn_act"}
    assert all(c.quick for c in ops.select(None, True)) and len(ops.select(None, False)) == len(ops.CASES)


# ----------------------------------------------------------------------------------------------
# Timing, memory and checks.

def test_rotation_count():
    assert harness.rotation_count(100, None) == 1
    assert harness.rotation_count(200 << 20, 50 << 20) == 1       # 4x the L2 already
    assert harness.rotation_count(30 << 20, 50 << 20) == 4        # ceil(100 / 30)
    assert harness.rotation_count(1 << 10, 50 << 20) == 8         # capped
    seen = []
    call = harness.rotating(seen.append, ["a", "b", "c"])
    for _ in range(5):
        call()
    assert seen == ["a", "b", "c", "a", "b"]


def test_time_cpu_statistics():
    calls = []
    t = harness.time_cpu(lambda: calls.append(1), warmup=2, min_reps=4, max_reps=6, target_s=0.0)
    assert t.reps == 4 and len(calls) == 6 and t.q20_ms <= t.median_ms <= t.q80_ms


def test_repeated_runs_pool_their_calls_and_keep_each_runs_median():
    runs = [harness._summary([1.0, 2.0, 3.0]), harness._summary([4.0, 5.0, 6.0])]
    t = harness.repeated(runs)
    assert t.runs_ms == [2.0, 5.0] and t.reps == 6 and t.median_ms == 3.5
    assert harness.repeated(runs[:1]) is runs[0]  # one run: as it was
    boom = RuntimeError("x")
    assert harness.repeated([runs[0], boom]) is boom


def test_spread_of_the_ratio_to_stock_within_each_run():
    ms = [_m("c", "eager", "stock", 4.0, runs_ms=[4.0, 4.0, 6.0]), _m("c", "eager_cl", "stock", 2.0,
                                                                     runs_ms=[2.0, 3.0, 1.0]),
          _m("c", "fastnets", "fastnets", 2.0, runs_ms=[2.5, 2.0, 1.0])]
    harness.speedups(ms)
    assert ms[2].vs_best_stock_runs == [0.8, 1.5, 1.0]  # each run's fastest stock over its own time
    m = ms[2].to_json()
    assert report._spread(m) == (0.8, 1.0, 1.5) and report._spread_text(m) == "0.80 / 1.00 / 1.50"
    # below 1 by more than PAR, but not in every run: on par within the spread, not "slower"
    assert report._finding(0.9, [], (0.8, 0.9, 1.1)) == "on par (within the runs' spread)"
    assert report._finding(0.9, [], (0.8, 0.9, 0.95)) == "**slower than stock**"
    assert report._finding(0.9, []) == "**slower than stock**" and report._finding(1.1, [], (0.9, 1.1, 1.2)) == "faster"


def test_time_cpu_interleaved_rounds_and_failures():
    order = []

    def failing():
        order.append("b")
        if order.count("b") == 2:
            raise RuntimeError("second call fails")

    out = harness.time_cpu_interleaved({"a": lambda: order.append("a"), "b": failing}, min_reps=3, max_reps=4,
                                       target_s=0.0)
    assert order == ["a", "b", "a", "b", "a"]  # rounds of one call each; b stops at its failure
    assert out["a"].reps == 3 and isinstance(out["b"], RuntimeError)
    with pytest.raises(RuntimeError):
        harness.unwrap(out["b"])


def test_peak_memory_tracks_the_storages_a_call_holds_at_once():
    weight = torch.randn(1000)

    def fn():
        a = torch.empty(1000)      # 4000 bytes
        b = torch.empty(2000)      # 8000 bytes: 12000 live
        del a
        c = torch.empty(500)       # 2000 bytes: 10000 live
        v = weight.view(10, 100)   # a view of what was live before: nothing new
        return b, c, v

    assert harness.peak_memory(fn, CPU, resident=123) == 123 + 12000
    assert harness.tensor_bytes(weight, weight[1:], nn.Linear(4, 2)) == 4000 + (8 + 2) * 4


def test_relative_error_and_checks():
    a = torch.randn(10)
    assert harness.relative_error(a, a.clone()) == 0.0
    assert harness.relative_error((a, a), (a, a * 2)) == pytest.approx(math.sqrt(a.pow(2).sum() / (5 * a.pow(2).sum())))
    nan = a.clone()
    nan[3] = float("nan")
    assert harness.relative_error(nan, a) == math.inf
    assert harness.relative_error(a[:5], a) == math.inf
    assert harness.check_text(1e-3, torch.float16).startswith("ok")
    assert harness.check_text(1e-1, torch.float16).startswith("MISMATCH")


def _m(case, variant, side, ms, kind="op", **kw):
    return harness.Measurement(kind, case, variant, variant, side, baseline="eager", median_ms=ms, **kw)


def test_speedups():
    ms = [_m("c", "eager", "stock", 4.0), _m("c", "eager_cl", "stock", 2.0), _m("c", "triton_cl", "fastnets", 1.0),
          _m("c", "cuda", "fastnets", None, status="error", reason="boom")]
    harness.speedups(ms)
    assert [m.speedup for m in ms] == [1.0, 2.0, 4.0, None]
    assert [m.vs_best_stock for m in ms] == [0.5, 1.0, 2.0, None]


# ----------------------------------------------------------------------------------------------
# Targets, the README table, the _measured.py tool.

def _gpu_results():
    ms = [_m("conv_bn_act/resnet50.stem fp16", "eager", "stock", 3.0),
          _m("conv_bn_act/resnet50.stem fp16", "eager_cl", "stock", 2.0),
          _m("conv_bn_act/resnet50.stem fp16", "triton_cl", "fastnets", 1.0, check="ok (rel err 1e-3)"),
          _m("conv_bn_act/resnet50.stem fp16", "cuda_cl", "fastnets", 1.6, check="ok (rel err 1e-3)"),
          _m("conv_bn_act/resnet50.stem fp16", "torch_cl", "fastnets", 1.8, check="ok (rel err 0)"),
          _m("local_response_norm/alexnet.norm1 fp16", "eager", "stock", 1.0),
          _m("local_response_norm/alexnet.norm1 fp16", "triton", "fastnets", 0.5, check="ok (rel err 1e-3)"),
          _m("local_response_norm/alexnet.norm1 fp16", "cuda", "fastnets", 0.2, check="MISMATCH (rel err 1)"),
          _m("local_response_norm/alexnet.norm1 fp16", "torch", "fastnets", 1.1, check="ok (rel err 0)"),
          _m("max_pool2d/vgg16.pool1 fp16", "eager", "stock", 1.0),
          _m("max_pool2d/vgg16.pool1 fp16", "triton_cl", "fastnets", 0.5, check="ok", gbps=2700.0),
          _m("resnet50 inference b256 fp16", "eager", "stock", 100.0, kind="model"),
          _m("resnet50 inference b256 fp16", "compile", "stock", 60.0, kind="model"),
          _m("resnet50 inference b256 fp16", "fastnets_graphs", "fastnets", 40.0, kind="model", check="ok")]
    harness.speedups(ms)
    cases = {"conv_bn_act/resnet50.stem fp16": {"op": "conv_bn_act", "family": "conv", "dispatch_ops": ["conv_bn_act"]},
             "local_response_norm/alexnet.norm1 fp16": {"op": "local_response_norm", "family": "lrn",
                                                        "dispatch_ops": ["lrn"]},
             "max_pool2d/vgg16.pool1 fp16": {"op": "max_pool2d", "family": "pool", "dispatch_ops": ["max_pool2d"]}}
    results = {"schema": report.SCHEMA, "measurements": [m.to_json() for m in ms], "cases": cases, "skipped": [],
               "ceilings": {"copy_gbps": 3000.0, "matrix_tflops": {"fp16": 700.0}, "copy_bytes": 1, "matmul_size": 1},
               "meta": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
                        "cuda": "13.0", "date": "2026-11-23T00:00:00+00:00", "command": "python -m fastnets.bench"}}
    results["targets"] = report.targets(results)
    return results


def test_targets_are_ratios_of_the_same_run():
    t = {x["target"].split(":")[0]: x for x in _gpu_results()["targets"]}
    conv = t["conv-bn-act inference, ResNet-50 shapes, fp16, channels_last"]
    assert conv["measured"] == pytest.approx(2.0) and conv["met"] is True  # eager_cl 2.0 / triton_cl 1.0
    assert t["pooling"]["measured"] == pytest.approx(0.9) and t["pooling"]["met"] is True
    # the cuda kernel's 5x does not count: its result did not match stock
    assert t["LRN"]["measured"] == pytest.approx(2.0) and t["LRN"]["met"] is False
    full = {x["target"]: x for x in _gpu_results()["targets"]}
    assert full["ResNet-50 inference, batch 256, fp16: >= 2x stock eager NCHW"]["measured"] == pytest.approx(2.5)
    assert full["ResNet-50 inference, batch 256, fp16: >= 1.1x torch.compile"]["measured"] == pytest.approx(1.5)
    assert t["attention forward, bf16"]["measured"] is None and t["attention forward, bf16"]["met"] is None


def test_readme_table_says_where_fastnets_is_slower(tmp_path):
    results = _gpu_results()
    results["measurements"].append(_m("max_pool2d/vgg16.pool1 fp16", "cuda_cl", "fastnets", 2.0, check="ok",
                                      vs_best_stock=0.5).to_json())
    table = report.markdown(results)
    assert "| conv_bn_act/resnet50.stem fp16 | 3 | 2 | - | 1 (triton_cl) | 2.00 | - | faster |" in table
    assert "**wrong result: cuda**" in table  # the mismatching LRN kernel is named, not ranked
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{report.END}\ntail\n") and "| ResNet-50 inference" in text
    slow = _gpu_results()
    slow["measurements"][2]["vs_best_stock"] = 0.8  # triton_cl slower than the fastest stock variant
    assert "**slower than stock**" in report.markdown(slow)


def test_measured_tool_ranks_backends_and_reads_the_test_log(tmp_path, capsys):
    results = _gpu_results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_conv" name="test_fwd[triton-float16]"/>'
        '<testcase classname="tests.test_conv" name="test_fwd[cuda-float16]"/>'
        '<testcase classname="tests.test_lrn" name="test_fwd[triton]"/>'
        '<testcase classname="tests.test_lrn" name="test_fwd[cuda]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_pool" name="test_fwd[cuda]"><skipped message="x"/></testcase>'
        '</testsuite></testsuites>')
    assert measured.main([str(tmp_path / "results.json")]) == 0
    text = capsys.readouterr().out
    assert '"conv_bn_act": "' in text.split('"cuda"')[1].split("}")[0]  # conv's cuda tests passed
    assert '"lrn"' not in text.split('"cuda"')[1].split("}")[0]         # lrn's failed; pool's were skipped
    assert '"conv_bn_act": {"H100": ("triton", ' in text                 # 1.0 < cuda 1.6 < torch 1.8
    assert '"lrn": {"H100": ("triton", ' in text                         # cuda mismatched: not a candidate
    results["meta"]["device"] = "cpu"
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit):
        measured.main([str(tmp_path / "results.json")])


def test_pytest_benchmark_suite_runs_the_same_cases(tmp_path):
    """`pytest benchmarks/` collects the harness's cases and times them through pytest-benchmark's
    fixture (one op case on the CPU here)."""
    # A clean pytest: none of this run's settings (the interpreter, poisoning, xdist worker variables).
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTNETS_POISON") and not k.startswith(("PYTEST_", "XDIST_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_ops.py", "-q", "-p", "no:cacheprovider", "--bench-cpu-ops",
         "--bench-shrink", "16", "--bench-op-batch", "1", "--bench-quick",
         "-k", "norm1-float32-eager or norm1-float32-torch_cl",
         f"--benchmark-json={tmp_path / 'b.json'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "b.json").read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert {"test_op[local_response_norm/alexnet.norm1-float32-eager]",
            "test_op[local_response_norm/alexnet.norm1-float32-torch_cl]"} <= names
    assert all(b["extra_info"]["bytes"] > 0 for b in data["benchmarks"])
