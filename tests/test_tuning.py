"""The autotuners' early pruning (kernels/conv.py, kernels/attention.py): candidates that cannot fit
in shared memory never reach the autotuner, and the 16-bit candidates are untouched. Pure functions
of the candidate list, checked here on the GPU lists (the interpreter itself tunes one config)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fastnets.kernels import attention as KA  # noqa: E402
from fastnets.kernels import conv as KC  # noqa: E402


def _gemm(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in rows]


def _tiles(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("BLOCK_K"), c.num_warps, c.num_stages)
            for c in configs]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_prune_keeps_every_16_bit_candidate(dtype):
    configs = _gemm(KC._BOTH + KC._SM90)
    x = torch.empty(1, dtype=dtype)
    assert KC.prune_gemm_configs(configs, {"x_ptr": x}) == configs


def test_conv_prune_drops_the_sm90_tiles_in_fp32():
    configs = _gemm(KC._BOTH + KC._SM90)
    kept = KC.prune_gemm_configs(configs, {"x_ptr": torch.empty(1)})
    assert _tiles(kept) == list(KC._BOTH)
    # Every sm_90 tile in fp32 needs more than sm_90's 227 KB: stages x (BM + BN) x BK x 4 bytes.
    assert all(s * (bm + bn) * bk * 4 > 232448 for bm, bn, bk, _, s in KC._SM90)
    # Never an empty list, and called as the AOT script calls it (everything in named_args).
    only = _gemm(KC._SM90[:1])
    assert KC.prune_gemm_configs(only, {"x_ptr": torch.empty(1)}) == only
    assert KC.prune_gemm_configs(configs, {}, x_ptr=torch.empty(1)) == kept


def _attn(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_attention_prune_by_head_dim_and_dtype(dtype, head_dim):
    table = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
             128: [(128, 32, 8, 3), (64, 64, 4, 3)],
             256: [(64, 32, 8, 2)]}
    rows = sorted({r for v in table.values() for r in v})
    _, prune = KA.tuned_configs(table, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}))
    configs = _attn(rows)
    q = torch.empty(1, dtype=dtype)
    kept = prune(configs, {"Q": q, "BLOCK_D": head_dim, "BLOCK_DV": head_dim})
    wanted = table[min(k for k in table if k >= head_dim)]
    if dtype == torch.float32:
        wanted = [r for r in wanted if r[0] * r[1] < 128 * 128]
    assert sorted(_tiles(kept)) == sorted((bm, bn, None, w, s) for bm, bn, w, s in wanted)


def test_every_autotuned_kernel_caches_its_timings_on_disk(monkeypatch):
    """Each autotuned kernel goes through _common.autotune, which asks Triton to keep the timings on
    disk (cache_results) unless FASTNETS_AUTOTUNE_CACHE=0; the interpreter never caches."""
    import pathlib

    from fastnets.kernels import _common

    # No kernel module calls triton.autotune itself (the interpreter turns cache_results off, so
    # the source is where this shows on the CPU); ten autotuned kernels go through the wrapper.
    kernels = pathlib.Path(_common.__file__).parent
    sources = {p.name: p.read_text() for p in kernels.glob("*.py") if p.name != "_common.py"}
    assert not [name for name, src in sources.items() if "triton.autotune(" in src]
    assert sum(src.count("autotune(") for src in sources.values()) == 10
    seen = {}
    monkeypatch.setattr(triton, "autotune", lambda **kw: seen.update(kw) or (lambda fn: fn))
    _common.autotune([triton.Config({})], key=["n"])
    assert seen["cache_results"] is _common.AUTOTUNE_CACHE
    # The switch, read at import.
    import importlib
    import os
    import subprocess
    import sys
    code = "from fastnets.kernels import _common; print(_common.AUTOTUNE_CACHE)"
    env = {**os.environ, "FASTNETS_AUTOTUNE_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert importlib.import_module("fastnets.kernels._common").AUTOTUNE_CACHE == (
        os.environ.get("FASTNETS_AUTOTUNE_CACHE", "1") != "0")


# Issue 12, item 5: candidates that spill (measured from SASS, kernels/conv.py _SPILLS) never reach
# the autotuner on the architecture where they spill.
@pytest.mark.parametrize("arch", [8, 9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_conv_prune_drops_the_spilling_candidates(monkeypatch, arch, dtype):
    monkeypatch.setattr(KC, "ARCH", (arch, 0))
    candidates = KC._BOTH + (KC._SM90 if arch == 9 else ())
    configs = _gemm(candidates)
    x = torch.empty(1, dtype=dtype)
    for row in KC._SPILLS[arch].values():
        assert row <= set(KC._BOTH + KC._SM90), "a stale entry: not a candidate"
    # (FLAT_K, sxc, VEC, HAS_RES) -> the _SPILLS rows that apply
    launches = {(True, 1, 8, False): ("flat",), (True, 1, 1, True): ("flat",), (False, 1, 8, False): ("nhwc",),
                (False, 1, 8, True): ("nhwc", "res"), (False, 1, 1, False): ("strided",),
                (False, 3136, 1, True): ("strided",)}
    for (flat, sxc, vec, res), rows in launches.items():
        spills = set().union(*(KC._SPILLS[arch][r] for r in rows))
        assert KC.spilling(arch, flat, sxc, vec, res) == spills
        args = {"x_ptr": x, "FLAT_K": flat, "sxc": sxc, "VEC": vec, "HAS_RES": res}
        kept = _tiles(KC.prune_gemm_configs(configs, args))
        big = set(KC._SM90) if dtype == torch.float32 else set()
        if arch == 8 and dtype == torch.float32:  # 3 x (128 + 128) x 64 x 4 B = 196608 > 166912
            big.add((128, 128, 64, 8, 3))
        assert kept == [t for t in candidates if t not in spills and t not in big]
        assert kept, "every candidate pruned"
        # As the autotuner calls it: the constexprs among the keyword arguments.
        assert _tiles(KC.prune_gemm_configs(configs, {"x_ptr": x, "sxc": sxc},
                                            FLAT_K=flat, VEC=vec, HAS_RES=res)) == kept
    # 128x128x32 over 4 warps spills on the 16-byte channel path (a residual or SiLU in the epilogue),
    # and over NCHW input or unaligned channels only 64x64x32 does not.
    assert (128, 128, 32, 4, 4) in KC._SPILLS[arch]["flat"] & KC._SPILLS[arch]["nhwc"]
    assert set(KC._BOTH + KC._SM90) - KC._SPILLS[arch]["strided"] == {(64, 64, 32, 4, 4)}
    # what remains per path, 16-bit operands (issue 12: say how many candidates remain)
    remain = {p: len(set(candidates) - KC.spilling(arch, p == "flat", 1 if p != "strided" else 3136,
                                                   1 if p == "strided" else 8, p == "res"))
              for p in ("flat", "nhwc", "res", "strided")}
    flat8 = {"3.6": 2, "3.9": 4}.get(KC.TRITON, 2)
    assert remain == ({"flat": flat8, "nhwc": 6, "res": 6, "strided": 1} if arch == 8 else
                      {"flat": 3, "nhwc": 10, "res": 8, "strided": 1})


def test_conv_sm80_flat_row_per_triton_version():
    """sm_80's flattened reduction has a spill row per Triton version (no candidate is clean under both):
    each names real candidates and leaves some; the installed version's row (3.6's when not measured)."""
    for rows in KC._FLAT_SM80.values():
        assert rows <= set(KC._BOTH) and set(KC._BOTH) - rows
    assert not set(KC._BOTH) - set().union(*KC._FLAT_SM80.values())  # why one row for both cannot do
    assert KC._SPILLS[8]["flat"] == KC._FLAT_SM80.get(KC.TRITON, KC._FLAT_SM80["3.6"])


def test_conv_shared_memory_estimate_is_what_the_compiles_report():
    # sm_90 fp16 compiles (Triton 3.9, issue 12): 128x128x32 x 4 stages 65536 B, 128x256x64 x 3 stages
    # 147456 B; fp32 128x128x64 x 3 stages 196608 B.
    assert KC._gemm_shared(128, 128, 32, 4, 2) == 65536
    assert KC._gemm_shared(128, 256, 64, 3, 2) == 147456
    assert KC._gemm_shared(128, 128, 64, 3, 4) == 196608
    # On the CPU (no GPU, or the interpreter) nothing is pruned by architecture.
    if KC.ARCH == (0, 0):
        configs = _gemm(KC._BOTH)
        assert KC.prune_gemm_configs(configs, {"x_ptr": torch.empty(1, dtype=torch.float16), "FLAT_K": True}) == configs


# Issue 12, item 5, attention: the rows that spill on an architecture (kernels/attention.py FWD_SPILLS,
# attention_bwd.py DQ_SPILLS, from the SASS audit) are pruned there, and only there.
@pytest.mark.parametrize("arch", [0, 8, 9])
def test_attention_prune_drops_the_spilling_rows(monkeypatch, arch):
    from fastnets.kernels import attention_bwd as KB

    monkeypatch.setattr(KA, "ARCH_MAJOR", arch)
    table = {64: [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)], 128: [(64, 64, 4, 3)]}
    spills = {8: {64: {(128, 64, 4, 3), (64, 64, 4, 3)}}, 9: {64: {(128, 64, 4, 3)}}}
    _, prune = KA.tuned_configs(table, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}), spills)
    configs = _attn(sorted({r for v in table.values() for r in v}))
    q = torch.empty(1, dtype=torch.float16)
    kept = sorted(t[:2] + t[3:] for t in _tiles(prune(configs, {"Q": q, "BLOCK_D": 64, "BLOCK_DV": 64})))
    assert kept == sorted(set(table[64]) - spills.get(arch, {}).get(64, set()))
    # another head dim: nothing of its rows spills here
    assert _tiles(prune(configs, {"Q": q, "BLOCK_D": 128, "BLOCK_DV": 128})) == [(64, 64, None, 4, 3)]
    # every row spilling: the table's rows stay (never an empty list)
    _, prune_all = KA.tuned_configs({64: [(64, 64, 4, 3)]}, triton.Config({}), {arch: {64: {(64, 64, 4, 3)}}})
    assert len(prune_all(_attn([(64, 64, 4, 3)]), {"Q": q, "BLOCK_D": 64, "BLOCK_DV": 64})) == 1
    # the kernels' own tables name real candidates of their head dim
    for rows, tab in ((KA.FWD_TABLE, KA.FWD_SPILLS), (KB.DQ_TABLE, KB.DQ_SPILLS), (KB.DKDV_TABLE, KB.DKDV_SPILLS)):
        for per_dim in tab.values():
            for dim, bad in per_dim.items():
                assert bad <= set(rows[dim]), "a stale entry: not a candidate"
                assert set(rows[dim]) - bad, "every candidate of a head dim spills"


@pytest.mark.parametrize("arch", [0, 8, 9])
def test_pool_prune_drops_the_spilling_tiles(monkeypatch, arch):
    """kernels/pool.py: the (TILE, warps) that spill on an architecture (SASS audit) are pruned there."""
    from fastnets.kernels import pool as KP

    monkeypatch.setattr(KP, "ARCH_MAJOR", arch)
    configs = [triton.Config({"TILE": t}, num_warps=w) for t in (1024, 2048, 4096) for w in (4, 8)]
    for spills in (KP.FWD_SPILLS, KP.BWD_SPILLS):
        assert all(s <= {(1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 4), (4096, 8)} for s in spills.values())
        prune = KP._pruner(spills)["early_config_prune"]
        kept = [(c.kwargs["TILE"], c.num_warps) for c in prune(configs, {})]
        assert kept == [(c.kwargs["TILE"], c.num_warps) for c in configs
                        if (c.kwargs["TILE"], c.num_warps) not in spills.get(arch, set())]
        assert prune(configs[:1], {}) == configs[:1]  # never an empty list
    if arch:
        assert (4096, 4) in KP.BWD_SPILLS[arch]  # the backward's largest tile over 4 warps, everywhere


@pytest.mark.parametrize("arch", [0, 8, 9])
def test_pool_prune_keeps_128_bit_tiles_for_16_bit_data(monkeypatch, arch):
    """kernels/pool.py: a tile giving a thread fewer than 16 bytes (TILE=1024 over 8 warps in fp16:
    64-bit loads) is pruned for 16-bit data and kept for fp32, whose 4 elements per thread are 128-bit."""
    from fastnets.kernels import pool as KP

    monkeypatch.setattr(KP, "ARCH_MAJOR", arch)
    configs = [triton.Config({"TILE": t}, num_warps=w) for t in (1024, 2048, 4096) for w in (4, 8)]
    for spills in (KP.FWD_SPILLS, KP.BWD_SPILLS):
        prune = KP._pruner(spills)["early_config_prune"]
        half = [(c.kwargs["TILE"], c.num_warps) for c in prune(configs, {"x": torch.empty(1, dtype=torch.float16)})]
        full = [(c.kwargs["TILE"], c.num_warps) for c in prune(configs, {"x": torch.empty(1, dtype=torch.float32)})]
        assert (1024, 8) not in half and half and all(t // (32 * w) * 2 >= 16 for t, w in half)
        assert full == [(c.kwargs["TILE"], c.num_warps) for c in configs
                        if (c.kwargs["TILE"], c.num_warps) not in spills.get(arch, set())]
