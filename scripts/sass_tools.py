"""Reading NVIDIA machine code (SASS) without a GPU: what the audit counts, independent of fastnets.

Inputs are cubins (ELF files for one sm_XX); the tool is `cuobjdump` (Triton's NVIDIA backend ships
one in triton/backends/nvidia/bin/, the CUDA toolkit another). Per function:

- instruction classes: tensor cores (HGMMA = wgmma on sm_90; HMMA = mma.sync on sm_80 and sm_90),
  async global->shared copies (LDGSTS = cp.async; UTMALDG / UBLKCP = TMA and bulk copies), global
  loads and stores by width (LDG/STG: .U8/.S8 = 8 bits, .U16/.S16 = 16, none = 32, .64, .128),
  global reductions and atomics (RED, ATOMG), shared-memory matrix loads (LDSM = ldmatrix), local
  memory traffic (LDL/STL: spills or stack arrays);
- loops: a backward branch (BRA to a lower address) closes a loop over [target, branch]; an
  instruction's loop depth is the number of such ranges that hold it;
- GEMM operands: of the loop-weighted global bytes loaded inside loops (LDG, LDGSTS, TMA), the share
  moved by 128-bit async copies (LDGSTS.128) or TMA (loop_async128_share);
- the static proxy for "the fraction of global bytes moved by 128-bit instructions": every global
  data instruction (LDG, STG, LDGSTS, RED/ATOMG; TMA counted as 128-bit) is weighted by its width
  in bytes times LOOP_WEIGHT ** (loop depth), since an instruction in a loop runs once per
  iteration; the fraction is the 128-bit share of that weighted sum. It ignores predication (a
  masked tail moves less) and trip counts (unknown statically): a proxy, not a measurement;
- resources from `cuobjdump -res-usage`: registers, stack, local (spill) bytes, static shared
  memory, and the theoretical occupancy (CTAs and warps per SM) from registers, shared memory and
  threads per CTA, with the per-SM limits of each architecture below.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

LOOP_WEIGHT = 8

# Per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table): 64K 32-bit registers,
# shared memory per SM usable by CTAs, max resident threads and CTAs, register allocation unit (256
# registers per warp), shared allocation unit, and the 1 KB the runtime reserves per CTA (sm_80+).
ARCH_LIMITS = {
    80: dict(regs=65536, smem=167936, threads=2048, ctas=32, warps=64, reg_unit=256, smem_unit=128, smem_reserved=1024,
             max_regs_per_thread=255),
    90: dict(regs=65536, smem=233472, threads=2048, ctas=32, warps=64, reg_unit=256, smem_unit=128, smem_reserved=1024,
             max_regs_per_thread=255),
}


def cuobjdump() -> str:
    """The cuobjdump to use: $CUOBJDUMP, Triton's bundled one, the CUDA toolkit's, or PATH's."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    try:
        import triton.backends.nvidia as nv

        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        if os.path.exists(tool):
            return tool
    except ImportError:
        pass
    for cand in ("/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    raise FileNotFoundError("cuobjdump not found (set CUOBJDUMP, install Triton's NVIDIA backend or CUDA)")


def _run(args) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {p.stderr[-2000:]}")
    return p.stdout


def dump(cubin: bytes | str) -> tuple[str, str]:
    """(SASS text, -res-usage text) of a cubin given as bytes or as a path."""
    tool = cuobjdump()
    if isinstance(cubin, (bytes, bytearray)):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            return _run([tool, "-sass", f.name]), _run([tool, "-res-usage", f.name])
    return _run([tool, "-sass", cubin]), _run([tool, "-res-usage", cubin])


_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    op: str          # opcode with modifiers, e.g. LDG.E.128.CONSTANT
    operands: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """{function name: [instructions]} from `cuobjdump -sass` output."""
    funcs: dict[str, list[Instr]] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            body = m.group(2).strip()
            pred = ""
            if body.startswith("@"):
                pred, _, body = body.partition(" ")
            op, _, operands = body.partition(" ")
            cur.append(Instr(int(m.group(1), 16), pred, op, operands.strip()))
    return funcs


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """{function: {REG, STACK, SHARED, LOCAL}} from `cuobjdump -res-usage`."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if m:
            cur = out.setdefault(m.group(1).rstrip(":"), {})
            continue
        if cur is not None and "REG:" in line:
            for item in line.split():
                k, _, v = item.partition(":")
                if k in ("REG", "STACK", "SHARED", "LOCAL") and v.isdigit():
                    cur[k] = int(v)
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """[(start, end)] address ranges closed by a backward branch."""
    out = []
    for ins in instrs:
        if ins.base in ("BRA", "JMP") and ins.pred != "":
            pass
        if ins.base == "BRA":
            m = re.search(r"0x([0-9a-f]+)", ins.operands)
            if m and int(m.group(1), 16) <= ins.addr:
                out.append((int(m.group(1), 16), ins.addr))
    return out


def _width_bits(op: str, default: int = 32) -> int:
    mods = op.split(".")[1:]
    for m in mods:
        if m in ("128", "64", "32"):
            return int(m)
        if m in ("U8", "S8"):
            return 8
        if m in ("U16", "S16"):
            return 16
    return default


def classify(instrs: list[Instr]) -> dict:
    """Counts of the audited instruction classes, in the whole function and inside loops, and the
    loop-weighted global bytes by width (see the module docstring)."""
    rngs = loops(instrs)
    c = dict(instructions=len(instrs), loops=len(rngs), HGMMA=0, HMMA=0, IMMA=0, LDSM=0, LDGSTS=0, TMA=0,
             LDL=0, STL=0, LDG={}, STG={}, LDGSTS_w={}, RED=0, loop_LDG={}, loop_LDGSTS=0, loop_TMA=0,
             loop_HGMMA=0, loop_HMMA=0, bytes_by_width={}, ldg_in_loop_scalar=0)
    for ins in instrs:
        depth = sum(1 for a, b in rngs if a <= ins.addr <= b)
        w = LOOP_WEIGHT ** depth
        base = ins.base
        width = None
        if base in ("HGMMA", "HMMA", "IMMA", "LDSM"):
            c[base] += 1
            if depth and base in ("HGMMA", "HMMA"):
                c["loop_" + base] += 1
        elif base == "LDGSTS":
            width = _width_bits(ins.op)
            c["LDGSTS"] += 1
            c["LDGSTS_w"][width] = c["LDGSTS_w"].get(width, 0) + 1
            if depth:
                c["loop_LDGSTS"] += 1
        elif base in ("UTMALDG", "UBLKCP", "UTMASTG"):
            c["TMA"] += 1
            width = 128
            if depth:
                c["loop_TMA"] += 1
        elif base in ("LDG", "STG"):
            width = _width_bits(ins.op)
            c[base][width] = c[base].get(width, 0) + 1
            if base == "LDG" and depth:
                c["loop_LDG"][width] = c["loop_LDG"].get(width, 0) + 1
        elif base in ("RED", "ATOMG", "ATOM"):
            if base == "ATOM" and ".E." not in ins.op + ".":
                continue
            c["RED"] += 1
            width = _width_bits(ins.op)
        elif base in ("LDL", "STL"):
            c[base] += 1
        if width is not None:
            c["bytes_by_width"][width] = c["bytes_by_width"].get(width, 0) + (width // 8) * w
    # GEMM operands: of the loop-weighted bytes loaded inside loops, the share by LDGSTS.128 or TMA
    loop_tot = loop_fast = 0
    for ins in instrs:
        depth = sum(1 for a, b in rngs if a <= ins.addr <= b)
        if not depth:
            continue
        w = LOOP_WEIGHT ** depth
        if ins.base in ("LDG", "LDGSTS"):
            width = _width_bits(ins.op)
            loop_tot += width // 8 * w
            loop_fast += width // 8 * w if (ins.base == "LDGSTS" and width == 128) else 0
        elif ins.base in ("UTMALDG", "UBLKCP"):
            loop_tot += 16 * w
            loop_fast += 16 * w
    c["loop_async128_share"] = round(loop_fast / loop_tot, 3) if loop_tot else None
    total = sum(c["bytes_by_width"].values())
    c["global_bytes_weighted"] = total
    c["frac128"] = round(c["bytes_by_width"].get(128, 0) / total, 3) if total else None
    c["frac64plus"] = round((c["bytes_by_width"].get(128, 0) + c["bytes_by_width"].get(64, 0)) / total, 3) \
        if total else None
    return c


def occupancy(arch: int, regs: int, smem: int, threads: int) -> dict:
    """Theoretical CTAs and warps per SM from registers per thread, shared memory per CTA (static +
    dynamic, bytes) and threads per CTA, and the limiting resource."""
    lim = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by = {}
    by["registers"] = (lim["regs"] // regs_per_warp) // warps if regs_per_warp else lim["ctas"]
    by["threads"] = lim["threads"] // (warps * 32)
    by["ctas"] = lim["ctas"]
    if smem:
        per_cta = -(-(smem + lim["smem_reserved"]) // lim["smem_unit"]) * lim["smem_unit"]
        by["shared"] = lim["smem"] // per_cta
    ctas = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    return dict(ctas=ctas, warps=ctas * warps, occupancy=round(ctas * warps / lim["warps"], 3), limiter=limiter)


def sass_text(instrs: list[Instr]) -> str:
    return "\n".join(f"/*{i.addr:04x}*/ {i.pred + ' ' if i.pred else ''}{i.op} {i.operands}" for i in instrs)


def audit_cubin(cubin, arch: int, threads: dict | int | None = None, dyn_shared: dict | int = 0,
                keep_sass: bool = False) -> dict[str, dict]:
    """{function: report} for every function of a cubin. threads / dyn_shared: per function (dict)
    or one value for all; None threads = unknown (no occupancy)."""
    sass, res = dump(cubin)
    funcs = parse_sass(sass)
    usage = parse_res_usage(res)
    out = {}
    for name, instrs in funcs.items():
        r = dict(classify(instrs))
        u = usage.get(name, {})
        r.update(REG=u.get("REG"), STACK=u.get("STACK", 0), LOCAL=u.get("LOCAL", 0), SHARED_static=u.get("SHARED", 0))
        t = threads.get(name) if isinstance(threads, dict) else threads
        ds = dyn_shared.get(name, 0) if isinstance(dyn_shared, dict) else dyn_shared
        r["threads"] = t
        r["shared"] = (u.get("SHARED", 0) or 0) + (ds or 0)
        if t and r["REG"] is not None:
            r.update(occupancy(arch, r["REG"], r["shared"], t))
        if keep_sass:
            r["sass"] = sass_text(instrs)
        out[name] = r
    return out


def summary(r: dict) -> str:
    """One line of the counts that the expectations read."""
    def widths(d):
        return " ".join(f"{w}:{n}" for w, n in sorted(d.items(), key=lambda kv: -kv[0])) or "-"
    tc = f"HGMMA {r['HGMMA']}" if r["HGMMA"] else f"HMMA {r['HMMA']}" if r["HMMA"] else "no TC"
    return (f"{tc}; LDGSTS {widths(r['LDGSTS_w'])}; TMA {r['TMA']}; LDG {widths(r['LDG'])} "
            f"(in loops {widths(r['loop_LDG'])}); STG {widths(r['STG'])}; LDSM {r['LDSM']}; "
            f"128-bit share {r['frac128']}")
