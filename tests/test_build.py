"""The package, the CUDA extension build and the backend report."""
import os

import pytest
import torch

import fastnets
from fastnets import _dispatch, _ext


def _nvcc_present():
    """Where setup.py looks (its find_nvcc: an explicit CUDA_HOME/CUDA_PATH only, else PATH, then
    /usr/local/cuda)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastnets_setup", os.path.join(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))), "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup.find_nvcc() is not None


def test_extension_built_where_nvcc_is():
    info = _ext.build_info()
    if os.environ.get("FASTNETS_BUILD_CUDA") == "1" or (_nvcc_present() and os.environ.get("FASTNETS_BUILD_CUDA") != "0"):
        mod, why = _ext.load()
        assert mod is not None, why
        assert info.get("cuda_built") is True
    else:
        assert _ext.load()[0] is None


def test_extension_reports_devices():
    mod, why = _ext.load()
    if mod is None:
        pytest.skip(f"fastnets._C not built here: {why}")
    n, err = mod.device_count()
    if torch.cuda.is_available():
        assert n == torch.cuda.device_count()
    else:
        assert n == 0 and err, "without a GPU the extension must say why it sees no device"
        status = fastnets.backends()["cuda"]
        assert not status.available and "no CUDA device" in status.reason


def test_backends_report_every_backend_with_reasons():
    report = fastnets.backends()
    assert set(report) == {"auto", "triton", "cuda", "torch"}
    for status in report.values():
        assert status.available or status.reason, status
        assert str(status).startswith(status.name)
    # Nothing has passed natively on a GPU in a committed run, and the report says so.
    assert "unproven" in str(report["cuda"]) or report["cuda"].proven_on_gpu


def test_use_backend_validates_and_restores():
    assert fastnets.current_backend() == os.environ.get("FASTNETS_BACKEND", "auto")
    with fastnets.use_backend("torch"):
        assert fastnets.current_backend() == "torch"
        with fastnets.use_backend("TRITON"):
            assert fastnets.current_backend() == "triton"
        assert fastnets.current_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with fastnets.use_backend("nope"):
            pass


def test_backend_from_environment(tmp_path):
    import subprocess
    import sys

    code = "import fastnets; print(fastnets.current_backend())"
    env = dict(os.environ, FASTNETS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["FASTNETS_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTNETS_BACKEND: unknown backend 'bogus'" in bad.stderr


def test_choose_rules_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert _dispatch.choose("op", cpu) == "torch"
    with fastnets.use_backend("cuda"), pytest.raises(fastnets.BackendError, match="backend 'cuda' cannot run here"):
        _dispatch.choose("op", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastnets.use_backend("triton"), pytest.raises(fastnets.BackendError, match="TRITON_INTERPRET=1"):
        _dispatch.choose("op", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fastnets.use_backend("triton"):
        assert _dispatch.choose("op", cpu) == "triton"
        with pytest.raises(fastnets.BackendError, match="does not support this input: float64"):
            _dispatch.choose("op", cpu, {"triton": "float64"})


def test_auto_never_picks_an_unproven_cuda_kernel(monkeypatch):
    from fastnets import _measured

    monkeypatch.setattr(_dispatch, "gpu_class", lambda d: "H100")
    monkeypatch.setattr(_dispatch, "_cuda_status", lambda d: (True, None))
    monkeypatch.setattr(_dispatch, "_triton_status", lambda d: (True, None))
    monkeypatch.setattr(_measured, "FASTEST", {"op": {"H100": ("cuda", "benchmarks/results/x")}})
    gpu = torch.device("cuda")
    monkeypatch.setattr(_measured, "PROVEN", {"triton": {}, "cuda": {}})
    assert _dispatch._auto_choice("op", gpu, {})[0] == "triton"
    monkeypatch.setattr(_measured, "PROVEN", {"triton": {}, "cuda": {"op": "benchmarks/results/x"}})
    assert _dispatch._auto_choice("op", gpu, {})[0] == "cuda"
    assert _dispatch._auto_choice("op", gpu, {"cuda": "fp64"})[0] == "triton"
    assert _dispatch._auto_choice("op", gpu, {"cuda": "fp64", "triton": "fp64"})[0] == "torch"
