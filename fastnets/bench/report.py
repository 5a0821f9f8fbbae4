"""What a run shows: progress while it runs, the terminal table, the JSON, the plots, the issue's
targets, and the README's results table generated from a results JSON.

    python -m fastnets.bench.report RESULTS.json                 # the README table (markdown)
    python -m fastnets.bench.report RESULTS.json --write README.md
        # replaces the text between <!-- bench-results:begin --> and <!-- bench-results:end -->
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Iterable

from rich.console import Console
from rich.table import Table

SCHEMA = 1
# Within this fraction of the fastest stock variant a fastnets variant is "on par": closer than
# that is within the run-to-run spread of a median.
PAR = 0.02
BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"


def make_console() -> Console:
    """rich's console; when the output is not a terminal (a log), wide enough for the tables."""
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else 200)


# ----------------------------------------------------------------------------------------------
# Progress: a rich progress bar on a terminal, one plain line per measurement otherwise (a log).

class Progress:
    def __init__(self, console: Console, total: int):
        self.console, self.total, self.done = console, max(total, 1), 0
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=console, transient=True)
            self.task = self.bar.add_task("benchmark", total=self.total)
            self.bar.start()

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def step(self, m) -> None:
        self.done += 1
        if m.status == "ok":
            speed = f"{m.items_per_s:,.1f}/s" if m.items_per_s else (f"{m.gbps:,.1f} GB/s" if m.gbps else "")
            result = f"{m.median_ms:.4g} ms {speed}" + (f"  [{m.check}]" if m.check else "")
        else:
            result = f"{m.status}: {m.reason}"
        line = f"[{self.done:>4}/{self.total}] {m.case} | {m.label} | {result}"
        if self.bar is not None:
            self.bar.update(self.task, completed=min(self.done, self.total), description=m.case[:60])
        if m.status == "skipped":  # listed, grouped by reason, at the end of the run
            return
        if self.bar is not None:
            self.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# ----------------------------------------------------------------------------------------------
# Targets from the issue, evaluated on one run's measurements (ratios in the same run).

def _valid(m: dict) -> bool:
    """A successful measurement whose result (for a fastnets variant) matched stock."""
    return (m["status"] == "ok" and bool(m.get("median_ms"))
            and (m["side"] == "stock" or (m.get("check") or "").startswith("ok")))


def _by_case(measurements: list[dict]) -> dict[str, dict[str, dict]]:
    """case -> variant -> measurement, for the valid measurements only: a fastnets result that did
    not match stock counts toward no target and no table's "fastest"."""
    out: dict[str, dict[str, dict]] = {}
    for m in measurements:
        if _valid(m):
            out.setdefault(m["case"], {})[m["variant"]] = m
    return out


def _mismatched(measurements: list[dict], case: str) -> list[str]:
    return [m["label"] for m in measurements if m["case"] == case and m["status"] == "ok"
            and m["side"] == "fastnets" and not (m.get("check") or "").startswith("ok")]


def _best(variants: dict[str, dict], names: Iterable[str]) -> dict | None:
    found = [variants[n] for n in names if n in variants]
    return min(found, key=lambda m: m["median_ms"]) if found else None


def targets(results: dict) -> list[dict]:
    """Each target of the issue with the ratio this run measured (None: not measured here)."""
    cases = _by_case(results["measurements"])
    ceil = results.get("ceilings") or {}
    out = []

    def add(target, goal, ratios: list[tuple[str, float]], how):
        measured = min(r for _, r in ratios) if ratios else None
        detail = "; ".join(f"{c}: {r:.2f}" for c, r in ratios) if ratios else "not measured in this run"
        out.append({"target": target, "goal": goal, "measured": measured, "how": how, "detail": detail,
                    "met": None if measured is None else measured >= goal})

    def ratios(prefix, dtype, fast, base, *, metric=None):
        found = []
        for name, vs in sorted(cases.items()):
            if not (name.startswith(prefix) and name.endswith(" " + dtype)):
                continue
            f, b = _best(vs, fast), _best(vs, base)
            if f and metric:
                found.append((name, metric(f)))
            elif f and b:
                found.append((name, b["median_ms"] / f["median_ms"]))
        return found

    kernels = ("triton", "cuda")
    add("conv-bn-act inference, ResNet-50 shapes, fp16, channels_last: >= 1.5x stock eager (channels_last)", 1.5,
        ratios("conv_bn_act/resnet50.", "fp16", [k + "_cl" for k in kernels], ["eager_cl"]),
        "fastest fastnets kernel on channels_last input over stock eager channels_last; the worst layer counts")
    bw = ceil.get("copy_gbps")
    add("pooling: >= 90% of the measured copy bandwidth at large sizes", 0.9,
        ratios("max_pool2d/vgg16.pool1", "fp16", [k + s for k in kernels for s in ("", "_cl")], [],
               metric=lambda m: m["gbps"] / bw) if bw else [],
        "achieved GB/s of the fastest fastnets kernel over the copy bandwidth measured at the start of the run")
    add("LRN: >= 10x stock", 10.0,
        ratios("local_response_norm/alexnet.", "fp16", [k + s for k in kernels for s in ("", "_cl")], ["eager"]),
        "fastest fastnets kernel over stock eager NCHW (AlexNet's layout)")
    add("attention forward, bf16: >= torch's scaled_dot_product_attention", 1.0,
        ratios("sdpa/", "bf16", kernels, ["eager"]),
        "fastest fastnets kernel over torch's SDPA in the same run; the worst shape counts")
    r50 = [(n, vs) for n, vs in cases.items() if n.startswith("resnet50 inference b256 fp16")]
    fast_models = ("fastnets", "fastnets_graphs", "fastnets_compile")
    add("ResNet-50 inference, batch 256, fp16: >= 2x stock eager NCHW", 2.0,
        [(n, vs["eager"]["median_ms"] / _best(vs, fast_models)["median_ms"]) for n, vs in r50
         if "eager" in vs and _best(vs, fast_models)], "fastest fastnets variant over stock eager NCHW")
    add("ResNet-50 inference, batch 256, fp16: >= 1.1x torch.compile", 1.1,
        [(n, vs["compile"]["median_ms"] / _best(vs, fast_models)["median_ms"]) for n, vs in r50
         if "compile" in vs and _best(vs, fast_models)],
        "fastest fastnets variant over torch.compile of the stock model")
    tr = [(n, vs) for n, vs in cases.items() if n.startswith("resnet50 training") and "amp-" in n]
    add("ResNet-50 training step (AMP): >= 1.2x stock eager channels_last", 1.2,
        [(n, vs["eager_cl"]["median_ms"] / _best(vs, ("fastnets", "fastnets_compile"))["median_ms"]) for n, vs in tr
         if "eager_cl" in vs and _best(vs, ("fastnets", "fastnets_compile"))],
        "fastnets (eager or compiled) over stock eager channels_last")
    cpu = [(n, vs) for n, vs in cases.items() if n.startswith("resnet50 inference") and n.endswith("fp32")
           and results["meta"].get("device") == "cpu"]
    add("CPU: fused ResNet-50 inference (reference path) >= 1.5x the stock model (goal)", 1.5,
        [(n, vs["eager"]["median_ms"] / vs["fastnets"]["median_ms"]) for n, vs in cpu
         if "eager" in vs and "fastnets" in vs],
        "fastnets (folded batch-norms, channels_last) over stock eager NCHW, on the CPU")
    return out


# ----------------------------------------------------------------------------------------------
# The terminal table.

def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _count(x: float | None) -> str:
    """A rate for a table: thousands separated when large, three significant digits when small."""
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.3g}")


def _rows(results: dict, kind: str):
    order: dict[str, list[dict]] = {}
    for m in results["measurements"]:
        if m["kind"] == kind:
            order.setdefault(m["case"], []).append(m)
    return order


def _spread(m: dict | None) -> tuple[float, float, float] | None:
    """(min, median, max) over repeated runs (--repeat) of a measurement's ratio to the fastest
    stock variant of the same run; None with a single run."""
    runs = (m or {}).get("vs_best_stock_runs")
    if not runs or len(runs) < 2:
        return None
    ordered = sorted(runs)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return ordered[0], median, ordered[-1]


def _spread_text(m: dict | None) -> str:
    sp = _spread(m)
    return "-" if sp is None else f"{sp[0]:.2f} / {sp[1]:.2f} / {sp[2]:.2f}"


def _slower(m: dict) -> bool:
    """Slower than the fastest stock variant: its ratio below 1 by more than PAR, and, with
    repeated runs, below 1 in every run (beyond the spread that repeating shows)."""
    ratio, sp = m.get("vs_best_stock"), _spread(m)
    return ratio is not None and ratio < 1 - PAR and (sp is None or sp[2] < 1)


def _note(m: dict) -> str:
    if m["status"] == "error":
        return f"error: {m['reason']}"
    notes = []
    if m.get("check") and not m["check"].startswith("ok"):
        notes.append(m["check"])
    if m["side"] == "fastnets" and _slower(m):
        notes.append("slower than stock")
    return "; ".join(notes)


def print_tables(results: dict, console: Console) -> None:
    ops = _rows(results, "op")
    if ops:
        t = Table(title="Ops (speedups over stock eager NCHW, and over the fastest stock variant)", show_lines=False)
        for col in ("case", "variant", "median ms", "x eager", "x best stock", "GB/s", "TFLOP/s", "roofline",
                    "check / note"):
            t.add_column(col, justify="right" if col not in ("case", "variant", "check / note") else "left")
        for case, ms in ops.items():
            shown = [m for m in ms if m["status"] != "skipped"]
            for i, m in enumerate(shown):
                style = "red" if _note(m) else None
                t.add_row(case if i == 0 else "", m["label"], _fmt(m.get("median_ms"), ".4g"),
                          _fmt(m.get("speedup"), ".2f"), _fmt(m.get("vs_best_stock"), ".2f"),
                          _fmt(m.get("gbps"), ",.0f"), _fmt(m.get("tflops"), ",.1f"),
                          _fmt(m.get("roofline_fraction"), ".0%"), _note(m) or (m.get("check") or ""), style=style,
                          end_section=i == len(shown) - 1)
        console.print(t)
    mods = _rows(results, "model")
    if mods:
        t = Table(title="Models (items = images or sequences; peak memory of one call)")
        for col in ("case", "variant", "median ms", "items/s", "x eager", "x best stock", "runs min/med/max", "peak MiB",
                    "check / note"):
            t.add_column(col, justify="right" if col not in ("case", "variant", "check / note") else "left")
        for case, ms in mods.items():
            shown = [m for m in ms if m["status"] != "skipped"]
            for i, m in enumerate(shown):
                peak = m.get("peak_mem_bytes")
                t.add_row(case if i == 0 else "", m["label"], _fmt(m.get("median_ms"), ".4g"),
                          _fmt(m.get("items_per_s"), ",.1f"),
                          _fmt(m.get("speedup"), ".2f"), _fmt(m.get("vs_best_stock"), ".2f"), _spread_text(m),
                          _fmt(peak / 2 ** 20 if peak else None, ",.0f"), _note(m) or (m.get("check") or ""),
                          style="red" if _note(m) else None, end_section=i == len(shown) - 1)
        console.print(t)
    tg = [x for x in results.get("targets", []) if x["measured"] is not None]
    if tg:
        t = Table(title="The issue's targets (ratios measured in this run)")
        for col in ("target", "goal", "measured", "met"):
            t.add_column(col)
        for x in tg:
            t.add_row(x["target"], f"{x['goal']:g}", f"{x['measured']:.2f}", "yes" if x["met"] else "NO",
                      style=None if x["met"] else "red")
        console.print(t)
    print_skips(results, console)


def skip_summary(results: dict) -> list[tuple[str, list[str]]]:
    """(reason, what was skipped for it), one entry per distinct reason."""
    groups: dict[str, list[str]] = {}
    for s in results.get("skipped", []):
        groups.setdefault(s["reason"], []).append(s["what"])
    for m in results["measurements"]:
        if m["status"] == "skipped":
            groups.setdefault(m["reason"], []).append(f"{m['case']}: {m['label']}")
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def print_skips(results: dict, console: Console) -> None:
    summary = skip_summary(results)
    if not summary:
        return
    console.print("Skipped, and why:", style="bold")
    for reason, what in summary:
        sample = ", ".join(what[:3]) + (f", ... ({len(what)} in all)" if len(what) > 3 else "")
        console.print(f"  - {reason}: {sample}", markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------
# JSON and plots.

def write_json(results: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, allow_nan=False, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def clean(obj):
    """Non-finite floats as None (the JSON must be standard)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def plot(results: dict, outdir: str) -> list[str]:
    """speedup_ops.png and speedup_models.png: each variant's speedup over stock eager, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for kind, fname in (("op", "speedup_ops.png"), ("model", "speedup_models.png")):
        rows = _rows(results, kind)
        data = {c: [m for m in ms if m["status"] == "ok" and m.get("speedup") and m["variant"] != "eager"]
                for c, ms in rows.items()}
        data = {c: ms for c, ms in data.items() if ms}
        if not data:
            continue
        variants = sorted({m["label"] for ms in data.values() for m in ms})
        height = max(3.0, 0.22 * sum(len(ms) for ms in data.values()) + 1.5)
        fig, ax = plt.subplots(figsize=(12, height))
        y, ticks, labels = 0.0, [], []
        colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
        for case, ms in data.items():
            start = y
            for m in sorted(ms, key=lambda m: m["label"]):
                # from 1 (stock eager) to the speedup: rightwards when faster, leftwards when slower
                ax.barh(y, m["speedup"] - 1, left=1, color=colors[m["label"]], height=0.8)
                y += 1
            ticks.append((start + y - 1) / 2)
            labels.append(case)
            y += 0.8
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        speeds = [m["speedup"] for ms in data.values() for m in ms]
        lo, hi = min(0.8, min(speeds)) / 1.15, max(1.25, max(speeds)) * 1.15
        ax.set_xlim(lo, hi)
        ax.set_xticks([t for t in (0.1, 0.25, 0.5, 0.8, 1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100) if lo <= t <= hi])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup over stock eager NCHW (log scale; < 1 is slower)")
        meta = results["meta"]
        ax.set_title(f"fastnets {kind}s on {meta.get('gpu') or meta.get('cpu') or meta['device']}", fontsize=9)
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[v]) for v in variants], labels=variants,
                  fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# The README's table, from a results JSON.

def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"Measured on {meta.get('gpu') or meta.get('cpu')} ({meta['device']}), {meta['date'][:10]}: torch "
             f"{meta['torch']}, Triton {meta.get('triton') or '-'}, CUDA {meta.get('cuda') or '-'}; "
             f"`{meta['command']}`."]
    ceil = results.get("ceilings")
    if ceil:
        rates = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(ceil["matrix_tflops"].items()))
        lines.append(f"Measured ceilings: copy {ceil['copy_gbps']:,.0f} GB/s; matrix TFLOP/s: {rates}.")
    ops = _by_case(results["measurements"])
    op_cases = [c for c in _rows(results, "op") if c in ops]
    if op_cases:
        lines += ["", "| op case (ms) | stock eager | stock CL | torch.compile | fastest fastnets | x fastest stock "
                      "| roofline | finding |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
        for c in op_cases:
            vs = ops[c]
            kernels = [v for v, m in vs.items() if m["side"] == "fastnets" and v not in ("torch", "torch_cl")]
            fast = _best(vs, kernels)
            ms = lambda v: _fmt(vs[v]["median_ms"], ".3g") if v in vs else "-"  # noqa: E731
            ratio = fast.get("vs_best_stock") if fast else None
            finding = _finding(ratio, _mismatched(results["measurements"], c))
            lines.append(f"| {c} | {ms('eager')} | {ms('eager_cl')} | {ms('compile')} | "
                         + (f"{fast['median_ms']:.3g} ({fast['label'].replace('fastnets ', '')})" if fast else "-")
                         + f" | {_fmt(ratio, '.2f')} | {_fmt(fast.get('roofline_fraction') if fast else None, '.0%')}"
                         + f" | {finding} |")
    model_cases = [c for c in _rows(results, "model") if c in ops]
    if model_cases:
        repeats = (results.get("config") or {}).get("repeat") or 1
        spread = repeats > 1 or any(_spread(m) for vs in ops.values() for m in vs.values())
        lines += ["", "| model (items/s) | stock eager | stock CL | torch.compile | fastnets | + CUDA graphs "
                      "| + compile "
                      "| x fastest stock |" + (f" runs: min / median / max ({repeats} runs) |" if spread else "")
                  + " finding |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if spread else "") + " --- |"]
        for c in model_cases:
            vs = ops[c]
            ips = lambda v: _count(vs[v]["items_per_s"]) if v in vs else "-"  # noqa: E731
            fast = _best(vs, ("fastnets", "fastnets_graphs", "fastnets_compile"))
            ratio = fast.get("vs_best_stock") if fast else None
            finding = _finding(ratio, _mismatched(results["measurements"], c), _spread(fast))
            lines.append(f"| {c} | {ips('eager')} | {ips('eager_cl')} | {ips('compile')} | {ips('fastnets')} | "
                         f"{ips('fastnets_graphs')} | {ips('fastnets_compile')} | {_fmt(ratio, '.2f')} |"
                         + (f" {_spread_text(fast)} |" if spread else "") + f" {finding} |")
    tg = [t for t in results.get("targets", []) if t["measured"] is not None]
    if tg:
        lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
        lines += [f"| {t['target']} | {t['measured']:.2f} | {'yes' if t['met'] else '**no**'} |" for t in tg]
    return "\n".join(lines) + "\n"


def _finding(ratio: float | None, mismatched: list[str], spread: tuple[float, float, float] | None = None) -> str:
    """faster / on par / slower than stock (by more than PAR; with repeated runs, slower only when
    every run was below 1: within the spread it is on par)."""
    parts = []
    if ratio is not None:
        if ratio > 1 + PAR:
            parts.append("faster")
        elif ratio < 1 - PAR and (spread is None or spread[2] < 1):
            parts.append("**slower than stock**")
        else:
            parts.append("on par" if spread is None or ratio >= 1 - PAR else "on par (within the runs' spread)")
    parts += [f"**wrong result: {label}**" for label in mismatched]
    return "; ".join(parts)


def write_readme(readme: str, table: str) -> None:
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers to put the table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + BEGIN + "\n" + table + END + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastnets.bench.report",
                                 description="The README's results table from a results JSON of "
                                             "python -m fastnets.bench.")
    ap.add_argument("results", help="results.json of a run")
    ap.add_argument("--write", metavar="README", help=f"replace the text between {BEGIN} and {END} in this file")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    if results.get("schema") != SCHEMA:
        raise SystemExit(f"{args.results}: not a fastnets.bench results file of schema {SCHEMA}")
    table = markdown(results)
    if args.write:
        write_readme(args.write, table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
