"""The op cases: pooling, LRN, conv-bn-act (inference and training), batch-norm-act and attention
(forward and backward) at the shapes the family really uses, each against its stock baselines.

A case names its shapes (N is the run's op batch unless the case fixes it), builds its inputs,
runs the stock composite (`stock`) and the fastnets function (`fast`), and gives the fewest bytes
it must move and the FLOPs it must do (`cost`). Each case is timed as:
    eager      stock PyTorch ops, NCHW (the baseline every speedup is measured against)
    eager_cl   stock PyTorch ops, channels_last (4-D cases)
    compile    torch.compile of the stock composite, channels_last for 4-D cases
    <backend>, <backend>_cl   fastnets.functional under use_backend(backend), NCHW / channels_last
for each fastnets backend that runs here ("triton", "cuda", and "torch": the reference path, the
only one on a CPU). Before timing, every fastnets variant is checked once against stock eager in
the same layout (outputs and gradients; relative error) and under _dispatch.trace(), so that a
variant that ran on another backend than the one it names, or computed something else, is marked.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastnets.bench import harness, roofline

NCHW, CL = "nchw", "cl"
ACTS: dict[Any, Callable] = {
    "relu": lambda y: F.relu(y, inplace=True),  # torchvision's ReLU(inplace=True)
    "silu": lambda y: F.silu(y, inplace=True),
    None: lambda y: y,
}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if (layout == CL and t.dim() == 4) else t.contiguous()


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


@dataclasses.dataclass(frozen=True)
class Spec:
    """One variant of a case."""
    name: str
    label: str
    side: str                  # "stock" or "fastnets"
    layout: str
    backend: str | None = None  # fastnets backend
    compiled: bool = False


class OpCase:
    op = ""               # the fastnets.functional function
    family = ""           # the op family: its files are ops/<family>.py, kernels/<family>.py, ...
    mode = "fwd"          # "fwd", "fwd+bwd" (one training step of the op) or "bwd" (backward alone)
    dims = 4              # 4-D cases have NCHW and channels_last variants
    headline = torch.float16
    conv = False          # matrix rate under cuDNN's TF32 setting (convolutions) or matmul's
    compile_skip: str | None = None

    def __init__(self, name: str, desc: str, *, quick: bool = False, batch: int | None = None, **params):
        self.name, self.desc, self.quick, self.fixed_batch = name, desc, quick, batch
        self.p = params

    @property
    def layouts(self) -> tuple[str, ...]:
        return (NCHW, CL) if self.dims == 4 else (NCHW,)

    def batch(self, op_batch: int) -> int:
        return self.fixed_batch or op_batch

    # Subclasses define these. make: the inputs (fresh random values), with spatial sizes and
    # sequence lengths divided by `shrink` for smoke runs on a CPU.
    def make(self, device, dtype, n: int, layout: str, shrink: int = 1) -> dict: ...
    def stock(self, inp: dict): ...
    def fast(self, FF, inp: dict): ...
    def cost(self, inp: dict) -> tuple[int, int]: ...
    def grad_targets(self, inp: dict) -> list[torch.Tensor]: return []

    def finish(self, inp: dict) -> dict:
        """Adds the gradient of the output (training and backward cases)."""
        if self.mode != "fwd":
            with torch.no_grad():
                out = self.stock(_detached(inp))
            inp["gout"] = torch.randn_like(out)
        return inp


def _detached(inp: dict) -> dict:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _shrunk(v: int, shrink: int, lowest: int) -> int:
    """A spatial size or sequence length divided by `shrink` (smoke runs), never below `lowest`."""
    return v if shrink <= 1 else max(lowest, v // shrink)


def _randn(shape, device, dtype, layout=NCHW, scale=1.0, grad=False):
    t = _layout((torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype), layout)
    return t.requires_grad_(grad)


# ----------------------------------------------------------------------------------------------
# Pooling and LRN: memory-bound, FLOPs counted as 0.

class Pool(OpCase):
    family = "pool"

    def make(self, device, dtype, n, layout, shrink=1):
        c, h, w = self.p["chw"]
        lowest = self.p.get("kernel_size", 7)  # a window still fits; adaptive pools keep 7x7 or more
        h, w = _shrunk(h, shrink, lowest), _shrunk(w, shrink, lowest)
        return self.finish({"x": _randn((n, c, h, w), device, dtype, layout, grad=self.mode != "fwd")})

    def _args(self):
        p = dict(self.p)
        p.pop("chw")
        return p

    def stock(self, inp):
        return getattr(F, self.op)(inp["x"], **self._args())

    def fast(self, FF, inp):
        return getattr(FF, self.op)(inp["x"], **self._args())

    def grad_targets(self, inp):
        return [inp["x"]]

    def cost(self, inp):
        with torch.no_grad():
            out = self.stock(_detached(inp))
        fwd = _nbytes(inp["x"], out)
        return (2 * fwd if self.mode == "fwd+bwd" else fwd), 0


class LRN(OpCase):
    op, family = "local_response_norm", "lrn"

    def make(self, device, dtype, n, layout, shrink=1):
        c, h, w = self.p["chw"]
        h, w = _shrunk(h, shrink, 1), _shrunk(w, shrink, 1)
        return self.finish({"x": _randn((n, c, h, w), device, dtype, layout, grad=self.mode != "fwd")})

    def stock(self, inp):
        return F.local_response_norm(inp["x"], self.p["size"], self.p["alpha"], self.p["beta"], self.p["k"])

    def fast(self, FF, inp):
        return FF.local_response_norm(inp["x"], self.p["size"], self.p["alpha"], self.p["beta"], self.p["k"])

    def grad_targets(self, inp):
        return [inp["x"]]

    def cost(self, inp):
        x = inp["x"]
        # forward: x in, y out; backward: x and dy in, dx out
        return (_nbytes(x) * (2 if self.mode == "fwd" else 5)), 0


# ----------------------------------------------------------------------------------------------
# Convolution + batch-norm + activation (+ residual).

class ConvBNAct(OpCase):
    op, family, conv = "conv_bn_act", "conv", True

    def out_hw(self, h, w):
        k, s, pad, d = self.p["k"], self.p.get("stride", 1), self.p.get("padding", 0), self.p.get("dilation", 1)
        return (h + 2 * pad - d * (k - 1) - 1) // s + 1, (w + 2 * pad - d * (k - 1) - 1) // s + 1

    def make(self, device, dtype, n, layout, shrink=1):
        p, train = self.p, self.mode != "fwd"
        cin, cout, (h, w), k, g = p["cin"], p["cout"], p["hw"], p["k"], p.get("groups", 1)
        h, w = _shrunk(h, shrink, k + 1), _shrunk(w, shrink, k + 1)  # training: more than 1 value per channel
        oh, ow = self.out_hw(h, w)
        inp = {"x": _randn((n, cin, h, w), device, dtype, layout, grad=train),
               "w": _randn((cout, cin // g, k, k), device, dtype, layout, scale=(2.0 / (cin // g * k * k)) ** 0.5,
                           grad=train),  # He initialization: activations keep their scale
               "b": None if p.get("bn", True) else _randn((cout,), device, dtype, scale=0.1)}
        if p.get("bn", True):  # every parameter in the input's dtype, as in a model.half()
            inp.update(rm=_randn((cout,), device, dtype, scale=0.1),
                       rv=(torch.rand(cout, device=device) + 0.5).to(dtype),
                       bw=_randn((cout,), device, dtype, scale=0.2).add_(1).requires_grad_(train),
                       bb=_randn((cout,), device, dtype, scale=0.1, grad=train))
        if p.get("residual"):
            inp["r"] = _randn((n, cout, oh, ow), device, dtype, layout)
        return self.finish(inp)

    def _conv_kw(self):
        return dict(stride=self.p.get("stride", 1), padding=self.p.get("padding", 0),
                    dilation=self.p.get("dilation", 1), groups=self.p.get("groups", 1))

    def stock(self, inp):
        y = F.conv2d(inp["x"], inp["w"], inp["b"], **self._conv_kw())
        if "rm" in inp:
            y = F.batch_norm(y, inp["rm"], inp["rv"], inp["bw"], inp["bb"], self.mode != "fwd", 0.1, 1e-5)
        if "r" in inp:
            y = y.add_(inp["r"])  # torchvision's `out += identity`
        return ACTS[self.p.get("act", "relu")](y)

    def fast(self, FF, inp):
        return FF.conv_bn_act(inp["x"], inp["w"], inp["b"], inp.get("rm"), inp.get("rv"), inp.get("bw"),
                              inp.get("bb"), **self._conv_kw(), training=self.mode != "fwd", momentum=0.1,
                              eps=1e-5, activation=self.p.get("act", "relu"), residual=inp.get("r"))

    def grad_targets(self, inp):
        return [t for t in (inp["x"], inp["w"], inp.get("bw"), inp.get("bb")) if t is not None]

    def cost(self, inp):
        x, w = inp["x"], inp["w"]
        n, oh, ow, cout = x.shape[0], *self.out_hw(*x.shape[2:]), w.shape[0]
        flops = 2 * n * oh * ow * cout * w.shape[1] * w.shape[2] * w.shape[3]
        out = n * cout * oh * ow * x.element_size()
        fwd = _nbytes(x, w, inp["b"], inp.get("r")) + out
        if self.mode == "fwd":
            return fwd, flops
        # training: forward as above; backward reads dy, x, w and writes dx, dw (dgrad + wgrad)
        return fwd + out + 2 * _nbytes(x, w), 3 * flops


class BNAct(OpCase):
    op, family = "batch_norm_act", "norm_act"

    def make(self, device, dtype, n, layout, shrink=1):
        c, h, w = self.p["chw"]
        h, w = _shrunk(h, shrink, 2), _shrunk(w, shrink, 2)  # training needs more than 1 value per channel
        train = self.mode != "fwd"
        return self.finish({
            "x": _randn((n, c, h, w), device, dtype, layout, grad=train),
            "rm": _randn((c,), device, dtype, scale=0.1), "rv": (torch.rand(c, device=device) + 0.5).to(dtype),
            "bw": _randn((c,), device, dtype, scale=0.2).add_(1).requires_grad_(train),
            "bb": _randn((c,), device, dtype, scale=0.1, grad=train)})

    def stock(self, inp):
        y = F.batch_norm(inp["x"], inp["rm"], inp["rv"], inp["bw"], inp["bb"], self.mode != "fwd", 0.1, 1e-5)
        return ACTS[self.p.get("act", "relu")](y)

    def fast(self, FF, inp):
        return FF.batch_norm_act(inp["x"], inp["rm"], inp["rv"], inp["bw"], inp["bb"], training=self.mode != "fwd",
                                 momentum=0.1, eps=1e-5, activation=self.p.get("act", "relu"))

    def grad_targets(self, inp):
        return [inp["x"], inp["bw"], inp["bb"]]

    def cost(self, inp):
        x = _nbytes(inp["x"])
        # forward: x in, y out; training backward: x and dy in, dx out
        return (2 * x if self.mode == "fwd" else 5 * x), 0


# ----------------------------------------------------------------------------------------------
# Attention: (B, H, L, D) query, key and value, bf16 by default.

class Attention(OpCase):
    op, family, dims, headline = "scaled_dot_product_attention", "attention", 3, torch.bfloat16

    def make(self, device, dtype, n, layout, shrink=1):
        h, l, d = self.p["hld"]
        l = _shrunk(l, shrink, 16)
        train = self.mode != "fwd"
        return self.finish({k: _randn((n, h, l, d), device, dtype, grad=train) for k in ("q", "k", "v")})

    def stock(self, inp):
        return F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=self.p.get("causal", False))

    def fast(self, FF, inp):
        return FF.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=self.p.get("causal", False))

    def grad_targets(self, inp):
        return [inp["q"], inp["k"], inp["v"]]

    def cost(self, inp):
        b, h, l, d = inp["q"].shape
        fwd = 4 * b * h * l * l * d // (2 if self.p.get("causal") else 1)  # QK^T and PV, each 2*L*S*D
        qkvo = 4 * _nbytes(inp["q"])
        if self.mode == "fwd":
            return qkvo, fwd
        # backward alone (FlashAttention-2's count: 2.5x the forward's FLOPs): reads q, k, v, o, do,
        # writes dq, dk, dv
        return qkvo + 4 * _nbytes(inp["q"]), int(2.5 * fwd)

    compile_skip = "torch.compile keeps scaled_dot_product_attention as the same fused kernel"


def _case(cls, name, desc, *, mode="fwd", op=None, **kw):
    c = cls(name, desc, **kw)
    c.mode = mode
    if op:
        c.op = op
    return c


def _conv(name, desc, cin, cout, hw, k, **kw):
    return _case(ConvBNAct, name, desc, cin=cin, cout=cout, hw=(hw, hw), k=k, **kw)


def _pool(name, desc, op, chw, **kw):
    return _case(Pool, name, desc, op=op, chw=chw, **kw)


def _lrn(name, desc, chw, **kw):  # AlexNet's: size 5, alpha 1e-4, beta 0.75, k 2
    return _case(LRN, name, desc, chw=chw, size=5, alpha=1e-4, beta=0.75, k=2.0, **kw)


def _attn(name, desc, hld, **kw):
    return _case(Attention, name, desc, hld=hld, **kw)


# The cases, most important first (a time budget cuts from the end). Shapes are the layers'
# (torchvision's definitions); N is the run's op batch unless the case fixes `batch`.
CASES: list[OpCase] = [
    # conv-bn-act inference at ResNet-50's shapes (the 1.5x target: fp16, channels_last)
    _conv("conv_bn_act/resnet50.stem", "7x7/2 3->64, 224->112", 3, 64, 224, 7, stride=2, padding=3, quick=True),
    _conv("conv_bn_act/resnet50.layer1.conv1", "1x1 256->64, 56", 256, 64, 56, 1),
    _conv("conv_bn_act/resnet50.layer1.conv2", "3x3 64->64, 56", 64, 64, 56, 3, padding=1, quick=True),
    _conv("conv_bn_act/resnet50.layer1.conv3", "1x1 64->256 +residual, 56", 64, 256, 56, 1, residual=True, quick=True),
    _conv("conv_bn_act/resnet50.layer2.conv2", "3x3/2 128->128, 56->28", 128, 128, 56, 3, stride=2, padding=1),
    _conv("conv_bn_act/resnet50.layer3.conv2", "3x3 256->256, 14", 256, 256, 14, 3, padding=1),
    _conv("conv_bn_act/resnet50.layer4.conv3", "1x1 512->2048 +residual, 7", 512, 2048, 7, 1, residual=True),
    # pooling (target: >= 90% of the copy bandwidth at large sizes) and LRN (target: >= 10x stock)
    _pool("max_pool2d/vgg16.pool1", "2x2/2 on 64x224x224", "max_pool2d", (64, 224, 224), kernel_size=2, stride=2,
          quick=True),
    _pool("max_pool2d/resnet50.stem", "3x3/2 pad 1 on 64x112x112", "max_pool2d", (64, 112, 112), kernel_size=3,
          stride=2, padding=1, quick=True),
    _pool("adaptive_avg_pool2d/resnet50.head", "global, 2048x7x7", "adaptive_avg_pool2d", (2048, 7, 7),
          output_size=1, quick=True),
    _lrn("local_response_norm/alexnet.norm1", "size 5 on 96x55x55", (96, 55, 55), quick=True),
    _lrn("local_response_norm/alexnet.norm2", "size 5 on 256x27x27", (256, 27, 27)),
    # attention (target: forward >= torch's SDPA, bf16); FlashAttention's benchmark shapes (16k
    # tokens, d_model 2048) and ViT-B/16's
    _attn("sdpa/seq4k.d128", "B4 H16 L4096 D128", (16, 4096, 128), batch=4, quick=True),
    _attn("sdpa/seq4k.d128.causal", "B4 H16 L4096 D128 causal", (16, 4096, 128), batch=4, causal=True),
    _attn("sdpa/vit_b_16", "H12 L197 D64", (12, 197, 64), quick=True),
    _attn("sdpa.bwd/seq4k.d128", "backward, B4 H16 L4096 D128", (16, 4096, 128), mode="bwd", batch=4, quick=True),
    _attn("sdpa.bwd/seq4k.d128.causal", "backward, B4 H16 L4096 D128 causal", (16, 4096, 128), mode="bwd", batch=4,
          causal=True),
    _attn("sdpa/seq16k.d64.causal", "B1 H32 L16384 D64 causal", (32, 16384, 64), batch=1, causal=True),
    _attn("sdpa/seq1k.d64", "B16 H32 L1024 D64", (32, 1024, 64), batch=16),
    _attn("sdpa.bwd/vit_b_16", "backward, H12 L197 D64", (12, 197, 64), mode="bwd"),
    # conv-bn-act training (forward + backward of one block)
    _conv("conv_bn_act.train/resnet50.layer1.conv2", "training, 3x3 64->64, 56", 64, 64, 56, 3, padding=1,
          mode="fwd+bwd", quick=True),
    _conv("conv_bn_act.train/resnet50.layer1.conv3", "training, 1x1 64->256 +residual, 56", 64, 256, 56, 1,
          residual=True, mode="fwd+bwd"),
    # batch-norm-act (DenseNet's pre-activation, EfficientNet's BN + SiLU)
    _case(BNAct, "batch_norm_act/densenet121.block1", "relu, 256x56x56", chw=(256, 56, 56), quick=True),
    _case(BNAct, "batch_norm_act.train/densenet121.block1", "training, relu, 256x56x56", mode="fwd+bwd",
          chw=(256, 56, 56), quick=True),
    _case(BNAct, "batch_norm_act/efficientnet_b0.stage2", "silu, 96x112x112", chw=(96, 112, 112), act="silu"),
    # the rest of the family's convolutions
    _conv("conv_act/vgg16.conv1_2", "3x3 64->64 +bias, no BN, 224", 64, 64, 224, 3, padding=1, bn=False),
    _conv("conv_act/vgg16.conv5_1", "3x3 512->512 +bias, no BN, 14", 512, 512, 14, 3, padding=1, bn=False),
    _conv("conv_act/alexnet.conv1", "11x11/4 3->64 +bias, no BN, 224->55", 3, 64, 224, 11, stride=4, padding=2,
          bn=False),
    _conv("conv_bn_act/efficientnet_b0.dw3x3", "depthwise 3x3/2 96ch silu, 112->56", 96, 96, 112, 3, stride=2,
          padding=1, groups=96, act="silu", quick=True),
    _conv("conv_bn_act/efficientnet_b0.dw5x5", "depthwise 5x5 240ch silu, 28", 240, 240, 28, 5, padding=2,
          groups=240, act="silu"),
    _conv("conv_bn_act/efficientnet_b0.project", "1x1 240->40 no act +residual, 28", 240, 40, 28, 1, act=None,
          residual=True),
    _conv("conv_bn_act/googlenet.inception4a.branch2", "3x3 96->208, 14", 96, 208, 14, 3, padding=1),
    # the rest of the pooling the family uses, and the backward passes of pooling and LRN
    _pool("max_pool2d/alexnet.pool1", "3x3/2 on 64x55x55", "max_pool2d", (64, 55, 55), kernel_size=3, stride=2),
    _pool("avg_pool2d/densenet121.transition1", "2x2/2 on 128x56x56", "avg_pool2d", (128, 56, 56), kernel_size=2,
          stride=2),
    _pool("adaptive_avg_pool2d/alexnet.head@13", "13x13 -> 6x6 (windows overlap), 256ch", "adaptive_avg_pool2d",
          (256, 13, 13), output_size=(6, 6)),
    _pool("adaptive_max_pool2d/512x14->7", "14x14 -> 7x7, 512ch", "adaptive_max_pool2d", (512, 14, 14),
          output_size=(7, 7)),
    _pool("max_pool2d.train/resnet50.stem", "forward + backward, 3x3/2 pad 1 on 64x112x112", "max_pool2d",
          (64, 112, 112), kernel_size=3, stride=2, padding=1, mode="fwd+bwd"),
    _lrn("local_response_norm.train/alexnet.norm1", "forward + backward, size 5 on 96x55x55", (96, 55, 55),
         mode="fwd+bwd"),
]

FAMILIES = sorted({c.family for c in CASES})


def select(names: list[str] | None, quick: bool) -> list[OpCase]:
    """Cases by name, prefix or op/family name ("conv_bn_act", "pool", "sdpa/vit_b_16"); all of
    them for None or "all" (the quick subset under --quick)."""
    if not names or names == ["all"]:
        return [c for c in CASES if c.quick or not quick]
    chosen = []
    for want in names:
        hits = [c for c in CASES if c.name == want or c.name.startswith(want + "/") or c.name.startswith(want + ".")
                or c.op == want or c.family == want]
        if not hits:
            raise ValueError(f"--ops: no op case matches {want!r}; `--list` shows them")
        chosen += [c for c in hits if c not in chosen]
    return chosen


# ----------------------------------------------------------------------------------------------
# Variants, callables and the run.

def fastnets_function(op: str):
    """(the fastnets.functional function, None) or (None, why it is missing)."""
    import fastnets.functional as FF

    fn = getattr(FF, op, None)
    if fn is None:
        return None, f"fastnets.functional.{op} does not exist yet (its op family has not landed)"
    return fn, None


def _lname(case: OpCase, layout: str) -> tuple[str, str]:
    if case.dims != 4:
        return "", ""
    return ("_cl", " channels_last") if layout == CL else ("", " NCHW")


def specs(case: OpCase, device: torch.device, backends: dict[str, str | None],
          compile_on: bool) -> list[tuple[Spec, str | None]]:
    """Every variant of the case with the reason it cannot run here (None when it can).
    backends: each fastnets backend -> None when it runs here, else why not."""
    out = []
    for layout in case.layouts:
        suffix, lname = _lname(case, layout)
        out.append((Spec("eager" + suffix, "stock eager" + lname, "stock", layout), None))
    for backend, why in backends.items():
        for layout in case.layouts:
            if backend == "torch" and device.type == "cuda" and layout == NCHW and case.dims == 4:
                continue  # the reference path on a GPU: channels_last is enough to rank it
            suffix, lname = _lname(case, layout)
            label = ("fastnets reference" if backend == "torch" else f"fastnets {backend}") + lname
            out.append((Spec(backend + suffix, label, "fastnets", layout, backend), why))
    why = None if compile_on else "torch.compile is off in this run (--compile none, --quick, or the default on a CPU)"
    if case.mode == "bwd":
        why = why or "backward-only case: torch.compile compiles a whole step, not a backward alone"
    why = why or case.compile_skip
    layout = CL if case.dims == 4 else NCHW
    out.append((Spec("compile", "torch.compile (stock" + (", channels_last)" if case.dims == 4 else ")"),
                     "stock", layout, compiled=True), why))
    return out


def _runner(case: OpCase, fn: Callable[[dict], Any], inp: dict) -> Callable[[], Any]:
    """The zero-argument call that is timed, on one input set."""
    if case.mode == "fwd":
        return lambda: fn(inp)
    targets = case.grad_targets(inp)
    if case.mode == "fwd+bwd":
        def step():
            out = fn(inp)
            return (out, *torch.autograd.grad(out, targets, inp["gout"]))
        return step
    out = fn(inp)  # "bwd": the forward runs once here, the backward is what is timed

    def backward():
        return torch.autograd.grad(out, targets, inp["gout"], retain_graph=True)
    return backward


def _function(case: OpCase, spec: Spec) -> Callable[[dict], Any]:
    if spec.side == "stock":
        if spec.compiled:
            torch._dynamo.reset()  # a fresh compile per case: no recompile limit can fall back to eager
            return torch.compile(case.stock)
        return case.stock
    fn, why = fastnets_function(case.op)
    if fn is None:
        raise harness.Skip(why)
    import fastnets.functional as FF

    return lambda inp: case.fast(FF, inp)


@contextlib.contextmanager
def _backend(spec: Spec):
    """use_backend(spec.backend) for a fastnets variant; nothing for a stock one."""
    if spec.backend is None:
        yield
        return
    from fastnets import use_backend

    with use_backend(spec.backend):
        yield


@contextlib.contextmanager
def _dispatch_keys():
    """The op keys the fastnets ops pass to _dispatch.choose inside the block (the keys of the
    `auto` tables in fastnets/_measured.py), recorded by wrapping choose for the duration."""
    from fastnets import _dispatch

    keys: list[str] = []
    original = _dispatch.choose

    def recording(op, *args, **kwargs):
        keys.append(op)
        return original(op, *args, **kwargs)

    _dispatch.choose = recording
    try:
        yield keys
    finally:
        _dispatch.choose = original


def _check(case: OpCase, spec: Spec, fn, inp: dict, refs: dict, dtype: torch.dtype, info: dict | None = None) -> str:
    """Runs a fastnets variant once against stock eager in the same layout: the result (output and
    gradients) and the backends that ran (every recorded launch must be the variant's backend).
    info, when given, receives the dispatch keys the op used ("dispatch_ops")."""
    from fastnets import _dispatch

    if spec.layout not in refs:
        refs[spec.layout] = _runner(case, case.stock, inp)()
    with _dispatch.trace() as launched, _dispatch_keys() as keys:
        out = _runner(case, fn, inp)()
    if info is not None and keys:
        info["dispatch_ops"] = sorted(set(info.get("dispatch_ops", [])) | set(keys))
    ran = sorted({b for _, b in launched})
    if ran != [spec.backend]:
        return f"MISMATCH: ran on {', '.join(ran) or 'nothing that fastnets records'}, not {spec.backend}"
    return harness.check_text(harness.relative_error(out, refs[spec.layout]), dtype)


@dataclasses.dataclass
class Settings:
    """What an op run needs besides the cases."""
    dtypes: list[torch.dtype] | None     # None: each case's headline dtype (fp32 on a CPU)
    batch: int                           # N of the cases that do not fix it
    backends: dict[str, str | None]      # fastnets backend -> None or why it cannot run here
    compile_on: bool
    ceilings: roofline.Ceilings | None
    quick: bool = False
    shrink: int = 1

    def dtypes_of(self, case: OpCase, device: torch.device) -> list[torch.dtype]:
        return self.dtypes or [case.headline if device.type == "cuda" else torch.float32]


# What one torch.compile of an op case is expected to take: none is started with less time left.
COMPILE_RESERVE_S = 20.0


def run(session: harness.Session, cases: list[OpCase], st: Settings, share: float = 1.0) -> None:
    """Times every case: first every variant but torch.compile, then the compile baselines while
    the budget lasts (a compile costs far more than a timing). share: the fraction of the
    session's budget the op cases may use."""
    compiles = []
    for case in cases:
        for dtype in st.dtypes_of(case, session.device):
            todo = specs(case, session.device, st.backends, st.compile_on)
            if session.budget.exhausted(share):
                session.skip(f"{case.name} {roofline.DTYPE_NAMES[dtype]}", "the run's time budget was spent (--budget)")
                continue
            _run_case(session, case, dtype, [s for s in todo if not s[0].compiled], st)
            session.case_done()
            compiles += [(case, dtype, s) for s in todo if s[0].compiled]
    for case, dtype, (spec, why) in compiles:
        if why is None and session.budget.exhausted(share, reserve=COMPILE_RESERVE_S):
            why = "the run's time budget was spent before this compile baseline (--budget)"
        _run_case(session, case, dtype, [(spec, why)], st)
        session.case_done()


def _run_case(session: harness.Session, case: OpCase, dtype: torch.dtype, todo, st: Settings) -> None:
    device = session.device
    n = case.batch(st.batch)
    cname = f"{case.name} {roofline.DTYPE_NAMES[dtype]}"
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) if device.type == "cuda" else None
    inputs: dict[str, list[dict]] = {}
    refs: dict[str, Any] = {}
    info = session.cases.setdefault(cname, {
        "op": case.op, "family": case.family, "mode": case.mode, "desc": case.desc,
        "dtype": roofline.DTYPE_NAMES[dtype], "batch": n, "shrink": st.shrink})

    def input_sets(layout: str) -> list[dict]:
        if layout not in inputs:
            first = case.make(device, dtype, n, layout, st.shrink)
            count = harness.rotation_count(_nbytes(*first.values()), l2)
            inputs[layout] = [first] + [case.make(device, dtype, n, layout, st.shrink) for _ in range(count - 1)]
        return inputs[layout]

    for spec, why in todo:
        m = harness.Measurement("op", cname, spec.name, spec.label, spec.side, baseline="eager")
        if why is None and session.gpu_lost:
            why = f"the CUDA context was lost earlier ({session.gpu_lost})"
        if why is not None:
            m.status, m.reason = "skipped", why
            session.add(m)
            continue
        try:
            with _backend(spec):
                fn = _function(case, spec)
                sets = input_sets(spec.layout)
                if spec.side == "fastnets":
                    m.check = _check(case, spec, fn, sets[0], refs, dtype, info)
                calls = [_runner(case, fn, s) for s in sets]
            nbytes, flops = case.cost(sets[0])
            info.update(bytes=nbytes, flops=flops)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a result
            m.status, m.reason = _failure(session, exc)
            session.add(m)
            continue
        timed = harness.rotating(lambda call: call(), calls)

        def measure(spec=spec, timed=timed):
            with _backend(spec):
                if device.type == "cuda":
                    return harness.time_gpu(timed, rep_ms=20 if st.quick else 40)
                return harness.time_cpu(timed, target_s=0.2 if st.quick else 1.0, max_reps=50 if st.quick else 200)

        def after(t, m=m, nbytes=nbytes, flops=flops):
            seconds = t.median_ms * 1e-3
            m.gbps = nbytes / seconds / 1e9
            m.tflops = flops / seconds / 1e12 if flops else None
            if st.ceilings is not None:
                floor, _ = roofline.floor_ms(nbytes, flops, st.ceilings, roofline.matrix_rate_name(dtype, case.conv))
                m.roofline_fraction = floor / t.median_ms

        session.run(m, measure, after)
        del calls, timed
    inputs.clear()
    refs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure(session: harness.Session, exc: Exception) -> tuple[str, str]:
    """(status, reason) of a variant that raised: "skipped" when it says it cannot run here."""
    from fastnets import BackendError

    if isinstance(exc, (harness.Skip, BackendError)):
        return "skipped", str(exc)
    return "error", session.guard(exc)


def build(case: OpCase, variant: str, device: torch.device, dtype: torch.dtype, batch: int,
          backends: dict[str, str | None], shrink: int = 1) -> tuple[Callable[[], Any], tuple[int, int]]:
    """The timed call of one (case, variant) for the pytest-benchmark suite, and the case's bytes
    and FLOPs; raises harness.Skip with the reason when it cannot run here. A fastnets variant is
    checked against stock first (AssertionError on a mismatch: a wrong result is not worth timing)."""
    found = {s.name: (s, why) for s, why in specs(case, device, backends, compile_on=True)}
    if variant not in found:
        raise harness.Skip(f"{case.name} has no {variant!r} variant")
    spec, why = found[variant]
    if why:
        raise harness.Skip(why)
    try:
        with _backend(spec):
            fn = _function(case, spec)
            inp = case.make(device, dtype, case.batch(batch), spec.layout, shrink)
            if spec.side == "fastnets":
                text = _check(case, spec, fn, inp, {}, dtype)
                assert text.startswith("ok"), f"{case.name} {variant}: {text}"
            call = _runner(case, fn, inp)
    except Exception as exc:
        from fastnets import BackendError

        if isinstance(exc, BackendError):
            raise harness.Skip(str(exc)) from exc
        raise

    def timed():
        with _backend(spec):
            out = call()
        harness.sync(device)
        return out
    return timed, case.cost(inp)


def variant_names(case: OpCase) -> list[str]:
    """Every variant name a case can have (for parametrizing the pytest-benchmark suite)."""
    cpu = torch.device("cpu")
    return [s.name for s, _ in specs(case, cpu, {"triton": None, "cuda": None, "torch": None}, True)]
