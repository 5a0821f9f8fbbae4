"""The FASTEST and PROVEN entries for fastnets/_measured.py, from a committed GPU run.

    python -m fastnets.bench.measured benchmarks/results/<gpu>-<date>/results.json [--tests tests.xml]
    python -m fastnets.bench.measured ingest DIR     # the files a GPU run returned, in one command

`ingest` takes the folder the device tool returned from `bash scripts/gpu_run.sh` (summary.md,
results.json, tests.xml, the logs) and: copies it to benchmarks/results/<gpu>-<date>/ (the raw
run beside everything derived from it), writes table.md there and between the README's
bench-results markers, and merges the run's PROVEN and FASTEST entries into fastnets/_measured.py
(each naming that folder). It refuses a CPU run (a rehearsal) and an existing folder (--force
replaces it); --dry-run prints what it would write. Then review `git diff` and commit.

PROVEN[backend][op]: the op's family has tests for that backend in the run's native test log
(tests.xml, pytest's junit XML, written beside the JSON by scripts/gpu_run.sh) and every one of them
passed (none failed or errored, at least one ran).

FASTEST[op][gpu class]: the backend whose times over the op's cases in the run have the lowest
geometric mean relative to the others, over the (case, layout) pairs where every candidate was
measured; a backend whose result mismatched stock in any case is out, and so is a CUDA C++
backend that is not proven (auto would not pick it). "torch" (the reference path) wins where it
was fastest: that is a finding too.

A gpu_run.sh results.json also carries stage 2's native checks (results["gpu_run"]): a backend is
proven for a family's ops only when every one of its checks there passed (and at least one ran),
and its tests in tests.xml, where present, did not fail.

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
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ingest"]:
        return ingest_main(argv[1:])
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



# ----------------------------------------------------------------------------------------------
# One command from a GPU run's returned files to committed results.

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def checked(results: dict) -> dict[str, dict[str, str]]:
    """backend -> {op: why} from stage 2 of a gpu_run.sh results.json: every check of the family
    with that backend passed, at least one ran; ops named by the dispatch keys the checks used."""
    items = [i for s in results.get("gpu_run", {}).get("stages", []) if s.get("stage") == 2 for i in s.get("items", [])
             if i.get("family") and i.get("backend")]
    out: dict[str, dict[str, str]] = {"triton": {}, "cuda": {}}
    groups: dict[tuple[str, str], list[dict]] = {}
    for i in items:
        groups.setdefault((i["family"], i["backend"]), []).append(i)
    for (family, backend), its in groups.items():
        ran = [i for i in its if i["status"] in ("ok", "failed", "error", "stopped")]
        if ran and all(i["status"] == "ok" for i in ran) and backend in out:
            ops = sorted({op for i in ran for op in i.get("ops", [])})
            for op in ops:
                out[backend][op] = f"{len(ran)} native {backend} checks of {family} passed (gpu_run stage 2)"
    return out


def _failed_families(tests_xml: str | None) -> set[tuple[str, str]]:
    bad: set[tuple[str, str]] = set()
    if not tests_xml or not os.path.exists(tests_xml):
        return bad
    for case in ET.parse(tests_xml).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        if module.startswith("test_") and (case.find("failure") is not None or case.find("error") is not None):
            for backend in ("triton", "cuda"):
                if re.search(rf"(?<![a-z]){backend}(?![a-z])", case.get("name", "")):
                    bad.add((module[len("test_"):], backend))
    return bad


def tables(results: dict, tests_xml: str | None) -> tuple[dict, dict]:
    """(PROVEN, FASTEST-for-this-GPU-class) of one run: {backend: {op: why}}, {op: (backend, why)}."""
    fams = families_of(results)
    for s in results.get("gpu_run", {}).get("stages", []):
        for i in s.get("items", []) if s.get("stage") == 2 else []:
            if i.get("family") and i.get("ops"):
                fams.setdefault(i["family"], set()).update(i["ops"])
    pv = proven(tests_xml, fams)
    for backend, ops in checked(results).items():
        pv[backend].update(ops)
    for family, backend in _failed_families(tests_xml):
        for op in fams.get(family, ()):
            pv[backend].pop(op, None)
    return pv, fastest(results, pv)


def _render_measured(text: str, proven_t: dict, fastest_t: dict, notes: dict) -> str:
    """fastnets/_measured.py with its PROVEN and FASTEST assignments rewritten (one entry a line,
    the reason as a comment)."""
    def block(name: str, annotation: str, body: list[str]) -> str:
        return f"{name}: {annotation} = {{\n" + "".join(body) + "}\n"

    pl = []
    for backend in ("triton", "cuda"):
        pl.append(f'    "{backend}": {{\n')
        for op in sorted(proven_t.get(backend, {})):
            note = notes.get(("proven", backend, op))
            pl.append(f'        "{op}": "{proven_t[backend][op]}",' + (f"  # {note}" if note else "") + "\n")
        pl.append("    },\n")
    fl = []
    for op in sorted(fastest_t):
        fl.append(f'    "{op}": {{\n')
        for cls in sorted(fastest_t[op]):
            b, folder = fastest_t[op][cls]
            note = notes.get(("fastest", op, cls))
            fl.append(f'        "{cls}": ("{b}", "{folder}"),' + (f"  # {note}" if note else "") + "\n")
        fl.append("    },\n")
    text = re.sub(r"PROVEN: dict\[[^\n]*?\] = \{.*?\n\}\n|PROVEN: dict\[[^\n]*?\] = \{[^\n]*\}\n",
                  lambda m: block("PROVEN", "dict[str, dict[str, str]]", pl), text, count=1, flags=re.S)
    text = re.sub(r"FASTEST: dict\[[^\n]*?\] = \{.*?\n\}\n|FASTEST: dict\[[^\n]*?\] = \{\}\n",
                  lambda m: block("FASTEST", "dict[str, dict[str, tuple[str, str]]]", fl), text, count=1, flags=re.S)
    return text.replace("No GPU run has been committed yet, so every kernel is unproven and both tables are empty.",
                        "Entries are merged in by `python -m fastnets.bench.measured ingest` from the run they name.")


def ingest(src: str, *, repo: str = ROOT, name: str | None = None, force: bool = False, dry_run: bool = False,
           readme: str | None = None) -> str:
    """Copies a returned GPU run into benchmarks/results/<gpu>-<date>/ and updates the README table
    and fastnets/_measured.py; returns the folder (relative to repo)."""
    import shutil

    from fastnets.bench import report

    with open(os.path.join(src, "results.json")) as f:
        results = json.load(f)
    meta = results.get("meta", {})
    if meta.get("device") != "cuda" or not meta.get("gpu"):
        raise SystemExit(f"{src}: a CPU run (a rehearsal?): only a GPU run's results are committed as GPU evidence")
    folder = os.path.join("benchmarks", "results", name or f"{_slug(meta['gpu'])}-{meta['date'][:10]}")
    dest = os.path.join(repo, folder)
    if os.path.exists(dest) and not force:
        raise SystemExit(f"{folder} exists (--force replaces it, --name picks another)")
    files = sorted(f for f in os.listdir(src) if os.path.isfile(os.path.join(src, f)))
    table = report.markdown(results) if results.get("measurements") else \
        f"No measurements in the run of {meta['date'][:10]} ({folder}/summary.md).\n"
    table = table.rstrip("\n") + f"\n\nRaw run: `{folder}/` (summary.md, results.json, logs).\n"
    pv, fast = tables(results, os.path.join(src, "tests.xml"))
    cls = gpu_class(meta["gpu"])
    measured_path = os.path.join(repo, "fastnets", "_measured.py")
    ns: dict = {}
    with open(measured_path) as f:
        old_text = f.read()
    exec(compile(old_text, measured_path, "exec"), ns)  # noqa: S102 - the project's own table
    proven_t = {b: dict(v) for b, v in ns["PROVEN"].items()}
    fastest_t = {op: dict(v) for op, v in ns["FASTEST"].items()}
    notes = {}
    for backend, ops in pv.items():
        for op, why in ops.items():
            proven_t.setdefault(backend, {})[op] = folder
            notes[("proven", backend, op)] = why
    for op, (backend, why) in fast.items():
        fastest_t.setdefault(op, {})[cls] = (backend, folder)
        notes[("fastest", op, cls)] = why
    new_text = _render_measured(old_text, proven_t, fastest_t, notes)
    compile(new_text, measured_path, "exec")
    if dry_run:
        print(f"would copy {files} to {folder}/\n--- table.md\n{table}--- fastnets/_measured.py\n{new_text}")
        return folder
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(dest, f))
    with open(os.path.join(dest, "table.md"), "w") as f:
        f.write(table)
    report.write_readme(readme or os.path.join(repo, "README.md"), table)
    with open(measured_path, "w") as f:
        f.write(new_text)
    print(f"{folder}/: {len(files)} files + table.md; README table; fastnets/_measured.py: "
          f"{sum(len(v) for v in pv.values())} proven, {len(fast)} fastest for {cls}")
    return folder


def ingest_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastnets.bench.measured ingest",
                                 description="A GPU run's returned files -> benchmarks/results/<gpu>-<date>/, the "
                                             "README table and fastnets/_measured.py")
    ap.add_argument("src", help="the folder the device tool returned (results.json, summary.md, tests.xml, logs)")
    ap.add_argument("--name", help="the results folder's name (default: <gpu>-<date> from results.json)")
    ap.add_argument("--repo", default=ROOT, help="the checkout to write into (default: this one)")
    ap.add_argument("--force", action="store_true", help="replace an existing results folder")
    ap.add_argument("--dry-run", action="store_true", help="print what would be written")
    args = ap.parse_args(argv)
    ingest(args.src, repo=args.repo, name=args.name, force=args.force, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
