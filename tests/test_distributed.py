"""Distribution (issue 7, item 7): a model built from fastnets layers trained under
DistributedDataParallel gives the stock model's gradients, updated weights and batch-norm
running statistics.

CPU: two processes (torch.multiprocessing) over gloo, each with its own shard of the batch, run one
SGD step of the fused model and of the same stock model (torch.nn layers, the same weights). The
fastnets layers run their torch reference backend here: the Triton interpreter is far too slow for
a distributed training step, and what DDP adds (gradient all-reduce through the autograd hooks of
the fused ops, buffer broadcast of the batch-norm running statistics) is backend-independent. The
kernels' own gradients are the family tests'. GPU: the fused layers under FSDP (gpu-marked).
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
DEADLINE_S = 240  # a worker group that has not finished by then is killed and the test fails
PG_TIMEOUT = datetime.timedelta(seconds=60)  # a collective waiting on a dead peer raises


def _spawn(fn, args, nprocs):
    """torch.multiprocessing's spawn, joined with a deadline: never a hung test."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=2):  # raises ProcessRaisedException / ProcessExitedException on failure
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} worker processes did not finish within {DEADLINE_S} s")


def _finish() -> None:
    """A worker's end once its results are on disk: a barrier, then exit without Python's teardown.
    Tearing DDP down at exit can deadlock inside torch (seen with torch 2.13 on the CPU: the main
    thread frees the Reducer and joins the gloo worker thread while holding the GIL; that thread is
    freeing an AsyncWork whose thread-local state needs the GIL to drop a Python reference)."""
    dist.barrier()
    os._exit(0)


def _models(seed=0):
    """(fused, stock): ConvBNAct2d, BatchNormAct2d, pools and a linear head, and the stock layers
    they replace, with the same state_dict."""
    import fastnets.nn as fnn

    torch.manual_seed(seed)
    stock = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    fused = nn.Sequential(
        fnn.ConvBNAct2d(3, 8, 3, padding=1), nn.Identity(),
        fnn.MaxPool2d(3, 2, 1),
        fnn.BatchNormAct2d(8), nn.Identity(),
        fnn.AvgPool2d(2),
        fnn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    fused.load_state_dict(stock.state_dict())
    return fused, stock


def _step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("FASTNETS_BACKEND", "torch")
    import fastnets

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=PG_TIMEOUT)
    fused, stock = _models()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * 4, 3, 13, 11, generator=g)
    y = torch.randint(0, 5, (WORLD * 4,), generator=g)
    xs, ys = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]  # this rank's shard
    results = {}
    with fastnets.use_backend("torch"):
        for name, model in (("fused", fused), ("stock", stock)):
            ddp = nn.parallel.DistributedDataParallel(model.train())
            results[name] = _step(ddp, xs, ys)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


def test_ddp_gloo_two_processes_fused_equals_stock():
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_worker, (os.path.join(tmp, "init"), tmp), WORLD)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for rank, res in enumerate(ranks):
        (fg, fs), (sg, ss) = res["fused"], res["stock"]
        assert fg.keys() == sg.keys() and fs.keys() == ss.keys()
        for n in sg:
            torch.testing.assert_close(fg[n], sg[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} grad {n}: {m}")
        for n in ss:
            torch.testing.assert_close(fs[n], ss[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {n}: {m}")
    # DDP all-reduced the gradients: every rank holds the same ones (and so the same weights).
    for n in ranks[0]["fused"][0]:
        assert torch.equal(ranks[0]["fused"][0][n], ranks[1]["fused"][0][n]), n


def _fsdp_worker(rank, init_file, out_file):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    import fastnets

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=1,
                            timeout=PG_TIMEOUT)
    fused, stock = _models()
    fused, stock = fused.cuda(), stock.cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 32, 32, generator=g).cuda()
    y = torch.randint(0, 5, (16,), generator=g).cuda()
    with fastnets.use_backend("triton"):
        f_grads, _ = _step(FSDP(fused.train(), use_orig_params=True), x, y)
    s_grads, _ = _step(stock.train(), x, y)
    torch.save({"fused": {k: v.cpu() for k, v in f_grads.items()},
                "stock": {k: v.cpu() for k, v in s_grads.items()}}, out_file)
    torch.cuda.synchronize()
    _finish()


@pytest.mark.gpu
def test_gpu_fused_layers_under_fsdp():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fsdp.pt")
        _spawn(_fsdp_worker, (os.path.join(tmp, "init"), out), 1)
        res = torch.load(out)
    stock = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in res["stock"].items()}
    fused = {k.replace("_fsdp_wrapped_module.", "").replace("module.", ""): v for k, v in res["fused"].items()}
    assert fused.keys() == stock.keys()
    for n in stock:
        torch.testing.assert_close(fused[n], stock[n], rtol=2e-3, atol=2e-4, msg=lambda m: f"grad {n}: {m}")
