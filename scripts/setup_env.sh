# Sourced by scripts/test.sh and scripts/bench.sh: sets PYBIN to a Python that has torch, Triton
# and an editable install of fastnets (with fastnets._C built when nvcc is found).
#
# - A machine whose python3 already has torch and pybind11 (a GPU machine): that Python is used
#   as it is, and nothing is downloaded (the editable install runs with --no-index).
# - Otherwise (a fresh CPU machine): .venv is created and filled from requirements-cpu.txt
#   (torch==2.13.0, the CPU build, pinned), once; later runs reuse it.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_sys_py="${PYTHON:-python3}"

if "$_sys_py" -c "import torch, pybind11, setuptools" >/dev/null 2>&1; then
    PYBIN="$(command -v "$_sys_py")"
    _pip_offline=(--no-index)
    echo "fastnets: using the installed torch: $("$PYBIN" -c 'import torch; print(torch.__version__)')"
else
    if [ ! -x "$_root/.venv/bin/python" ]; then
        echo "fastnets: creating .venv"
        "$_sys_py" -m venv "$_root/.venv"
    fi
    PYBIN="$_root/.venv/bin/python"
    _pip_offline=()
    # torchvision and timm are checked as installed distributions, not imported: torchvision's
    # compiled ops cannot load against the CPU torch (tests/_thirdparty.py explains and handles it).
    if ! "$PYBIN" -c "import torch, triton, pybind11, pytest, xdist, pytest_timeout, hypothesis, pytest_benchmark, rich, matplotlib; import importlib.metadata as md; [md.version(p) for p in ('torchvision', 'timm', 'huggingface_hub', 'safetensors')]" >/dev/null 2>&1; then
        echo "fastnets: installing requirements-cpu.txt into .venv"
        "$PYBIN" -m pip install -q --disable-pip-version-check -r "$_root/requirements-cpu.txt"
    fi
fi

echo "fastnets: building (FASTNETS_BUILD_CUDA=${FASTNETS_BUILD_CUDA:-auto})"
_t0=$(date +%s)
"$PYBIN" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    "${_pip_offline[@]}" -e "$_root"
echo "fastnets: build done in $(( $(date +%s) - _t0 ))s"
"$PYBIN" -c "import fastnets; [print('  ', s) for s in fastnets.backends().values()]"
export PYBIN
