"""The bodies of scripts/gpu_run.py's stages (each runs in its own process; see gpu_run.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
NO_GPU = "no GPU in a rehearsal"


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("FASTNETS_BACKEND", None)
    return env


def _sh(cmd: list[str], timeout: float, env=None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), env=env or _env(), cwd=ROOT)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout:.0f} s: {exc}"
    except OSError as exc:
        return 127, str(exc)


def _stop_group(proc, grace: float) -> None:
    """Ends a child started in its own session (and everything it started): SIGINT, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 2.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Stage 1: environment, build, precompile.

def stage1(st) -> None:
    gpu = not st.rehearse

    def env_info():
        import platform

        import torch
        import triton

        rc, smi = _sh(["nvidia-smi"], 20) if shutil.which("nvidia-smi") else (127, "nvidia-smi: not found")
        print(smi, flush=True)
        cuda = torch.cuda.is_available()
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "device": "cuda" if gpu else "cpu",
                "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "triton": triton.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                "arch": "".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
                "cpu_count": os.cpu_count(), "command": "bash scripts/gpu_run.sh"}
        print(json.dumps(meta), flush=True)
        with open(os.path.join(st.args.work, "meta.json"), "w") as f:
            json.dump(meta, f)
        if gpu and not cuda:
            raise RuntimeError("torch sees no CUDA device")
        return f"{meta.get('gpu') or 'CPU'}; torch {meta['torch']}, CUDA {meta['cuda']}, Triton {meta['triton']}"

    st.item("environment", env_info, est=5)
    meta_path = os.path.join(st.args.work, "meta.json")
    arch = json.load(open(meta_path)).get("arch") if os.path.exists(meta_path) else None

    def build():
        env = _env(FASTNETS_BUILD_CUDA="1", FASTNETS_CUDA_ARCHS=arch or "90")
        rc, log = _sh([PY, "-m", "pip", "install", "-v", "--no-index", "--no-deps", "--no-build-isolation", "-e", ROOT],
                      st.left() - 5, env)
        print(log[-20000:], flush=True)
        assert rc == 0, f"the build failed (exit {rc}); env_build.log has nvcc's output"
        return f"fastnets._C for sm_{arch} (pip exit {rc})"

    st.item("build fastnets._C", build, est=60, skip=None if gpu else
            f"{NO_GPU}: fastnets._C is built for the device's architecture on the GPU machine (CI builds it too)")
    st.item("pin tile configs", lambda: "FASTNETS_AUTOTUNE=fixed for stage 2 (one config per kernel, no search); "
            "stage 3 autotunes over precompiled configs", est=0)

    def precompile():
        n = max(2, min(16, os.cpu_count() or 2))
        procs, logs = [], []
        t0 = time.time()
        for k in range(n):
            mode = "fixed" if k < n // 2 else "search"
            idx, count = (k, n // 2) if mode == "fixed" else (k - n // 2, n - n // 2)
            logs.append(os.path.join(st.args.work, f"precompile-{k}.log"))
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen([PY, os.path.join(ROOT, "scripts", "gpu_run.py"), "--precompile",
                                               f"{idx}/{count}/{mode}", "--work", st.args.work],
                                              env=_env(FASTNETS_AUTOTUNE=mode), cwd=ROOT, start_new_session=True,
                                              stdout=log, stderr=subprocess.STDOUT))
        cut = False
        try:
            for p in procs:
                p.wait(max(0.1, st.left() - 3))
        except subprocess.TimeoutExpired:
            cut = True
        finally:
            for p in procs:
                _stop_group(p, 0.0)
        outs = [open(f).read() for f in logs]
        print("\n".join(o[-3000:] for o in outs), flush=True)
        counts = [int(line.split()[1]) for o in outs for line in o.splitlines() if line.startswith("compiled ")]
        if cut:
            return {"status": "stopped", "detail": f"cut at the stage's deadline after {time.time() - t0:.0f} s "
                    f"({sum(counts)} compiles reported): the rest compiles at first launch in stages 2 and 3"}
        assert all(p.returncode == 0 for p in procs), "a compile worker failed (env_build.log)"
        return f"{sum(counts)} Triton compiles by {n} processes in {time.time() - t0:.0f} s"

    st.item("Triton precompile", precompile, est=20, skip=None if gpu else
            f"{NO_GPU}: the interpreter compiles nothing")


def precompile_worker(args) -> int:
    """One compile worker: runs the fastnets side of its mode's items with launches turned into
    compiles of its share of the variants."""
    import torch

    import gpu_bench
    import gpu_checks

    idx, count, mode = args.precompile.split("/")
    done = {"n": 0}
    gpu_bench.intercept(int(idx), int(count), set(), done)
    dev = torch.device("cuda")
    t = time.time()
    if mode == "fixed":
        for it in gpu_checks.items(False, ["triton"]):
            if "skip" not in it:
                try:
                    gpu_checks.precompile_call(it, dev)
                except Exception as exc:  # noqa: BLE001 - the stage itself reports real failures
                    print(f"precompile {it['name']}: {type(exc).__name__}: {exc}", flush=True)
    else:
        _precompile_bench(dev)
    print(f"compiled {done['n']} in {time.time() - t:.1f} s ({mode} {idx}/{count})", flush=True)
    return 0


def _precompile_bench(dev) -> None:
    import torch

    import gpu_bench
    import fastnets.functional as FF
    from fastnets import use_backend
    from fastnets.bench import ops

    cases = []
    for b in (64, 256):
        cases += gpu_bench.conv_cases(b)[0]
    cases += gpu_bench.attention_cases("fwd") + gpu_bench.attention_cases("bwd") + gpu_bench.memory_cases()
    for case in cases:
        dtype = torch.bfloat16 if case.family == "attention" else torch.float16
        for layout in case.layouts:
            try:
                with use_backend("triton"):
                    inp = case.make(dev, dtype, case.batch(64), layout)
                    ops._runner(case, lambda i: case.fast(FF, i), inp)()
            except Exception as exc:  # noqa: BLE001
                print(f"precompile {case.name}: {type(exc).__name__}: {exc}", flush=True)
    try:
        import fastnets
        from fastnets.bench import models

        from fastnets.kernels import _common

        _common.FIXED_CONFIG = True  # as stage 3 runs the model
        case = models.select(["resnet50"], dev, False)[0]
        for mode, batch in (("inference", 256), ("training", 64)):
            calls = models.Calls(case, mode, batch, case.size, torch.float16, dev)
            model, x = calls.model("fastnets"), calls.inputs("fastnets")
            if mode == "inference":
                with torch.no_grad():
                    model(x)
            else:
                with torch.autocast("cuda", torch.float16):
                    loss = model(x).float().sum()
                loss.backward()
        del fastnets
    except Exception as exc:  # noqa: BLE001
        print(f"precompile resnet50: {type(exc).__name__}: {exc}", flush=True)


# ----------------------------------------------------------------------------------------------
# Stage 2: correctness.

def stage2(st) -> None:
    os.environ.setdefault("FASTNETS_AUTOTUNE", "fixed")
    os.environ.setdefault("FASTNETS_POISON", "1")
    if st.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"
    import gpu_checks
    import torch
    from fastnets import _ext

    dev = _device()
    backends = ["triton"] + (["cuda"] if dev.type == "cuda" and _ext.device_status()[0] > 0 else [])
    if dev.type == "cuda" and "cuda" not in backends:
        st.record["note"] = f"CUDA C++ backend unavailable: {_ext.device_status()[1]}"
    from fastnets import BackendError

    def check(it):
        try:
            return gpu_checks.run_item(it, dev)
        except BackendError as exc:  # the backend says it does not take this input: not a failure
            return {"status": "skipped", "detail": f"unsupported by the backend: {exc}"}

    for it in gpu_checks.items(st.rehearse, backends):
        est = (0.6 if it["size"] == "real" else 0.1) if dev.type == "cuda" else 1.0
        res = st.item(it["name"], lambda it=it: check(it), est=est, skip=it.get("skip"))
        res.update(family=it["family"], backend=it["backend"], dtype=it["dtype"], layout=it["layout"], size=it["size"])
        st.save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Stage 3: headline numbers.

def stage3(st) -> None:
    if st.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import gpu_bench
    from fastnets.bench import __main__ as cli
    from fastnets.bench import harness, ops, report

    dev = _device()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    meta = cli.environment(dev, ["(scripts/gpu_run.sh)"])
    meta["command"] = "bash scripts/gpu_run.sh" + (" --rehearse" if st.rehearse else "")
    backends = cli.fastnets_backends(dev, ["triton", "cuda"] if dev.type == "cuda" else ["torch"])
    budget = harness.Budget(max(1.0, st.left()))
    session = harness.Session(dev, budget)
    opst = ops.Settings(dtypes=None, batch=2 if st.rehearse else 64, backends=backends, compile_on=False,
                        ceilings=None, quick=True, shrink=8 if st.rehearse else 1)
    results = {"schema": report.SCHEMA, "meta": meta, "config": {"backends": backends, "gpu_run": True},
               "ceilings": None}
    path = os.path.join(st.args.work, "bench.json")

    def snapshot():
        harness.speedups(session.measurements)
        results.update(measurements=[m.to_json() for m in session.measurements], skipped=session.skipped,
                       cases=session.cases, elapsed_s=round(budget.elapsed(), 1))
        results["targets"] = report.targets(results)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report.clean(results), f)
        os.replace(tmp, path)

    session.checkpoint = snapshot
    est_gpu = {"ceilings": 5, "conv b64": 15, "conv b256": 25, "attention fwd": 20, "attention bwd": 25,
               "memory-bound ops": 8, "resnet50": 45}
    for it in gpu_bench.items(st.rehearse):
        est = est_gpu.get(it["name"], 2) if dev.type == "cuda" else 1.0
        st.item(it["name"], lambda it=it: gpu_bench.run_item(it, session, opst, results, st.rehearse), est=est)
        snapshot()


# ----------------------------------------------------------------------------------------------
# Stage 4: the gpu-marked tests, then compute-sanitizer.

def stage4(st) -> None:
    import gpu_run

    out = st.args.out
    gpu = not st.rehearse
    files = [f for f in gpu_run.TEST_ORDER if os.path.exists(os.path.join(ROOT, "tests", f))]
    if st.rehearse:
        files = files[3:4]  # one file: its gpu tests are collected and skipped here
    sanitize_s = 0.0 if st.rehearse else min(60.0, 0.35 * st.left())

    def tests():
        cmd = [PY, "-m", "pytest", *[f"tests/{f}" for f in files], "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "-p", "no:randomly", f"--junitxml={os.path.join(out, 'tests.xml')}", "-o", "junit_family=xunit1"]
        if gpu:
            cmd += ["-n", "4", "--dist", "loadfile"]
        budget = st.left() - sanitize_s - 5
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True,
                                stdout=None, stderr=subprocess.STDOUT)
        try:
            proc.wait(max(1.0, budget))
        except subprocess.TimeoutExpired:
            _stop_group(proc, 2.5)  # SIGINT first: pytest writes its junit XML and summary
            return f"stopped at the deadline after {budget:.0f} s (what ran is in tests.xml)"
        finally:
            _stop_group(proc, 1.5)  # the stage itself is being stopped: pytest (its own session) too
        assert proc.returncode in (0, 5), f"pytest exit {proc.returncode} (tests.log)"
        return f"pytest exit {proc.returncode}: {', '.join(files)}"

    st.item("gpu-marked tests", tests, est=10)

    def sanitize():
        tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        assert os.path.exists(tool), "compute-sanitizer not found"
        code = ("import sys, torch; sys.path.insert(0, 'scripts'); import gpu_checks as g; "
                "[g.run_item(i, torch.device('cuda')) for i in g.items(False, ['cuda']) "
                "if 'skip' not in i and i['size'] == 'small' and i['dtype'] == 'fp16' "
                "and i['layout'] in ('nchw', 'contiguous')]; print('ran')")
        lines = []
        with open(os.path.join(out, "sanitizer.log"), "a") as log:
            for name, extra in (("memcheck", ["--leak-check", "full"]), ("racecheck", ["--racecheck-report", "all"])):
                cmd = [tool, "--tool", name, *extra, "--error-exitcode", "97", "--print-limit", "50", PY, "-c", code]
                rc, text = _sh(cmd, max(1.0, st.left() / 2 - 1), _env(PYTORCH_NO_CUDA_MEMORY_CACHING="1",
                                                                      FASTNETS_AUTOTUNE="fixed"))
                log.write(f"== {name}: exit {rc}\n{text[-200000:]}\n")
                log.flush()
                lines.append(f"{name} exit {rc}")
        assert all(line.endswith(" 0") for line in lines), "; ".join(lines) + " (sanitizer.log)"
        return "; ".join(lines)

    st.item("compute-sanitizer memcheck + racecheck", sanitize, est=20,
            skip=f"{NO_GPU}: compute-sanitizer needs a device" if not gpu else None)
