"""The pytest-benchmark suite over the harness of fastnets.bench (the same cases as
`python -m fastnets.bench`, timed by pytest-benchmark's fixture):

    pytest benchmarks/                                  # the default set of this machine
    pytest benchmarks/ --bench-quick                    # the quick subset
    pytest benchmarks/test_models.py --bench-models resnet50 --bench-batch 1 32
    pytest benchmarks/test_ops.py -k conv_bn_act --bench-op-batch 128

Each timed call synchronizes the GPU, so pytest-benchmark's wall-clock rounds measure finished
work (the CLI's do_bench numbers, timed with CUDA events, are the ones the results tables use).
A fastnets variant is checked against stock before it is timed: a mismatch fails the test.
Nothing here sets TRITON_INTERPRET: the interpreter is for tests, and timing it means nothing.
"""
import pytest
import torch

from fastnets.bench import models, ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_addoption(parser):
    g = parser.getgroup("fastnets.bench")
    g.addoption("--bench-quick", action="store_true", help="the quick subset of op cases and models")
    g.addoption("--bench-dtype", choices=sorted(DTYPES),
                help="dtype of every case (default: each case's own; fp32 on a CPU)")
    g.addoption("--bench-op-batch", type=int, help="N of the op cases (default: 64 on a GPU, 8 on a CPU)")
    g.addoption("--bench-shrink", type=int, default=1, help="divide the op cases' spatial sizes and sequence lengths")
    g.addoption("--bench-cpu-ops", action="store_true",
                help="time the op cases on a CPU too (stock and the reference path; no kernel runs there)")
    g.addoption("--bench-models", nargs="+", help="models (default: the default set of this machine; 'all')")
    g.addoption("--bench-batch", type=int, nargs="+",
                help="model inference batches (default: 1 32 256 on a GPU, 8 on a CPU)")
    g.addoption("--bench-train-batch", type=int,
                help="model training batch, 0 for none (default: 64 on a GPU, 4 on a CPU)")
    g.addoption("--bench-image-size", type=int, help="image side of the image models")
    g.addoption("--bench-compile", choices=("auto", "all", "none"), default="auto", help="torch.compile variants")


class Config:
    def __init__(self, config):
        opt = config.getoption
        self.quick = opt("--bench-quick")
        self.dtype = DTYPES.get(opt("--bench-dtype"))
        self.op_batch = opt("--bench-op-batch") or (64 if DEVICE.type == "cuda" else 8)
        self.shrink = opt("--bench-shrink")
        self.cpu_ops = opt("--bench-cpu-ops")
        self.models = opt("--bench-models")
        train = opt("--bench-train-batch")
        self.model_settings = models.Settings(
            dtype=self.dtype, batches=opt("--bench-batch") or ([1, 32, 256] if DEVICE.type == "cuda" else [8]),
            train_batch=(train if train is not None else (64 if DEVICE.type == "cuda" else 4)) or None,
            compile_mode=opt("--bench-compile"), image_size=opt("--bench-image-size"), quick=self.quick)
        compile_on = opt("--bench-compile") == "all" or (opt("--bench-compile") == "auto" and DEVICE.type == "cuda")
        self.compile_on = compile_on and not self.quick


def pytest_configure(config):
    config._fastnets_bench = Config(config)


@pytest.fixture(scope="session")
def bench_config(request):
    return request.config._fastnets_bench


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_generate_tests(metafunc):
    if "op_case" in metafunc.fixturenames:
        metafunc.parametrize("op_case,dtype,variant", op_params(metafunc.config))
    if "model_case" in metafunc.fixturenames:
        metafunc.parametrize("model_case,mode,batch,variant", model_params(metafunc.config))


def op_params(config):
    """(case, dtype, variant) for every op case of the selection."""
    cfg = config._fastnets_bench
    out = []
    for case in ops.select(None, cfg.quick):
        for dtype in ([cfg.dtype] if cfg.dtype else [case.headline if DEVICE.type == "cuda" else torch.float32]):
            for variant in ops.variant_names(case):
                out.append(pytest.param(case, dtype, variant, id=f"{case.name}-{str(dtype)[6:]}-{variant}"))
    return out


def model_params(config):
    """(model case, mode, batch, variant) for every model configuration of the selection."""
    cfg = config._fastnets_bench
    st = cfg.model_settings
    out = []
    for case in models.select(cfg.models, DEVICE, cfg.quick):
        for mode, batches in (("inference", st.batches), ("training", [st.train_batch] if st.train_batch else [])):
            for batch in batches:
                for variant in models.VARIANTS:
                    out.append(pytest.param(case, mode, batch, variant, id=f"{case.name}-{mode}-b{batch}-{variant}"))
    return out


def pytest_collection_modifyitems(config, items):
    # pytest-benchmark 5.2 reads the private Node._nodeid, which pytest 9 no longer has (it keeps
    # the id in Node._id): give the items the attribute it reads.
    for item in items:
        if not hasattr(item, "_nodeid"):
            item._nodeid = item.nodeid
