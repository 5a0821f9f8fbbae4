"""Test configuration: interpreter on a CPU machine, poisoned outputs, the gpu marker.

On a machine without a CUDA device the Triton kernels run through the interpreter
(TRITON_INTERPRET=1, set here before anything imports triton). Outputs allocated by fastnets start
as NaN (FASTNETS_POISON=1), so an element a kernel never wrote cannot pass a parity check.
Tests marked `gpu` run only where torch sees a CUDA device, natively.
"""
import os

os.environ.setdefault("FASTNETS_POISON", "1")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs natively there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
