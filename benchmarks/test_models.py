"""The model cases of fastnets.bench.models through pytest-benchmark: each (model, inference or
training, batch, variant) is one benchmark; extra_info carries images (or sequences) per second
and the peak memory of one call."""
import pytest
import torch

from fastnets.bench import harness, models

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

_cache = {}


def _calls(case, mode, batch, st):
    """One configuration's models at a time (the parametrization runs a configuration's variants in a row)."""
    key = (case.name, mode, batch)
    if key not in _cache:
        _cache.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        dtype = st.dtype_on(DEVICE)
        try:
            _cache[key] = models.Calls(case, mode, batch, case.size_for(st.image_size), dtype, DEVICE)
        except harness.Skip as exc:
            _cache[key] = exc
    if isinstance(_cache[key], harness.Skip):
        pytest.skip(str(_cache[key]))
    return _cache[key]


def test_model(benchmark, bench_config, model_case, mode, batch, variant):
    st = bench_config.model_settings
    why = models.static_skip(model_case, mode, batch, st, DEVICE).get(variant)
    if why:
        pytest.skip(why)
    calls = _calls(model_case, mode, batch, st)
    fn = calls.make(variant)
    if variant.startswith("fastnets"):
        check = calls.check(variant, fn)
        assert check.startswith("ok"), f"{model_case.name} {mode} b{batch} {variant}: {check}"

    def timed():
        out = fn()
        harness.sync(DEVICE)
        return out

    benchmark.pedantic(timed, rounds=3 if bench_config.quick else 10, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(model=model_case.name, mode=mode, batch=batch, variant=variant,
                                peak_mem_bytes=calls.peak_memory(variant, fn))
    if benchmark.stats is not None:
        benchmark.extra_info["items_per_s"] = batch / benchmark.stats.stats.median
    calls.release(variant)
