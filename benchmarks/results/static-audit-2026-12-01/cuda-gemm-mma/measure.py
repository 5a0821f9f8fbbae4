"""Audit rows of every template instantiation of the CUDA GEMM-class kernels of a csrc/ tree, with
scripts/sass_audit.py's own functions (nvcc -cubin with its flags, read_cuda, check).

    python measure.py ROOT ARCH OUT_DIR [FILE.cu ...]

ROOT: a tree holding csrc/ (and scripts/ of this repository beside this file for the audit code).
One line per instantiation: tensor-core instructions, LDSM, LDGSTS (width:count), LDG inside loops
(width:count), the loop async share (loop_async128_share), registers, spills (local bytes / LDL /
STL), static shared memory, CTAs per SM by registers and static shared memory, and the verdict of
sass_audit.check (the fp32 instantiations and the scalar fallback conv_gemm_kernel are printed too;
the audit judges the fallback by "no spills" only and hides fp32 beside 16-bit rows).
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "scripts"))
import sass_audit as A  # noqa: E402

root, arch, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files = sys.argv[4:] or ["conv.cu", "attention.cu"]
kernels = ("conv_gemm_kernel", "conv_gemm_async_kernel", "attn_fwd_kernel", "attn_bwd_dq_kernel",
           "attn_bwd_dkdv_kernel")
nvcc = "/usr/local/cuda/bin/nvcc"
print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
for cu in files:
    d = os.path.join(out_dir, f"sm{arch}-{cu[:-3]}")
    os.makedirs(d, exist_ok=True)
    cub = os.path.join(d, f"sm{arch}-{cu[:-3]}.cubin")
    cmd = [nvcc, "-cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", f"-arch=sm_{arch}",
           f"-I{os.path.join(root, 'csrc')}", os.path.join(root, "csrc", cu), "-o", cub]
    print("$", " ".join(cmd))
    subprocess.run(cmd, check=True)
    for r in A.read_cuda(d, arch):
        if r["kernel"] not in kernels:
            continue
        ok, fails, _ = A.check(r)
        print(f"sm_{arch} {r['kernel']}<{r['targs']}> HMMA={r['HMMA']} HGMMA={r['HGMMA']} LDSM={r['LDSM']} "
              f"LDGSTS={r['LDGSTS_w']} loopLDG={r['loop_LDG']} loop_async_share={r['loop_async128_share']} "
              f"REG={r['REG']} spill(local/LDL/STL)={r.get('LOCAL')}/{r['LDL']}/{r['STL']} "
              f"static_smem={r['shared']} ctas={r.get('ctas')} {'meets' if ok else 'MISS: ' + '; '.join(fails)}")
