"""Imports of the third-party model libraries the fuse() tests run on (torchvision, timm).

torchvision is imported normally. Only when its compiled extension cannot load does this module
make it importable: the torchvision wheel on PyPI that matches torch 2.13.0 is built against the
CUDA build of torch (its `_C.so` links libtorch_cuda.so and libc10_cuda.so), so under the CPU
build of torch the extension fails to load, torchvision carries on without its operators, and its
import then stops at `_meta_registrations.py`, which registers fake implementations for
`torchvision::nms` and `torchvision::qnms` that were never defined ("operator torchvision::nms
does not exist"). Defining those two schemas (with the signatures of torchvision's own
csrc/ops/nms.cpp) lets the import finish. The operators still have no kernel: calling
`torchvision.ops.nms` would raise; the models (classification, segmentation) never call them.
The timm models use torchvision only through that import.

    tv = torchvision()      # the torchvision module, or pytest skips the test when it is absent
    tm = timm()             # timm likewise
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

_SHIM_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                 "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_shim_library = None  # kept alive: dropping a torch.library.Library removes its definitions

#: Whether the shim was needed (torchvision's compiled extension could not load here).
SHIMMED = False


def _define_missing_ops() -> None:
    global _shim_library, SHIMMED
    if _shim_library is None:
        _shim_library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SHIM_SCHEMAS:
            name = schema.split("(", 1)[0]
            if not _op_exists(name):
                _shim_library.define(schema)
    SHIMMED = True


def _op_exists(name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _import_torchvision():
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or "does not exist" not in str(exc):
            raise
    # The extension did not load (see the module docstring): drop the half-imported package,
    # define the two schemas, import again.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _define_missing_ops()
    return importlib.import_module("torchvision")


def torchvision():
    """The torchvision module; the calling test is skipped when torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (requirements-cpu.txt pins it)")
    return _import_torchvision()


def timm():
    """The timm module (it imports torchvision, so that goes first); skipped when not installed."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (requirements-cpu.txt pins it)")
    if importlib.util.find_spec("torchvision") is not None:
        _import_torchvision()
    return importlib.import_module("timm")
