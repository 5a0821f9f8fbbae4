"""Build of fastnets: pure Python, plus the CUDA extension fastnets._C when nvcc is found.

Environment:
  FASTNETS_BUILD_CUDA   unset/"auto": build _C if nvcc is found, else install pure Python;
                        "1": require the build (fail without nvcc or on a compile error);
                        "0": skip it.
  FASTNETS_CUDA_ARCHS   compute capabilities to build for, e.g. "80;90" (the default) or "90a".
  CUDA_HOME / CUDA_PATH where to look for nvcc first (then PATH, then /usr/local/cuda).

csrc/*.cu and csrc/*.cpp are compiled in parallel, one nvcc process each, and linked with
`-cudart static`, so the module needs no CUDA runtime library at import time. No torch header is
used: the kernels take raw pointers, sizes, strides and the stream as integers.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def arch_flags():
    archs = os.environ.get("FASTNETS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    flags = []
    for a in (a.strip().replace(".", "") for a in archs if a.strip()):
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def compile_extension(nvcc, sources, out, build_temp):
    """Compiles `sources` (.cu and .cpp, absolute paths) in parallel and links them into `out`."""
    import pybind11

    tmp = os.path.join(build_temp, "csrc")
    os.makedirs(tmp, exist_ok=True)
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    includes = [f"-I{os.path.join(ROOT, 'csrc')}", f"-I{pybind11.get_include()}",
                f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(cuda_home, 'include')}"]
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
    archs = arch_flags()
    jobs = []
    for src in sources:
        obj = os.path.join(tmp, os.path.basename(src) + ".o")
        cmd = [nvcc, *common, *includes, "-c", src, "-o", obj]
        if src.endswith(".cu"):
            cmd[1:1] = ["--expt-relaxed-constexpr", "-lineinfo", *archs]
        jobs.append((src, obj, cmd))

    def run(job):
        src, obj, cmd = job
        print("fastnets: nvcc", os.path.relpath(src, ROOT), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{proc.stdout}{proc.stderr}")
        return obj

    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        objs = list(pool.map(run, jobs))
    link = [nvcc, "-shared", "-cudart", "static", *archs, "-o", out, *objs]
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking fastnets._C failed:\n{proc.stdout}{proc.stderr}")


def all_sources():
    """csrc/*.cu and csrc/*.cpp, relative to the project (setuptools requires relative paths)."""
    return sorted(os.path.relpath(p, ROOT) for ext in ("cu", "cpp")
                  for p in glob.glob(os.path.join(ROOT, "csrc", f"*.{ext}")))


class NvccBuildExt(build_ext):
    """Builds fastnets._C with nvcc, or records why it was not built."""

    def build_extension(self, ext):
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        info_path = os.path.join(os.path.dirname(out), "_build_info.json")
        mode = os.environ.get("FASTNETS_BUILD_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"FASTNETS_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
        nvcc = find_nvcc()
        reason = None
        if mode == "0":
            reason = "the build was skipped (FASTNETS_BUILD_CUDA=0)"
        elif nvcc is None:
            if mode == "1":
                raise RuntimeError("FASTNETS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
            reason = "nvcc was not found when fastnets was installed"
        if reason is None:
            try:
                compile_extension(nvcc, [os.path.join(ROOT, p) for p in ext.sources], out, self.build_temp)
            except Exception as exc:  # noqa: BLE001 - reported below, or re-raised when required
                if mode == "1":
                    raise
                reason = f"the CUDA build failed: {exc}"
                print(f"fastnets: WARNING: {reason}; installing without fastnets._C", file=sys.stderr)
        if reason is not None and os.path.exists(out):
            os.remove(out)  # never leave a stale extension from an earlier build
        info = {"cuda_built": reason is None, "reason": reason, "nvcc": nvcc,
                "archs": os.environ.get("FASTNETS_CUDA_ARCHS", "80;90")}
        # Beside the module (a wheel), and in the source tree (an editable install, whose build
        # directory is temporary and of which only the module is copied back).
        for path in {info_path, os.path.join(ROOT, "fastnets", "_build_info.json")}:
            with open(path, "w") as f:
                json.dump(info, f)


if __name__ == "__main__":  # setuptools runs this file as __main__; scripts/check_cuda.py imports it
    setup(
        ext_modules=[Extension("fastnets._C", sources=all_sources())],
        cmdclass={"build_ext": NvccBuildExt},
    )
