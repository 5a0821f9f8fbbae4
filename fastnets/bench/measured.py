"""The FASTEST and PROVEN entries for fastnets/_measured.py, from a committed GPU run.

    python -m fastnets.bench.measured benchmarks/results/<gpu>-<date>/results.json [--tests tests.xml]

PROVEN[backend][op]: the op's family has tests for that backend in the run's native test log
(tests.xml, pytest's junit XML, written beside the JSON by scripts/gpu_run.sh) and every one of them
passed (none failed or errored, at least one ran).

FASTEST[op][gpu class]: the backend whose times over the op's cases in the run have the lowest
geometric mean relative to the others, over the (case, layout) pairs where every candidate was
measured; a backend whose result mismatched stock in any case is out, and so is a CUDA C++
backend that is not proven (auto would not pick it). "torch" (the reference path) wins where it
was fastest: that is a finding too.

The op keys are the ones the ops pass to fastnets._dispatch.choose (recorded by the run per case).
The tool prints Python for a person to check and enter by hand, with the run's folder; it writes
nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import xml.etree.ElementTree as ET

from fastnets import _measured

BACKENDS = ("triton", "cuda", "torch")


def gpu_class(name: str) -> str:
    for known in _measured.GPU_CLASSES:
        if known.lower() in name.lower():
            return known
    return name


def proven(tests_xml: str | None, families: dict[str, set[str]]) -> dict[str, dict[str, str]]:
    """backend -> {op: "passed N tests"} for the families whose tests of that backend all passed."""
    out: dict[str, dict[str, str]] = {"triton": {}, "cuda": {}}
    if not tests_xml or not os.path.exists(tests_xml):
        return out
    root = ET.parse(tests_xml).getroot()
    counts: dict[tuple[str, str], list[int]] = {}  # (family, backend) -> [passed, failed]
    for case in root.iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        if not module.startswith("test_"):
            continue
        family = module[len("test_"):]
        name = case.get("name", "")
        for backend in ("triton", "cuda"):
            if not re.search(rf"(?<![a-z]){backend}(?![a-z])", name):
                continue
            tally = counts.setdefault((family, backend), [0, 0])
            if case.find("failure") is not None or case.find("error") is not None:
                tally[1] += 1
            elif case.find("skipped") is None:
                tally[0] += 1
    for (family, backend), (passed, failed) in counts.items():
        if passed and not failed:
            for op in families.get(family, ()):
                out[backend][op] = f"{passed} {backend} tests of tests/test_{family}.py passed"
    return out


def fastest(results: dict, proven_ops: dict[str, dict[str, str]]) -> dict[str, tuple[str, str]]:
    """op -> (backend, explanation)."""
    cases = results.get("cases", {})
    per_op: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
    bad: dict[str, set[str]] = {}
    for m in results["measurements"]:
        info = cases.get(m["case"])
        if m["kind"] != "op" or m["side"] != "fastnets" or info is None:
            continue
        backend = m["variant"].removesuffix("_cl")
        layout = "cl" if m["variant"].endswith("_cl") else "nchw"
        for op in info.get("dispatch_ops") or [info["op"]]:
            if m["status"] == "skipped":
                continue
            if m["status"] == "error" or not (m.get("check") or "").startswith("ok"):
                bad.setdefault(op, set()).add(backend)  # wrong or failing somewhere: not a candidate
                continue
            per_op.setdefault(op, {}).setdefault((m["case"], layout), {})[backend] = m["median_ms"]
    out = {}
    for op, pairs in sorted(per_op.items()):
        seen = {b for times in pairs.values() for b in times}
        candidates = [b for b in BACKENDS if b in seen and b not in bad.get(op, set())
                      and (b != "cuda" or op in proven_ops.get("cuda", {}))]
        both = [times for times in pairs.values() if all(b in times for b in candidates)]
        if not candidates or not both:
            continue
        means = {b: math.exp(sum(math.log(t[b]) for t in both) / len(both)) for b in candidates}
        winner = min(means, key=means.get)
        detail = ", ".join(f"{b} {means[b]:.3g} ms" for b in sorted(means, key=means.get))
        out[op] = (winner, f"geometric mean over {len(both)} case/layout pairs: {detail}")
    return out


def families_of(results: dict) -> dict[str, set[str]]:
    fam: dict[str, set[str]] = {}
    for info in results.get("cases", {}).values():
        fam.setdefault(info["family"], set()).update(info.get("dispatch_ops") or [info["op"]])
    return fam


def render(results: dict, folder: str, tests_xml: str | None) -> str:
    meta = results["meta"]
    if meta.get("device") != "cuda":
        raise SystemExit("this results file is from a CPU run: only a GPU run's measurements go into _measured.py")
    cls = gpu_class(meta["gpu"])
    pv = proven(tests_xml, families_of(results))
    fast = fastest(results, pv)
    lines = [f"# From {folder}: {meta['gpu']}, torch {meta['torch']}, Triton {meta.get('triton')}, "
             f"CUDA {meta.get('cuda')}, {meta['date'][:10]}.",
             f"# Tests: {tests_xml if tests_xml and os.path.exists(tests_xml) else 'no tests.xml: nothing is proven'}",
             "PROVEN = {"]
    for backend in ("triton", "cuda"):
        lines.append(f'    "{backend}": {{')
        lines += [f'        "{op}": "{folder}",  # {why}' for op, why in sorted(pv[backend].items())]
        lines.append("    },")
    lines += ["}", "", "FASTEST = {"]
    lines += [f'    "{op}": {{"{cls}": ("{b}", "{folder}")}},  # {why}' for op, (b, why) in fast.items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastnets.bench.measured", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json of a committed GPU run (benchmarks/results/<gpu>-<date>/)")
    ap.add_argument("--tests", help="the run's junit XML (default: tests.xml beside the JSON)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    folder = os.path.relpath(os.path.dirname(os.path.abspath(args.results)))
    tests = args.tests or os.path.join(os.path.dirname(args.results), "tests.xml")
    print(render(results, folder, tests), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
