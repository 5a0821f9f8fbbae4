"""Build of fastnets: pure Python, plus the CUDA extension fastnets._C when nvcc is found.

Environment:
  FASTNETS_BUILD_CUDA   unset/"auto": build _C if nvcc is found, else install pure Python;
                        "1": require the build (fail without nvcc or on a compile error);
                        "0": skip it.
  FASTNETS_CUDA_ARCHS   compute capabilities to build for, e.g. "80;90" (the default) or "90a".
  FASTNETS_BUILD_CACHE  optional folder of compiled objects, reused when the source, every csrc
                        header, the nvcc command and nvcc's version are the same (repeated
                        installs, the install-matrix test).
  CUDA_HOME / CUDA_PATH the CUDA toolkit: when one is set, nvcc is looked for there only (as
                        torch.utils.cpp_extension does); when neither is set, on PATH, then in
                        /usr/local/cuda/bin.

Every combination installs: editable (`pip install -e .`) or not, from the tree or from an sdist
(MANIFEST.in carries csrc/). Without the extension (FASTNETS_BUILD_CUDA=0, or auto without nvcc or
after a failed compile) the package installs as pure Python and fastnets/_build_info.json says
why; `fastnets.backends()` reports it.

csrc/*.cu and csrc/*.cpp are compiled in parallel, one nvcc process each, and linked with
`-cudart static`, so the module needs no CUDA runtime library at import time. No torch header is
used: the kernels take raw pointers, sizes, strides and the stream as integers.
"""
import glob
import hashlib
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
    """nvcc's path, or None. An explicit CUDA_HOME (or CUDA_PATH) is the only place looked."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = os.path.join(home, "bin", "nvcc")
            return nvcc if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else None
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

    cache = os.environ.get("FASTNETS_BUILD_CACHE")
    if cache:
        os.makedirs(cache, exist_ok=True)
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        csrc = os.path.join(ROOT, "csrc")
        headers = b"".join(open(h, "rb").read() for pat in ("*.h", "*.cuh")
                           for h in sorted(glob.glob(os.path.join(csrc, pat))))

    def run(job):
        src, obj, cmd = job
        cached = None
        if cache:
            digest = hashlib.sha256(version.encode() + headers + open(src, "rb").read())
            digest.update(" ".join(c.replace(csrc, "<csrc>") for c in cmd if c != obj).encode())
            cached = os.path.join(cache, f"{os.path.basename(src)}-{digest.hexdigest()[:24]}.o")
            if os.path.exists(cached):
                print("fastnets: cached", os.path.relpath(src, ROOT), flush=True)
                shutil.copyfile(cached, obj)
                return obj
        print("fastnets: nvcc", os.path.relpath(src, ROOT), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{proc.stdout}{proc.stderr}")
        if cached:
            shutil.copyfile(obj, cached + f".{os.getpid()}.tmp")
            os.replace(cached + f".{os.getpid()}.tmp", cached)
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
    """Builds fastnets._C with nvcc, or installs without it and records why (never fails for a
    missing extension unless FASTNETS_BUILD_CUDA=1)."""

    def run(self):
        mode = os.environ.get("FASTNETS_BUILD_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"FASTNETS_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
        self._mode, self._nvcc, self._reason = mode, find_nvcc(), None
        if mode == "0":
            self._reason = "the build was skipped (FASTNETS_BUILD_CUDA=0)"
        elif self._nvcc is None:
            if mode == "1":
                raise RuntimeError("FASTNETS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME, or put nvcc on PATH)")
            self._reason = "nvcc was not found when fastnets was installed"
        if self._reason is not None:
            self._drop_extensions()  # nothing to build, and nothing for an editable install to copy
        super().run()
        self._write_info()

    def build_extension(self, ext):
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        try:
            compile_extension(self._nvcc, [os.path.join(ROOT, p) for p in ext.sources], out, self.build_temp)
        except Exception as exc:  # noqa: BLE001 - re-raised when required, else reported
            if self._mode == "1":
                raise
            self._reason = f"the CUDA build failed: {exc}"
            print(f"fastnets: WARNING: {self._reason}; installing without fastnets._C", file=sys.stderr)

    def build_extensions(self):
        super().build_extensions()
        if self._reason is not None:
            self._drop_extensions()  # a failed compile in auto mode: install without the module

    def _drop_extensions(self):
        """No extension this time: none is built, copied or listed as an output, and no module from
        an earlier build is left where it would be imported (the build directory; the source tree
        of an editable install)."""
        for ext in self.extensions:
            stale = [self.get_ext_fullpath(ext.name)]
            if self.inplace or self.editable_mode:
                stale.append(os.path.join(ROOT, *ext.name.split(".")[:-1],
                                          os.path.basename(self.get_ext_filename(ext.name))))
            for path in stale:
                if os.path.exists(path):
                    os.remove(path)
        self.extensions = []

    def _info_dirs(self):
        # Beside the module (a wheel), and in the source tree (an editable install, whose build
        # directory is temporary and of which only the module is copied back).
        dirs = {os.path.join(os.path.abspath(self.build_lib), "fastnets")}
        if self.inplace or self.editable_mode:
            dirs.add(os.path.join(ROOT, "fastnets"))
        return dirs

    def _write_info(self):
        info = {"cuda_built": self._reason is None, "reason": self._reason, "nvcc": self._nvcc,
                "archs": os.environ.get("FASTNETS_CUDA_ARCHS", "80;90")}
        for d in self._info_dirs():
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "_build_info.json"), "w") as f:
                json.dump(info, f)


if __name__ == "__main__":  # setuptools runs this file as __main__; scripts/check_cuda.py imports it
    setup(
        ext_modules=[Extension("fastnets._C", sources=all_sources())],
        cmdclass={"build_ext": NvccBuildExt},
    )
