"""Compilation and graphs (issue 7, item 6).

CPU: a small model built from fastnets layers (conv-bn-act, batch-norm-act, pools, LRN, layer norm,
attention) compiles under torch.compile(fullgraph=True) with no graph break, in eval and in train
mode, forward and backward, on the torch backend (the reference registrations: the Triton
interpreter cannot run fake tensors), and gives the eager results.
GPU (gpu-marked): every op of tests/harden_ops.py under torch.compile(fullgraph=True, inductor)
through the Triton and CUDA registrations, dynamo's graph-break counter at 0, forward and
backward equal to eager; whole fused models (fastnets.models.resnet18 at a small input, and
fastnets.fuse() of a stock-form model) captured in a CUDA graph after an autotuning warm-up and
replayed with the eager results. torch.library.opcheck of every Triton and CUDA registration is
in each family's test file (test_gpu_opcheck and the like).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

import fastnets
import fastnets.nn as fnn
from harden_ops import NAMES, ops
from parity import DEVICE, KERNEL_BACKENDS


class Small(nn.Module):
    """Every kind of fastnets layer on a small image and a short sequence."""

    def __init__(self):
        super().__init__()
        self.stem = fnn.ConvBNAct2d(3, 8, 3, padding=1, activation="silu")
        self.pool = fnn.MaxPool2d(3, 2, 1)
        self.lrn = fnn.LocalResponseNorm(3)
        self.bn = fnn.BatchNormAct2d(8, activation="relu")
        self.avg = fnn.AvgPool2d(2)
        self.gap = fnn.AdaptiveAvgPool2d(1)
        self.conv = fnn.ConvAct2d(8, 8, 1, activation="gelu")
        self.norm = fnn.LayerNorm(8)
        self.attn = fnn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.avg(self.bn(self.lrn(self.pool(self.stem(x)))))
        y = self.conv(y)
        seq = self.norm(y.flatten(2).transpose(1, 2))  # [N, HW, C]
        seq = seq + self.attn(seq, seq, seq, need_weights=False)[0]
        return self.head(seq.mean(1) + self.gap(y).flatten(1))


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_fullgraph_small_model_reference(mode):
    torch.manual_seed(0)
    model = Small().to(DEVICE)
    model.train(mode == "train")
    x = torch.randn(2, 3, 13, 11, device=DEVICE)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with fastnets.use_backend("torch"):
        eager_model = Small().to(DEVICE).train(mode == "train")
        eager_model.load_state_dict(model.state_dict())
        expected = eager_model(x)
        expected.sum().backward()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
    assert _graph_breaks() == 0, dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    if mode == "train":  # the running statistics moved as in eager
        torch.testing.assert_close(model.bn.running_mean, eager_model.bn.running_mean)
        torch.testing.assert_close(model.stem[1].running_var, eager_model.stem[1].running_var)


# ----------------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gpu_every_op_compiles_fullgraph_without_breaks(backend, name):
    op = ops(torch.float16, large=True)[name]
    x = torch.randn(op.shape, device=DEVICE, dtype=torch.float16)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with fastnets.use_backend(backend):
        xe = x.clone().requires_grad_()
        expected = op.ours(xe)
        expected.float().sum().backward()
        xc = x.clone().requires_grad_()
        out = torch.compile(op.ours, fullgraph=True)(xc)
        out.float().sum().backward()
    assert _graph_breaks() == 0, dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=2e-3, atol=2e-3)


def _cuda_graph_replay(model, x):
    """Eager output, then the output of a CUDA graph of the same forward replayed on new input."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up: autotuning and lazy initialization happen outside the capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_x)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = model(fresh)
    return static_out.clone(), expected


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_resnet18_in_a_cuda_graph(backend):
    torch.manual_seed(0)
    model = fastnets.models.resnet18(num_classes=10).cuda().eval().half().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with fastnets.use_backend(backend):
        out, expected = _cuda_graph_replay(model, x)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_fused_stock_model_in_a_cuda_graph(backend):
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.LocalResponseNorm(5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    stock = stock.cuda().eval()
    fused = fastnets.fuse(stock)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with fastnets.use_backend(backend):
        out, expected = _cuda_graph_replay(fused, x)
    # the same kernels on the same input; the linear head's cuBLAS may pick another algorithm in
    # capture mode, hence a tolerance rather than bitwise equality (fuse() parity: tests/test_fuse.py)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
