"""The GPU window, in one command (`bash scripts/gpu_run.sh`): four stages in priority order, each
with a deadline printed at its start, each writing as it goes, so that a kill (SIGTERM, the
command's timeout) still leaves a readable summary.

  1 env+build   machine, versions; fastnets._C for this device's architecture only (nvcc in
                parallel, one job per source, on all cores); then every Triton variant stages 2
                and 3 launch, compiled in parallel into Triton's cache (one process per core)
  2 correctness every op family, Triton and CUDA C++, fwd+bwd, fp16/bf16/fp32, both layouts,
                a small odd shape and a real one, float64 reference, DESIGN's 2x rule, one fixed
                tile config per kernel (FASTNETS_AUTOTUNE=fixed: no search) (scripts/gpu_checks.py)
  3 headline    same-run ratios (scripts/gpu_bench.py): conv-bn-act, attention, memory-bound
                ops against the copy bandwidth, ResNet-50 inference and an AMP training step
  4 remaining   the gpu-marked tests, most valuable first, stopped at the deadline; then
                compute-sanitizer memcheck and racecheck on one small case per CUDA C++ family

Budget (--budget, default 540 s = 9 minutes of the 10-minute command limit; a 15-minute window
also pays 1-2 minutes of machine start). Stage k ends at start + (SHARES[0] + ... + SHARES[k]) x
budget, so time a stage leaves unused goes to the next; the last stage ends MARGIN_S (8 s; 5% of a shorter
budget) before the budget. A stage still running at its deadline is stopped (SIGINT, then SIGTERM, then SIGKILL) and
what it wrote is kept. Inside a stage, an item whose estimate does not fit before the deadline is
recorded as dropped, not started.

How the shares were estimated (seconds on the H200 machine, 16 cores; compile seconds measured on
this project's 2-core CPU machine, Triton 3.9 for sm_90, benchmarks/results/aot-compile-2026-11-23/
triton-3.9.log: _conv_gemm 4.3 s a variant, _conv_depthwise 3.3, _attn_fwd 2.6, _attn_bwd_dq 2.1,
_attn_bwd_dkdv 1.4, the elementwise and reduction kernels 0.1-0.45; the H200 host's cores are
taken as 1.5x faster):
  stage 1 (0.28 x 540 = 151 s): nvcc of csrc/ for one architecture: 2m21s of CPU time here over 13
    sources, the largest ~40 s, so ~45 s wall on 16 cores; pip ~10 s. Triton, 8 workers per mode:
    stage 2 at one config: conv 36 variants (3 kernels x 3 dtypes x 2 layouts x 2 shapes) x 4.3 s,
    attention 12 x 6.3 s (fwd, dq, dkdv, delta), the 5 other families ~60 x 0.3 s = ~250 s here,
    ~170 s there / 8 = ~21 s; stage 3 at every autotune config: conv fp16 ~8 specializations x 11
    configs x 4.3 s, attention 2 head dims x 5 configs x 6.1 s, memory-bound ~10 x 6 x 0.4 s, the
    fused ResNet-50 at one config ~25 x 4.3 s = ~570 s here, ~380 s there / 8 = ~48 s; plus ~10 s
    to start the workers (torch import, CUDA context). ~115 s in all.
  stage 2 (0.17 x 540 = 92 s): 336 checks (168 per backend); a small one ~0.05 s, a real one
    ~0.3 s (fwd+bwd in the dtype, stock, float64 reference) = ~60 s.
  stage 3 (0.33 x 540 = 178 s): 8 conv cases x ~5 variants x ~0.15 s (do_bench 10 ms warm-up +
    40 ms) + autotuning (11 configs x 0.13 s each) ~ 25 s; 8 conv-alone ~ 3 s; 12 attention cases
    ~ 45 s (8k backward: ~90 ms a call); 5 memory-bound cases ~ 8 s; ResNet-50: build + fuse ~ 15 s,
    4 inference variants at b256 ~ 10 s, graph capture ~ 5 s, AMP step ~ 10 s; ceilings ~ 5 s.
  stage 4 (the rest, ~110 s): the gpu-marked tests (16 files, ~60-120 s with 4 workers), then
    compute-sanitizer, 2 tools x 7 families at ~5 s each (10-100x slower kernels, small shapes).

Drop order under a shorter --budget (each stage keeps its share, so the cuts fall inside stages,
from the end of each stage's priority list): stage 4's sanitizer, then its least valuable test
files (TEST_ORDER); stage 3's ResNet-50 (inference and the training step), the memory-bound ops,
attention backward, attention forward, then the batch-256 conv shapes; stage 2's real shapes
(CUDA C++ first, then Triton), keeping the small odd shapes; stage 1 never drops the build, and a
precompile cut short leaves the rest to Triton's JIT in the stage that launches it.

Files under --out (at most 8, none in folders): FILES below. `--rehearse` runs the same stages on
the CPU (Triton interpreter, tiny shapes; the GPU-only steps recorded as skipped with the reason).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("summary.md", "results.json", "env_build.log", "check.log", "bench.log", "tests.log", "tests.xml",
         "sanitizer.log")
STAGES = [  # (number, name, share of the budget, log file)
    (1, "env+build", 0.28, "env_build.log"),
    (2, "correctness", 0.17, "check.log"),
    (3, "headline", 0.33, "bench.log"),
    (4, "remaining", 0.22, "tests.log"),
]
MARGIN_S = 8.0     # the last stage ends this long before the budget (5% of a short budget): the summary is written in it
GRACE_S = 6.0      # a stopped stage may take this long past its deadline to exit (SIGINT/SIGTERM/KILL)
DEFAULT_BUDGET = {"gpu": 540.0, "rehearse": 45.0}
# gpu-marked test files, most valuable first: the op families' native parity at GPU sizes, then
# the cross-cutting ones, scale last (4 GB tensors)
TEST_ORDER = ["test_conv.py", "test_attention.py", "test_norm_act.py", "test_pool.py", "test_lrn.py",
              "test_layer_norm.py", "test_bias_act.py", "test_graphs.py", "test_models.py", "test_fuse.py",
              "test_determinism.py", "test_edge.py", "test_transformer.py", "test_bench.py", "test_distributed.py",
              "test_scale.py"]


def deadlines(budget: float) -> list[float]:
    """Seconds from the start at which each stage must have ended."""
    out, acc = [], 0.0
    for _, _, share, _ in STAGES:
        acc += share
        out.append(round(acc * budget, 1))
    out[-1] = round(budget - min(MARGIN_S, 0.05 * budget), 1)
    return out


# ----------------------------------------------------------------------------------------------
# Checking what a run left (the CI test uses it; the driver runs it at the end).

def check_out(out: str) -> list[str]:
    """Problems with a run's output folder: more than 8 files, files deeper than $OUT/a/b/file or
    not in FILES, no summary, a stage unaccounted for or past its deadline."""
    problems, files = [], []
    for dirpath, _, names in os.walk(out):
        for n in names:
            files.append(os.path.relpath(os.path.join(dirpath, n), out))
    if len(files) > 8:
        problems.append(f"{len(files)} files under the output folder (at most 8 come back): {sorted(files)}")
    for f in files:
        if f.count(os.sep) > 2:
            problems.append(f"{f}: deeper than two folders (does not come back)")
        elif f not in FILES:
            problems.append(f"{f}: not one of the run's files {FILES}")
    if "summary.md" not in files:
        problems.append("no summary.md")
    try:
        with open(os.path.join(out, "results.json")) as fh:
            run = json.load(fh)["gpu_run"]
    except (OSError, ValueError, KeyError) as exc:
        return problems + [f"results.json unreadable: {exc!r}"]
    seen = {s["stage"]: s for s in run["stages"]}
    for number, name, _, _ in STAGES:
        s = seen.get(number)
        if s is None or s.get("status") in (None, "pending"):
            if not run.get("killed"):
                problems.append(f"stage {number} ({name}) not accounted for")
            continue
        if s.get("elapsed_s") is None and s["status"] != "not started":
            problems.append(f"stage {number} ({name}): no time recorded")
        if s.get("elapsed_s") is not None and s.get("allotted_s") is not None \
                and s["elapsed_s"] > s["allotted_s"] + GRACE_S:
            problems.append(f"stage {number} ({name}) overran its share: {s['elapsed_s']:.1f} s of "
                            f"{s['allotted_s']:.1f} s")
    return problems


# ----------------------------------------------------------------------------------------------
# The driver.

class Driver:
    def __init__(self, args):
        self.args = args
        self.rehearse = args.rehearse
        self.budget = args.budget or DEFAULT_BUDGET["rehearse" if self.rehearse else "gpu"]
        self.out = os.path.abspath(args.out)
        self.work = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gpu_run-{os.getpid()}")
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        self.t0 = time.time()
        self.deadlines = deadlines(self.budget)
        self.stages = [{"stage": n, "name": name, "status": "pending", "deadline_s": d, "allotted_s": None,
                        "started_s": None, "elapsed_s": None, "items": [], "note": None}
                       for (n, name, _, _), d in zip(STAGES, self.deadlines)]
        self.child = None
        self.killed = None
        self.problems: list[str] = []

    def now(self) -> float:
        return time.time() - self.t0

    def log(self, text: str) -> None:
        print(f"[gpu_run {self.now():6.1f}s] {text}", flush=True)

    def on_signal(self, signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second signal does not restart this
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.killed = signal.Signals(signum).name
        self.log(f"{self.killed}: stopping the current stage and writing the summary")
        self.stop_child()
        for s in self.stages:
            if s["status"] == "running":
                s["status"] = f"killed ({self.killed})"
                s["elapsed_s"] = round(self.now() - s["started_s"], 1)
                self.collect(s)
            elif s["status"] == "pending":
                s["status"] = "not started"
                s["note"] = f"the run was killed ({self.killed}) before this stage"
        self._write()
        os._exit(128 + signum)

    def stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 2.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def collect(self, s: dict) -> None:
        path = os.path.join(self.work, f"stage{s['stage']}.json")
        try:
            with open(path) as f:
                got = json.load(f)
        except (OSError, ValueError):
            return
        s["items"] = got.get("items", [])
        if got.get("note"):
            s["note"] = got["note"]

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.log(f"budget {self.budget:.0f} s; deadlines: " + ", ".join(
            f"stage {s['stage']} {s['name']} at +{s['deadline_s']:.0f}s" for s in self.stages))
        self.write()
        for s, (number, name, _, logname) in zip(self.stages, STAGES):
            start = self.now()
            s["started_s"] = round(start, 1)
            s["allotted_s"] = round(max(0.0, s["deadline_s"] - start), 1)
            s["status"] = "running"
            self.log(f"stage {number} {name}: starts; deadline +{s['deadline_s']:.0f}s ({s['allotted_s']:.0f} s)")
            self.write()
            if s["allotted_s"] < 1:
                s.update(status="dropped", elapsed_s=0.0, note="no time left before its deadline")
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--stage", str(number), "--work", self.work,
                   "--out", self.out, "--deadline", str(self.t0 + s["deadline_s"]), "--budget", str(self.budget)]
            if self.rehearse:
                cmd.append("--rehearse")
            with open(os.path.join(self.out, logname), "a") as logf:
                logf.write(f"== stage {number} {name}: deadline +{s['deadline_s']:.0f}s of the run "
                           f"({s['allotted_s']:.0f} s), {datetime.datetime.now().isoformat(timespec='seconds')}\n")
                logf.flush()
                self.child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                              start_new_session=True)
                while self.child.poll() is None:
                    if self.now() >= s["deadline_s"]:
                        self.log(f"stage {number} reached its deadline: stopping it")
                        self.stop_child()
                        s["note"] = "stopped at its deadline"
                        break
                    time.sleep(0.5)
                    self.collect(s)
                    self.write()
            rc = self.child.returncode
            self.child = None
            s["elapsed_s"] = round(self.now() - start, 1)
            self.collect(s)
            failed = [i for i in s["items"] if i["status"] in ("failed", "error")]
            if s.get("note") == "stopped at its deadline":
                s["status"] = "stopped at deadline"
            elif rc != 0:
                s["status"] = f"failed (exit {rc})"
            else:
                s["status"] = "failed items" if failed else "ok"
            self.log(f"stage {number} {name}: {s['status']} in {s['elapsed_s']:.1f} s")
            self.write()
        self.write()
        self.problems = check_out(self.out)
        self.write()
        for p in self.problems:
            self.log(f"PROBLEM: {p}")
        bad = self.problems or any(s["status"] != "ok" for s in self.stages)
        return 1 if bad else 0

    # --- the two files the driver owns ------------------------------------------------------

    def write(self, quiet: bool = False) -> None:
        # A signal waits until both files are whole (the handler writes them again, then exits).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            self._write()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _write(self) -> None:
        results = {}
        bench = os.path.join(self.work, "bench.json")
        if os.path.exists(bench):
            try:
                with open(bench) as f:
                    results = json.load(f)
            except ValueError:
                results = {}
        results.setdefault("meta", self.meta())
        results["gpu_run"] = {"budget_s": self.budget, "rehearse": self.rehearse, "elapsed_s": round(self.now(), 1),
                              "killed": self.killed, "stages": self.stages, "problems": self.problems,
                              "command": "bash scripts/gpu_run.sh " + " ".join(map(shlex.quote, sys.argv[1:]))}
        _atomic(os.path.join(self.out, "results.json"), json.dumps(results, indent=1, default=str))
        _atomic(os.path.join(self.out, "summary.md"), summary(results))

    def meta(self) -> dict:
        path = os.path.join(self.work, "meta.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "platform": platform.platform(), "device": "cpu" if self.rehearse else "cuda"}


def _atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def summary(results: dict) -> str:
    from gpu_report import render  # scripts/gpu_report.py

    return render(results)


# ----------------------------------------------------------------------------------------------
# A stage (child process).

class Stage:
    def __init__(self, args):
        self.args = args
        self.number = args.stage
        self.deadline = args.deadline
        self.rehearse = args.rehearse
        self.path = os.path.join(args.work, f"stage{args.stage}.json")
        self.record = {"stage": args.stage, "items": [], "note": None}
        self.stop = False
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum, frame):
        self.stop = True
        raise KeyboardInterrupt

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        _atomic(self.path, json.dumps(self.record, default=str))

    def item(self, name: str, fn, est: float = 0.0, skip: str | None = None):
        """Runs one item unless skipped or its estimate does not fit before the deadline."""
        it = {"name": name, "status": None, "seconds": 0.0, "detail": None}
        self.record["items"].append(it)
        if skip:
            it.update(status="skipped", detail=skip)
        elif self.stop or self.left() < est:
            it.update(status="dropped", detail=f"did not fit before the stage's deadline (estimate {est:.0f} s, "
                                               f"{max(0.0, self.left()):.0f} s left)")
        else:
            t = time.time()
            it["status"] = "running"
            self.save()
            try:
                got = fn()
                it.update({"status": "ok", **(got if isinstance(got, dict) else {"detail": got})})
            except KeyboardInterrupt:
                it.update(status="stopped", detail="stopped at the stage's deadline")
                self.stop = True
            except AssertionError as exc:
                it.update(status="failed", detail=str(exc).splitlines()[0][:400] if str(exc) else "assertion")
            except Exception as exc:  # noqa: BLE001 - an item that breaks is a result
                it.update(status="error", detail=f"{type(exc).__name__}: {str(exc)[:400]}")
                traceback.print_exc()
            it["seconds"] = round(time.time() - t, 2)
        print(f"  {it['status']:8s} {it['seconds']:6.2f}s  {name}: {it['detail']}", flush=True)
        self.save()
        return it


def _inject(stage: int) -> None:
    if os.environ.get("GPU_RUN_FAIL_STAGE") == str(stage):
        raise RuntimeError(f"injected failure in stage {stage} (GPU_RUN_FAIL_STAGE)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bash scripts/gpu_run.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rehearse", action="store_true", help="the same stages on the CPU (interpreter, tiny shapes)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 540; 45 with --rehearse)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_run"),
                    help="output folder (default $OUT, else out/gpu_run)")
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--precompile", help=argparse.SUPPRESS)  # "k/N/mode": a compile worker
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(1, ROOT)  # fastnets from this checkout, installed or not
    if args.budget is not None and args.budget <= 0:
        ap.error("--budget must be positive")
    if args.precompile:
        import gpu_stages

        return gpu_stages.precompile_worker(args)
    if args.stage:
        import gpu_stages

        stage = Stage(args)
        try:
            _inject(args.stage)
            getattr(gpu_stages, f"stage{args.stage}")(stage)
        except KeyboardInterrupt:
            stage.record["note"] = "stopped at its deadline"
        finally:
            stage.save()
        return 0
    return Driver(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
