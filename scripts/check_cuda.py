"""Compiles and links every csrc/ file into a private temporary module and imports it.

A quick check of a CUDA change (syntax, templates, bindings, missing symbols) that leaves the
installed fastnets._C alone, so several people can run it at once.
Usage: .venv/bin/python scripts/check_cuda.py [--archs "80;90"]
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import setup as build  # noqa: E402  (the project's setup.py; setup() only runs as __main__)

parser = argparse.ArgumentParser()
parser.add_argument("--archs", default="80;90")
args = parser.parse_args()
os.environ["FASTNETS_CUDA_ARCHS"] = args.archs
nvcc = build.find_nvcc()
if nvcc is None:
    sys.exit("nvcc not found")
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "_C.so")
    t0 = time.time()
    build.compile_extension(nvcc, [os.path.join(ROOT, s) for s in build.all_sources()], out, tmp)
    spec = importlib.util.spec_from_file_location("_C", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = sorted(n for n in dir(mod) if not n.startswith("__"))
    print(f"built and imported in {time.time() - t0:.1f}s: {', '.join(names)}")
    print("device_count:", mod.device_count())
