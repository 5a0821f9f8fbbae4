"""Compiles the autotune candidates of one Triton kernel on chosen launches and audits each (no GPU).

The per-candidate view that the spill tables of the autotuners need (kernels/conv.py _SPILLS,
kernels/attention.py FWD_SPILLS, kernels/attention_bwd.py DQ_SPILLS / DKDV_SPILLS, kernels/pool.py
FWD_SPILLS / BWD_SPILLS): the launches are recorded and specialized exactly as scripts/aot_compile_all.py
does (Triton's own JIT on the real launch values), compiled for one architecture under the installed
Triton, and each cubin is read by scripts/sass_tools.py and judged by scripts/sass_audit.py's check().
One line per compile: config, the kernel's main constexprs, whether the launch is a fast path, the loop
async share, the 128-bit share, load/store widths, registers, stack, LDL/STL, the verdict, the case.

Usage:
    python scripts/audit_candidates.py --arch 80 --only "attention torch.float16" --kernel _attn_bwd_dq
    python scripts/audit_candidates.py --arch 90 --only "conv torch.float16,model" --kernel _conv_gemm \\
        --models resnet50,vit_b_16 --mode full --filter "k['FLAT_K']" --dedupe "(k['KH'], k['VEC'])" --no-prune
--mode first: the first (pruned) candidate of every launch; all (default): every candidate of the first
fp16 launch, the first elsewhere; full: every candidate of every launch. --filter / --dedupe: Python
expressions over the launch's keyword arguments `k` (constexprs) and positional arguments `a`.
--no-prune: the autotuners' spill tables emptied first (every candidate, to measure them).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

KEYS = "BLOCK_M,BLOCK_N,BLOCK_K,TILE,BLOCK_D,FLAT_K,VEC,KH,HAS_RES,ACT,BLOCK".split(",")


def _no_prune():
    import fastnets.kernels.attention as KA
    import fastnets.kernels.attention_bwd as KB
    import fastnets.kernels.conv as KC
    import fastnets.kernels.pool as KP

    KC.spilling = lambda *a, **k: set()
    for d in (KA.FWD_SPILLS, KB.DQ_SPILLS, KB.DKDV_SPILLS, KP.FWD_SPILLS, KP.BWD_SPILLS):
        d.clear()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, required=True)
    p.add_argument("--only", required=True, help="the cases of scripts/aot_compile_all.py whose name contains this")
    p.add_argument("--kernel", required=True, help="the Triton function name")
    p.add_argument("--mode", choices=("first", "all", "full"), default="all")
    p.add_argument("--models", help="also these model layers (batch 32, fp16 channels_last)")
    p.add_argument("--filter")
    p.add_argument("--dedupe")
    p.add_argument("--no-prune", action="store_true")
    a = p.parse_args()

    import aot_compile_all as A
    import sass_audit as SA
    import sass_tools as S

    launches, errors = A.capture(a.arch, True, a.only, A.ROOT, models=a.models, batches=(32,),
                                 model_dtypes=("float16",))
    for e in errors:
        print("CAPTURE-ERROR", e)
    launches = [l for l in launches if A._unwrap(l[0]).__name__ == a.kernel]
    if a.no_prune:
        _no_prune()
    if a.filter:
        launches = [l for l in launches if eval(a.filter, {}, {"k": l[3], "a": l[2]})]  # noqa: S307 - a CLI expression
    if a.dedupe:
        seen, kept = set(), []
        for l in launches:
            key = eval(a.dedupe, {}, {"k": l[3], "a": l[2]})  # noqa: S307
            if key not in seen:
                seen.add(key)
                kept.append(l)
        launches = kept
    print(len(launches), "launches", flush=True)
    import triton

    jobs = A._jobs(launches, a.mode == "full", ("float16",) if a.mode == "all" else ())
    for j in jobs:
        src, target, options = A.COMPILED[j["src"]]
        try:
            ck = A._REAL_COMPILE[0](src, target=target, options=dict(options))
        except Exception as exc:  # noqa: BLE001 - the compiler's message is the result
            print("FAIL", j["case"], str(exc)[-500:])
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            audit = S.audit_cubin(f.name, a.arch, threads=32 * j["options"]["num_warps"],
                                  dyn_shared=int(getattr(ck.metadata, "shared", 0)))
        rep = audit.get(ck.metadata.name) or next(iter(audit.values()))
        row = dict(rep, backend="triton", arch=a.arch, kernel=a.kernel, dtype=j["dtype"], case=j["case"], lead=j["lead"])
        ok, fails, _ = SA.check(row)
        cx = {k: j["constexprs"][k] for k in KEYS if k in j["constexprs"]}
        print(f"{triton.__version__} sm{a.arch} cfg{j['config_index']}/{j['n_configs']} w{j['options']['num_warps']} "
              f"s{j['options']['num_stages']} {cx} fast={SA._fast(row)} async={rep.get('loop_async128_share')} "
              f"f128={rep.get('frac128')} LDGSTS={rep.get('LDGSTS_w')} LDG={rep.get('LDG')} loopLDG={rep.get('loop_LDG')} "
              f"STG={rep.get('STG')} REG={rep.get('REG')} STACK={rep.get('STACK')} LDL/STL={rep.get('LDL')}/{rep.get('STL')} "
              f"{'OK' if ok else 'MISS ' + '; '.join(fails)} | {j['case'][:50]}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
