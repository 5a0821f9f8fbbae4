"""The install matrix: every documented way of installing fastnets installs and imports.

setup.py's combinations (README, setup.py's docstring): editable (`pip install -e .`) and not (a
wheel built from the tree), and an sdist; FASTNETS_BUILD_CUDA 0 / 1 / auto (and a bad value); nvcc
present, absent, and present but failing. Each cell installs a copy of the tree (tracked and
untracked-not-ignored files, never the tree itself) into a throwaway venv that sees this
interpreter's site-packages (torch, setuptools, pybind11, pip) through a .pth file but not the
fastnets installed there, then imports it from another folder and reads what it says about
fastnets._C. The shared venv's fastnets and the source tree are never touched.

nvcc is hidden the way setup.py looks for it: CUDA_HOME set to a folder without nvcc (an explicit
CUDA_HOME is the only place setup.py looks) and PATH without any folder holding an nvcc. "Broken"
is an nvcc that fails every compile.

Cost: the cells without a real compile take a few seconds each (pip + one torch import). The real
nvcc builds (marked slow; they run in CI) share one object cache (FASTNETS_BUILD_CACHE), for one
architecture (FASTNETS_CUDA_ARCHS=80): the first compiles csrc/ (about 1.5 min on 2 cores), the
others only link.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "80"

sys.path.insert(0, ROOT)
import setup as build  # noqa: E402  (setup() runs only as __main__)

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")

_CHECK = r"""
import json, fastnets
from fastnets import _ext
mod, why = _ext.load()
print(json.dumps({"file": fastnets.__file__, "module": getattr(mod, "__file__", None), "why": why,
                  "info": _ext.build_info(), "cuda": str(fastnets.backends()["cuda"])}))
"""


def _tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One copy of the source tree (no build artefacts); each cell copies it again."""
    dst = tmp_path_factory.mktemp("pristine") / "fastnets-src"
    for rel in _tree_files():
        if rel.endswith((".so", ".o")) or rel.endswith("_build_info.json"):
            continue
        os.makedirs(dst / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst / rel)
    return dst


@pytest.fixture(scope="module")
def objcache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("objcache"))


class Cell:
    def __init__(self, tmp_path, pristine, objcache):
        self.tmp = tmp_path
        self.src = tmp_path / "src"
        shutil.copytree(pristine, self.src)
        self.venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True)
        self.python = str(self.venv / "bin" / "python")
        purelib = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        # This interpreter's packages, without processing its .pth files (which install the shared
        # venv's editable fastnets).
        with open(os.path.join(purelib, "_parent_site.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        self.objcache = objcache

    def env(self, mode: str | None, nvcc: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FASTNETS_", "PIP_")) and k not in ("PYTHONPATH", "CUDA_HOME", "CUDA_PATH")}
        env.update(FASTNETS_CUDA_ARCHS=ARCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
        if mode is not None:
            env["FASTNETS_BUILD_CUDA"] = mode
        if nvcc == "present":
            env["FASTNETS_BUILD_CACHE"] = self.objcache
        elif nvcc == "absent":
            empty = self.tmp / "no-cuda"
            empty.mkdir(exist_ok=True)
            env["CUDA_HOME"] = str(empty)
            env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                          if d and not os.path.exists(os.path.join(d, "nvcc")))
        elif nvcc == "broken":
            fake = self.tmp / "broken-cuda"
            (fake / "bin").mkdir(parents=True, exist_ok=True)
            (fake / "bin" / "nvcc").write_text("#!/bin/sh\necho 'nvcc: simulated compile error' >&2\nexit 1\n")
            (fake / "bin" / "nvcc").chmod(0o755)
            env["CUDA_HOME"] = str(fake)
        return env

    def install(self, target: str, *, editable: bool, mode: str | None, nvcc: str):
        cmd = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
               "--no-cache-dir", "--ignore-installed"]
        cmd += ["-e", target] if editable else [target]
        return subprocess.run(cmd, cwd=self.tmp, env=self.env(mode, nvcc), capture_output=True, text=True,
                              timeout=900)

    def check(self) -> dict:
        proc = subprocess.run([self.python, "-c", _CHECK], cwd=self.tmp, capture_output=True, text=True,
                              env=self.env(None, "present"), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def cell(tmp_path, pristine, objcache):
    return Cell(tmp_path, pristine, objcache)


def _installed_ok(cell: Cell, proc, *, editable: bool, built: bool, reason: str | None = None) -> dict:
    assert proc.returncode == 0, f"install failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    got = cell.check()
    home = str(cell.src) if editable else str(cell.venv)
    assert got["file"].startswith(home), f"imported {got['file']}, expected under {home}"
    assert got["info"].get("cuda_built") is built, got
    if built:
        assert got["module"] and got["module"].startswith(home) and got["why"] is None, got
    else:
        assert got["module"] is None and reason in got["why"] and "not built" in got["cuda"], got
    if not editable:
        assert not list(cell.src.glob("fastnets/_C*.so")), "a wheel install left a module in the tree"
    return got


@pytest.mark.parametrize("editable,mode,nvcc,reason", [
    (True, "0", "present", "FASTNETS_BUILD_CUDA=0"),  # the report of issue 13: the editable copy failed
    (False, "0", "present", "FASTNETS_BUILD_CUDA=0"),
    (True, "auto", "absent", "nvcc was not found"),
    (False, "auto", "absent", "nvcc was not found"),
    (True, None, "absent", "nvcc was not found"),  # unset is auto
    (True, "auto", "broken", "simulated compile error"),
    (False, "auto", "broken", "simulated compile error"),
], ids=["editable-0", "wheel-0", "editable-auto-no-nvcc", "wheel-auto-no-nvcc", "editable-unset-no-nvcc",
        "editable-auto-nvcc-fails", "wheel-auto-nvcc-fails"])
def test_installs_without_the_extension(cell, editable, mode, nvcc, reason):
    proc = cell.install(str(cell.src), editable=editable, mode=mode, nvcc=nvcc)
    _installed_ok(cell, proc, editable=editable, built=False, reason=reason)


@pytest.mark.parametrize("mode,nvcc,message", [
    ("1", "absent", "FASTNETS_BUILD_CUDA=1 but nvcc was not found"),
    ("1", "broken", "simulated compile error"),
    ("yes", "present", "FASTNETS_BUILD_CUDA must be 0, 1 or auto, got 'yes'"),
])
def test_required_build_fails_clearly(cell, mode, nvcc, message):
    for editable in (True, False):
        proc = cell.install(str(cell.src), editable=editable, mode=mode, nvcc=nvcc)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not list(cell.src.glob("fastnets/_C*.so"))


@pytest.mark.slow
@needs_nvcc
def test_editable_build_then_rebuild_without(cell):
    """FASTNETS_BUILD_CUDA=1 builds and imports the module in place; a later editable install
    with FASTNETS_BUILD_CUDA=0 removes it rather than leave a stale module to be imported."""
    proc = cell.install(str(cell.src), editable=True, mode="1", nvcc="present")
    got = _installed_ok(cell, proc, editable=True, built=True)
    assert got["info"]["archs"] == ARCH
    proc = cell.install(str(cell.src), editable=True, mode="0", nvcc="present")
    _installed_ok(cell, proc, editable=True, built=False, reason="FASTNETS_BUILD_CUDA=0")


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("mode", ["auto", "1"])
def test_wheel_build(cell, mode):
    proc = cell.install(str(cell.src), editable=False, mode=mode, nvcc="present")
    _installed_ok(cell, proc, editable=False, built=True)


@pytest.mark.slow
@needs_nvcc
def test_sdist_carries_csrc_and_builds(cell):
    dist = cell.tmp / "dist"
    proc = subprocess.run([cell.python, "-c", f"from setuptools import build_meta; "
                           f"print(build_meta.build_sdist({str(dist)!r}))"],
                          cwd=cell.src, env=cell.env(None, "present"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = dist / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = {p for p in _tree_files() if p.startswith("csrc/")}
    assert tracked and tracked <= names, f"missing from the sdist: {sorted(tracked - names)}"
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"} <= names
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build_info.json")], names
    proc = cell.install(str(sdist), editable=False, mode="auto", nvcc="present")
    _installed_ok(cell, proc, editable=False, built=True)
