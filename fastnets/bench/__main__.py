"""python -m fastnets.bench: the benchmark suite from the command line (DESIGN section 6).

    python -m fastnets.bench                         # the default set for this machine
    python -m fastnets.bench --quick                 # a short subset (about 2 minutes on a GPU)
    python -m fastnets.bench --models resnet50 alexnet --dtype fp16 --batch 1 32 256
    python -m fastnets.bench --ops conv_bn_act pool --op-batch 128
    python -m fastnets.bench --list                  # every op case and model

On a GPU: the op cases (stock eager NCHW and channels_last, torch.compile, each fastnets backend),
then the models, timed with triton's do_bench, with the copy bandwidth and matrix rate measured
first for the roofline fractions. On a CPU: the models, stock against fused on the reference path,
timed by wall clock; what cannot mean anything there (kernels, roofline, compiled baselines of GPU
kernels) is skipped and the reason printed. Writes results.json, table.md (the README table) and
the speedup plots into --out.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import traceback

import torch

from fastnets.bench import harness, models, ops, report, roofline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fastnets.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="*", metavar="NAME",
                    help="op cases to run: case names, ops (conv_bn_act, max_pool2d, ...), families (pool, conv, ...) "
                         "or 'all'; with no name, the default set. Default: on a GPU every case; on a CPU none")
    ap.add_argument("--models", nargs="*", metavar="NAME",
                    help="models to run (fastnets.models names, or 'all' for the whole family); with no name, the "
                         "default set of this machine")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                    help="dtypes (default: fp16 for convolutions, pooling, LRN and models, bf16 for attention, "
                         "on a GPU; fp32 on a CPU). Models use the first")
    ap.add_argument("--batch", nargs="+", type=int, metavar="N",
                    help="model inference batch sizes (default: 1 32 256 on a GPU, 8 on a CPU)")
    ap.add_argument("--train-batch", type=int, metavar="N",
                    help="batch of the models' training step; 0 for none (default: 64 on a GPU, 4 on a CPU)")
    ap.add_argument("--op-batch", type=int, metavar="N",
                    help="N of the op cases that do not fix it (default: 64 on a GPU, 8 on a CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="a short subset: fewer cases, shorter timings, no torch.compile (about 2 minutes on a GPU)")
    ap.add_argument("--out", metavar="DIR", help="where results.json, table.md and the plots go "
                    "(default: out/bench-<machine>-<date>)")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help="stop starting new measurements after this long and list what was left out "
                         "(default: 480 on a GPU, 120 with --quick; 300 on a CPU, 60 with --quick)")
    ap.add_argument("--compile", choices=("auto", "all", "none"), default="auto",
                    help="torch.compile baselines: auto (on a GPU: every op case and the headline model "
                         "configurations; on a CPU: none), all, none")
    ap.add_argument("--backends", nargs="+", choices=("triton", "cuda", "torch"),
                    help="fastnets backends to time (default: each one that runs here)")
    ap.add_argument("--image-size", type=int, metavar="PX", help="image side for the image models (default: each "
                    "model's own, 224 for most)")
    ap.add_argument("--shrink", type=int, default=1, metavar="K",
                    help="divide the op cases' spatial sizes and sequence lengths by K (smoke runs on a CPU)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="time each model configuration in N runs (each run interleaves the variants) and report "
                         "the min/median/max over the runs of the ratio to the fastest stock variant (default 1)")
    ap.add_argument("--no-plots", action="store_true", help="do not draw the plots")
    ap.add_argument("--list", action="store_true", help="list the op cases and models, and exit")
    args = ap.parse_args(argv)
    for name in ("op_batch", "train_batch", "budget", "image_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "train_batch" else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.batch and min(args.batch) < 1:
        ap.error("--batch sizes must be positive")
    if args.shrink < 1:
        ap.error("--shrink must be at least 1")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def environment(device: torch.device, argv: list[str]) -> dict:
    """What the results were measured on and with."""
    import fastnets

    meta = {
        "device": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m fastnets.bench " + " ".join(shlex.quote(a) for a in argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "fastnets": fastnets.__version__,
        "git": _git(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": None, "gpu_count": 0, "driver": None,
        "backends": {name: str(status) for name, status in fastnets.backends().items()},
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(), driver=_driver(),
                    compute_capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    gpu_memory_bytes=props.total_memory, l2_bytes=getattr(props, "L2_cache_size", None),
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    return meta


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=os.path.dirname(__file__))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git() -> str | None:
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit and _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (with uncommitted changes)"
    return commit


def _driver() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _slug(text: str) -> str:
    return "".join(ch.lower() if ch.isalnum() else "-" for ch in text).strip("-").replace("--", "-")[:40]


def fastnets_backends(device: torch.device, wanted: list[str] | None) -> dict[str, str | None]:
    """Each fastnets backend -> None when it is timed in this run, else why not."""
    import fastnets

    status = fastnets.backends()
    out: dict[str, str | None] = {}
    for b in ("triton", "cuda", "torch"):
        if wanted and b not in wanted:
            out[b] = "not asked for (--backends)"
        elif device.type != "cuda" and b != "torch":
            out[b] = ("no GPU: the Triton interpreter runs kernels for tests, its timings mean nothing"
                      if b == "triton" else "no GPU: the CUDA C++ kernels need one")
        elif not status[b].available:
            out[b] = status[b].reason
        else:
            out[b] = None
    return out


def list_cases(console) -> None:
    console.print("Op cases (default on a GPU: all; --quick: those marked q):", style="bold")
    for c in ops.CASES:
        console.print(f"  {c.name:<48} {'q' if c.quick else ' '} {c.mode:<8} {c.desc}", markup=False, highlight=False)
    console.print("Models (g: default on a GPU, c: on a CPU, q: --quick):", style="bold")
    for c in models.CASES:
        flags = ("g" if c.gpu else " ") + ("c" if c.cpu else " ") + ("q" if c.quick else " ")
        console.print(f"  {c.name:<24} {flags} {c.kind}, {c.size}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    console = report.make_console()
    if args.list:
        list_cases(console)
        return 0
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cudnn.benchmark = True  # stock convolutions get cuDNN's fastest algorithm
    meta = environment(device, argv)
    quick = args.quick
    budget = harness.Budget(args.budget if args.budget is not None else
                            ((120 if quick else 480) if gpu else (60 if quick else 300)))
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else None
    want_ops, want_models = args.ops is not None, args.models is not None
    default_run = not want_ops and not want_models
    if default_run:  # the default run of this machine
        want_ops, want_models = gpu, True
    skipped_groups = []
    if default_run and not gpu:
        skipped_groups.append(("op cases", "no GPU: fastnets' kernels do not run natively here (the Triton interpreter "
                               "is for tests), and a CPU roofline says nothing about them; --ops runs the stock ops "
                               "and the reference path anyway"))
    try:
        op_cases = ops.select(args.ops, quick) if want_ops else []
        model_cases = models.select(args.models, device, quick) if want_models else []
    except ValueError as exc:
        console.print(f"python -m fastnets.bench: error: {exc}", markup=False, highlight=False)
        return 2
    compile_on = args.compile == "all" or (args.compile == "auto" and gpu and not quick)
    backends = fastnets_backends(device, args.backends)
    op_st = ops.Settings(dtypes=dtypes, batch=args.op_batch or (64 if gpu else 8), backends=backends,
                         compile_on=compile_on, ceilings=None, quick=quick, shrink=args.shrink)
    train_default = None if (quick and not gpu) else (64 if gpu else 4)  # CPU --quick: inference only
    model_st = models.Settings(dtype=dtypes[0] if dtypes else None,
                               batches=args.batch or ([1, 32, 256] if gpu else [8]),
                               train_batch=(train_default if args.train_batch is None else args.train_batch) or None,
                               compile_mode=("none" if (quick and args.compile == "auto") else args.compile),
                               image_size=args.image_size, quick=quick, train_all=bool(args.models),
                               repeat=args.repeat)
    out = args.out or os.path.join("out", f"bench-{_slug(meta['gpu'] or 'cpu')}-"
                                   f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    total = sum(len(ops.specs(c, device, backends, compile_on)) * len(op_st.dtypes_of(c, device)) for c in op_cases)
    total += sum(len(models.VARIANTS) * (len(model_st.batches) + (1 if model_st.train_batch and (
        gpu or c.cpu_train or model_st.train_all) else 0)) for c in model_cases)
    progress = report.Progress(console, total)
    session = harness.Session(device, budget, progress)
    for what, why in skipped_groups:
        session.skip(what, why)
    results = {"schema": report.SCHEMA, "meta": meta, "config": {
        "quick": quick, "budget_s": budget.seconds, "dtypes": args.dtype, "op_batch": op_st.batch,
        "model_batches": model_st.batches, "train_batch": model_st.train_batch, "compile": args.compile,
        "shrink": args.shrink, "image_size": args.image_size, "repeat": args.repeat, "ops": [c.name for c in op_cases],
        "models": [c.name for c in model_cases], "backends": backends}}
    json_path = os.path.join(out, "results.json")

    def snapshot(final: bool = False) -> dict:
        harness.speedups(session.measurements)
        results.update(measurements=[m.to_json() for m in session.measurements], skipped=session.skipped,
                       elapsed_s=round(budget.elapsed(), 1), complete=final, cases=session.cases)
        results["targets"] = report.targets(results)
        clean = report.clean(results)
        report.write_json(clean, json_path)
        return clean

    session.checkpoint = snapshot  # the JSON is rewritten after each case: a killed run leaves its results
    failed = False
    try:
        if op_cases and gpu:
            try:
                op_st.ceilings = roofline.measure(device, dtypes or [torch.float16, torch.bfloat16], quick=quick)
                results["ceilings"] = op_st.ceilings.to_json()
                progress.note(f"ceilings: copy {op_st.ceilings.copy_gbps:,.0f} GB/s; matrix TFLOP/s "
                              + ", ".join(f"{k} {v:,.0f}" for k, v in op_st.ceilings.matrix_tflops.items()))
            except Exception as exc:  # noqa: BLE001
                session.skip("roofline fractions", f"measuring the ceilings failed: {session.guard(exc)}")
        elif op_cases:
            session.skip("roofline fractions", "no GPU: the ceilings of a shared CPU say nothing about GPU kernels")
        results.setdefault("ceilings", None)
        if op_cases:
            ops.run(session, op_cases, op_st, share=0.4 if model_cases else 1.0)
            snapshot()
        if model_cases:
            models.run(session, model_cases, model_st)
    except KeyboardInterrupt:
        session.skip("the rest of the run", "interrupted")
    except Exception as exc:  # noqa: BLE001 - a bug in the harness: keep what was measured, then fail
        traceback.print_exc()
        session.skip("the rest of the run", f"the harness failed: {exc!r}")
        failed = True
    finally:
        progress.stop()
    final = snapshot(final=True)
    report.print_tables(final, console)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report.markdown(final))
    written = [json_path, os.path.join(out, "table.md")]
    if not args.no_plots:
        written += report.plot(final, out)
    console.print(f"{len(session.measurements)} measurements in {budget.elapsed():.0f} s; wrote " + ", ".join(written),
                  markup=False, highlight=False)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
