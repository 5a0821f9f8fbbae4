"""summary.md of a GPU run (scripts/gpu_run.py) from its results.json: the stages with their
deadlines and times, the failures first, the headline ratios, what was dropped and why."""
from __future__ import annotations


def _ms(ms: list[dict], case: str, variant: str) -> dict | None:
    return next((m for m in ms if m["case"] == case and m["variant"] == variant and m["status"] == "ok"
                 and m.get("median_ms")), None)


def _best_fast(ms: list[dict], case: str, suffix: str, reference: bool = False) -> dict | None:
    """The fastest checked fastnets kernel variant; the reference path only when `reference` (a
    rehearsal on the CPU, where it is the only fastnets variant)."""
    got = [m for m in ms if m["case"] == case and m["side"] == "fastnets" and m["status"] == "ok" and m.get("median_ms")
           and m["variant"].endswith(suffix) and (m.get("check") or "").startswith("ok")
           and (reference or not m["variant"].startswith("torch"))]
    return min(got, key=lambda m: m["median_ms"]) if got else None


def headline(results: dict) -> list[str]:
    ms = results.get("measurements") or []
    if not ms:
        return []
    lines = []
    ref = results.get("meta", {}).get("device") != "cuda"
    cases = sorted({m["case"] for m in ms})
    conv = [c for c in cases if c.startswith("conv_bn_act/")]
    if conv:
        lines += ["", "| conv-bn-act (channels_last) | fastnets ms | x stock conv->bn->relu | x stock conv alone |",
                  "| --- | ---: | ---: | ---: |"]
        for c in conv:
            f, s = _best_fast(ms, c, "_cl", ref), _ms(ms, c, "eager_cl")
            a = _ms(ms, c.replace("conv_bn_act/", "conv_only/"), "eager_cl")
            lines.append(f"| {c} | {f['median_ms']:.3g} ({f['variant']}) | "
                         f"{s['median_ms'] / f['median_ms']:.2f} | {a['median_ms'] / f['median_ms']:.2f} |"
                         if f and s and a else f"| {c} | - | - | - |")
    att = [c for c in cases if c.startswith("sdpa")]
    if att:
        lines += ["", "| attention | fastnets TFLOP/s | SDPA TFLOP/s | x SDPA |", "| --- | ---: | ---: | ---: |"]
        for c in att:
            f, s = _best_fast(ms, c, "", ref), _ms(ms, c, "eager")
            lines.append(f"| {c} | {f.get('tflops') or 0:.0f} ({f['variant']}) | {s.get('tflops') or 0:.0f} | "
                         f"{s['median_ms'] / f['median_ms']:.2f} |" if f and s else f"| {c} | - | - | - |")
    copy = (results.get("ceilings") or {}).get("copy_gbps") or results.get("cpu_copy_gbps")
    mem = [c for c in cases if c.split("/")[0].split(".")[0] in ("max_pool2d", "adaptive_avg_pool2d", "batch_norm_act",
                                                                  "local_response_norm")]
    if mem and copy:
        lines += ["", f"| memory-bound op | fastnets GB/s | of copy ({copy:,.0f} GB/s) | x stock |",
                  "| --- | ---: | ---: | ---: |"]
        for c in mem:
            f, s = _best_fast(ms, c, "_cl", ref), _ms(ms, c, "eager_cl")
            lines.append(f"| {c} | {f['gbps']:,.0f} | {f['gbps'] / copy:.0%} | {s['median_ms'] / f['median_ms']:.2f} |"
                         if f and s and f.get("gbps") else f"| {c} | - | - | - |")
    model = [c for c in cases if c.startswith("resnet50")]
    if model:
        lines += ["", "| model (items/s) | eager | eager CL | fuse() | fuse() + CUDA graphs |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for c in model:
            v = {n: _ms(ms, c, n) for n in ("eager", "eager_cl", "fastnets", "fastnets_graphs")}
            lines.append(f"| {c} | " + " | ".join(f"{m['items_per_s']:,.0f}" if m and m.get("items_per_s") else "-"
                                                  for m in v.values()) + " |")
    if ref:
        lines += ["", "(a rehearsal: the fastnets column is the torch reference path on the CPU, not a kernel)"]
    return lines


def render(results: dict) -> str:
    run = results.get("gpu_run", {})
    meta = results.get("meta", {})
    lines = [f"# GPU run{' (rehearsal on the CPU)' if run.get('rehearse') else ''}: "
             f"{meta.get('gpu') or meta.get('device')}, {meta.get('date', '')[:10]}",
             f"torch {meta.get('torch')}, CUDA {meta.get('cuda')}, Triton {meta.get('triton')}; budget "
             f"{run.get('budget_s')} s, {run.get('elapsed_s')} s elapsed"
             + (f"; **killed ({run['killed']})**" if run.get("killed") else ""), "",
             "| stage | deadline | allotted | elapsed | status | ok / failed / skipped / dropped |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for s in run.get("stages", []):
        items = s.get("items", [])
        n = {k: sum(1 for i in items if i["status"] in ks) for k, ks in
             (("ok", ("ok",)), ("bad", ("failed", "error")), ("skip", ("skipped",)), ("drop", ("dropped", "stopped")))}
        fmt = lambda x: "-" if x is None else f"{x:.0f} s"  # noqa: E731
        lines.append(f"| {s['stage']} {s['name']} | +{s['deadline_s']:.0f} s | {fmt(s.get('allotted_s'))} | "
                     f"{fmt(s.get('elapsed_s'))} | {s['status']} | {n['ok']} / {n['bad']} / {n['skip']} / {n['drop']} |")
    for p in run.get("problems") or []:
        lines.append(f"\n**problem:** {p}")
    bad = [(s, i) for s in run.get("stages", []) for i in s.get("items", []) if i["status"] in ("failed", "error")]
    if bad:
        lines += ["", "## Failures", ""] + [f"- stage {s['stage']}: {i['name']}: {i['detail']}" for s, i in bad[:60]]
        if len(bad) > 60:
            lines.append(f"- ... and {len(bad) - 60} more (results.json)")
    lines += ["", "## Headline numbers (same run)"] + (headline(results) or ["", "none measured"])
    lines += ["", "## Stages"]
    for s in run.get("stages", []):
        lines += ["", f"### {s['stage']} {s['name']}: {s['status']}" + (f" ({s['note']})" if s.get("note") else "")]
        shown = {}
        for i in s.get("items", []):
            key = (i["status"], i["detail"] if i["status"] in ("skipped", "dropped") else i["name"])
            shown.setdefault(key, []).append(i)
        for (status, _), group in shown.items():
            i = group[0]
            more = f" (and {len(group) - 1} more like it)" if len(group) > 1 else ""
            lines.append(f"- {status} {i['seconds']:.1f}s: {i['name']}{more}: {i['detail']}")
    return "\n".join(lines) + "\n"
