"""Batch-norm + residual + activation (fastnets/ops/norm_act.py, nn/norm_act.py): batch_norm_act and
batch_norm_act_train against F.batch_norm + residual + activation in float64 (forward, every
gradient, the running statistics), 2-D to 5-D inputs, every layout, dtype and activation, with and
without residual / affine parameters / running statistics, awkward sizes, given vs computed batch
statistics, numerically hard statistics, determinism; the BatchNormAct2d module against
nn.BatchNorm2d (training steps, momentum=None, eval, track_running_stats=False, state_dict both
ways); bad input; NaN/Inf; opcheck and torch.compile; real sizes on a GPU."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets import _dispatch
from fastnets import functional as FF
from fastnets import nn as fnn
from fastnets.ops import norm_act as NA
import parity
from parity import DEVICE, DTYPES, GPU, KERNEL_BACKENDS

ACTS = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid, None: lambda t: t}


def stock_fn(x, rm, rv, w, b, training, momentum, eps, act, r):
    """The stock composition this family fuses."""
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if r is not None:
        y = y + r
    return ACTS[act](y)


def _clone(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype, copy=True)


def check(shape, backend, dtype=torch.float32, layout="contiguous", act="relu", training=True, residual=True,
          affine=(True, True), running=True, pdtype=torch.float32, momentum=0.1, eps=1e-5, r_shape=None,
          r_layout=None, x=None, given_stats=False):
    """Runs ours under `backend` against the float64 reference and stock PyTorch in `dtype`:
    output, every gradient, the running statistics. Returns (output, running_mean, running_var)."""
    C = shape[1]
    x = parity.rand(*shape, dtype=dtype, layout=layout) if x is None else x
    x.requires_grad_()
    r = None
    if residual:
        r = parity.rand(*(r_shape or shape), dtype=dtype, layout=r_layout or layout, requires_grad=True)
    w = (1 + 0.5 * parity.rand(C, dtype=pdtype)).requires_grad_() if affine[0] else None
    b = parity.rand(C, dtype=pdtype, requires_grad=True) if affine[1] else None
    rm = 0.1 * parity.rand(C, dtype=pdtype) if running else None
    rv = (0.5 + torch.rand(C, device=DEVICE)).to(pdtype) if running else None
    leaves = [t for t in (x, r, w, b) if t is not None]
    names = [n for n, t in (("grad input", x), ("grad residual", r), ("grad weight", w), ("grad bias", b))
             if t is not None]

    up = [parity.upcast(t) for t in (x, r, w, b)]
    rm64, rv64 = _clone(rm, torch.float64), _clone(rv, torch.float64)
    ref = stock_fn(up[0], rm64, rv64, up[2], up[3], training, momentum, eps, act, up[1])
    rm_s, rv_s = _clone(rm), _clone(rv)
    stock = stock_fn(x, rm_s, rv_s, w, b, training, momentum, eps, act, r)
    g = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    ref_g = torch.autograd.grad(ref, [t for t in up if t is not None], g)
    stock_g = torch.autograd.grad(stock, leaves, g.to(dtype))

    rm_o, rv_o = _clone(rm), _clone(rv)
    with parity.ran_on(backend, "norm_act") as launches:
        if given_stats:
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
            out = NA.batch_norm_act_train(x, rm_o, rv_o, w, b, momentum, eps, act, r, batch_mean=mean, batch_var=var)
        else:
            out = FF.batch_norm_act(x, rm_o, rv_o, w, b, training, momentum, eps, act, r)
        out_g = torch.autograd.grad(out, leaves, g.to(dtype))
    ops = {op for op, _ in launches}
    assert ("norm_act_stats" in ops) == (training and not given_stats)
    assert ("norm_act_stats_given" in ops) == given_stats
    assert "norm_act" in ops and "norm_act_backward" in ops

    parity.assert_parity(out, ref, stock, "output")
    if x.dim() == 4 and layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    for o, rf, st, name in zip(out_g, ref_g, stock_g, names):
        parity.assert_parity(o, rf, st, name)
    if running:
        parity.assert_parity(rm_o, rm64, rm_s, "running_mean")
        parity.assert_parity(rv_o, rv64, rv_s, "running_var")
        if not training:
            assert torch.equal(rm_o, rm) and torch.equal(rv_o, rv)
    return out, rm_o, rv_o


RANK_SHAPES = [(7, 3), (2, 3, 13), (2, 3, 5, 7), (2, 3, 3, 2, 5)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", parity.LAYOUTS)
@pytest.mark.parametrize("shape", RANK_SHAPES, ids=lambda s: f"{len(s)}d")
def test_ranks_and_layouts(backend, layout, shape):
    check(shape, backend, layout=layout)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", list(ACTS))
def test_activations(backend, training, act):
    check((3, 5, 4, 3), backend, layout="channels_last", act=act, training=training)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, training, layout, dtype):
    # float32 parameters and running statistics: mixed precision, as under autocast
    check((3, 6, 5, 7), backend, dtype=dtype, layout=layout, training=training, act="silu")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 4), (2, 5, 17), (2, 3, 2, 3, 5)], ids=lambda s: f"{len(s)}d")
def test_half_dtypes_other_ranks(backend, dtype, shape):
    check(shape, backend, dtype=dtype, layout="noncontiguous", act="gelu")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_parameters_in_input_dtype(backend, dtype):
    # model.half(): weight, bias and running statistics in the input's dtype (updated in it)
    check((4, 3, 3, 5), backend, dtype=dtype, pdtype=dtype, layout="noncontiguous")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["no_residual", "no_affine", "weight_only", "bias_only", "no_running",
                                  "no_running_no_affine", "residual_broadcast", "residual_other_layout"])
def test_optional_arguments(backend, case):
    kw = {"no_residual": dict(residual=False), "no_affine": dict(affine=(False, False)),
          "weight_only": dict(affine=(True, False)), "bias_only": dict(affine=(False, True), act="gelu"),
          "no_running": dict(running=False), "no_running_no_affine": dict(running=False, affine=(False, False)),
          "residual_broadcast": dict(r_shape=(1, 4, 1, 5)),
          "residual_other_layout": dict(r_layout="contiguous", layout="channels_last")}[case]
    check((3, 4, 3, 5), backend, **kw)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eval_without_affine_or_residual(backend):
    check((2, 5, 3, 3), backend, training=False, affine=(False, False), residual=False, act=None)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,layout", [
    ((4, 1, 3, 5), "contiguous"),        # C = 1
    ((2, 1, 7), "noncontiguous"),        # C = 1, strided
    ((1, 3, 7, 11), "contiguous"),       # N = 1 with spatial > 1
    ((1, 3, 7, 11), "channels_last"),
    ((2, 1), "contiguous"),              # the fewest values training accepts
    ((5, 3, 37, 41), "contiguous"),      # several tiles per image: multi-item partials, chunked merge
    ((5, 3, 37, 41), "channels_last"),
    ((3, 130, 3, 1), "channels_last"),   # more channels than one channel block
    ((2, 7, 1, 1), "contiguous"),        # 1x1 spatial
])
def test_awkward_sizes(backend, shape, layout):
    check(shape, backend, layout=layout)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_3d(backend, training):
    x = parity.rand(2, 3, 3, 2, 5).contiguous(memory_format=torch.channels_last_3d)
    out, _, _ = check(tuple(x.shape), backend, x=x, training=training, act="silu")
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_given_batch_statistics(backend, dtype, layout):
    """batch_norm_act_train with the statistics given (as the fused convolution's epilogue computes
    them): no statistics pass, the same running-stat update, the full training backward."""
    check((3, 4, 5, 3), backend, dtype=dtype, layout=layout, given_stats=True, act="relu6")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_given_vs_computed_statistics_agree(backend, layout):
    x = parity.rand(4, 3, 6, 5, layout=layout)
    w, b = 1 + 0.5 * parity.rand(3), parity.rand(3)
    var, mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    results = []
    for given in (False, True):
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        xi = x.detach().clone().requires_grad_()
        with parity.ran_on(backend, "norm_act"):
            y = NA.batch_norm_act_train(xi, rm, rv, w, b, 0.1, 1e-5, "relu", None,
                                        *((mean, var) if given else (None, None)))
            (gx,) = torch.autograd.grad(y, xi, torch.ones_like(y))
        results.append((y, gx, rm, rv))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_statistics_numerically_stable(backend, layout):
    """A large mean against a unit spread: E[x^2] - E[x]^2 in float32 would lose the variance
    (x^2 ~ 1e6 has an ulp of 0.06); the two-level Welford/Chan merge must keep it."""
    x = (1e3 + parity.rand(6, 2, 29, 31)).to(DEVICE)
    x = parity.to_layout(x, layout)
    check(tuple(x.shape), backend, layout=layout, x=x, residual=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend):
    x = parity.rand(4, 5, 9, 7, requires_grad=True)
    w = (1 + parity.rand(5)).requires_grad_()
    outs = []
    for _ in range(2):
        rm, rv = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
        with parity.ran_on(backend, "norm_act"):
            y = FF.batch_norm_act(x, rm, rv, w, None, True, activation="silu")
            grads = torch.autograd.grad(y, [x, w], torch.ones_like(y))
        outs.append([y, *grads, rm, rv])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_weight_grad_only(backend):
    """Gradients of the parameters without the input's (a frozen input): the reduction pass runs,
    the elementwise pass does not."""
    x = parity.rand(3, 4, 5, 2)
    w, b = (1 + parity.rand(4)).requires_grad_(), parity.rand(4, requires_grad=True)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    w64, b64 = parity.upcast(w), parity.upcast(b)
    for training in (True, False):
        ref = stock_fn(x.double(), rm.double(), rv.double(), w64, b64, training, 0.1, 1e-5, "relu", None)
        ref_g = torch.autograd.grad(ref, [w64, b64], torch.ones_like(ref))
        stock = stock_fn(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, "relu", None)
        stock_g = torch.autograd.grad(stock, [w, b], torch.ones_like(stock))
        with parity.ran_on(backend, "norm_act"):
            y = FF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training)
            out_g = torch.autograd.grad(y, [w, b], torch.ones_like(y))
        for o, rf, st in zip(out_g, ref_g, stock_g):
            parity.assert_parity(o, rf, st, "grad weight/bias")


# ----------------------------------------------------------------------------------------------
# The module.

def _pair(**kw):
    ours = fnn.BatchNormAct2d(5, activation=kw.pop("activation", "relu"), **kw).to(DEVICE)
    stock = nn.BatchNorm2d(5, **kw).to(DEVICE)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(1 + 0.5 * torch.randn(5))
            ours.bias.copy_(torch.randn(5))
    stock.load_state_dict(ours.state_dict())
    return ours, stock


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                dict(activation="silu", momentum=0.3)],
                         ids=["default", "momentum_none", "no_affine", "no_tracking", "silu"])
def test_module_matches_batchnorm2d(backend, kw):
    """Three training steps (with a residual) and an eval step: output, input and parameter
    gradients, running statistics and num_batches_tracked, against nn.BatchNorm2d + residual +
    activation in float64 (and in float32 for the tolerance)."""
    act = kw.get("activation", "relu")
    ours, stock = _pair(**kw)
    ref = copy.deepcopy(stock).double()

    def run(x, r, g):
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        with parity.ran_on(backend, "norm_act"):
            y = ours(xs[0], r)
            y.backward(g)
        ys = ACTS[act](stock(xs[1]) + r)
        ys.backward(g)
        yr = ACTS[act](ref(xs[2]) + r.double())
        yr.backward(g.double())
        parity.assert_parity(y, yr, ys, "output")
        parity.assert_parity(xs[0].grad, xs[2].grad, xs[1].grad, "grad input")
        if ours.weight is not None:
            parity.assert_parity(ours.weight.grad, ref.weight.grad, stock.weight.grad, "grad weight")
            parity.assert_parity(ours.bias.grad, ref.bias.grad, stock.bias.grad, "grad bias")
        o, st, rf = ours.state_dict(), stock.state_dict(), ref.state_dict()
        assert list(o) == list(st)
        for name in o:
            if o[name].is_floating_point():
                parity.assert_parity(o[name], rf[name], st[name], name)
            else:
                assert torch.equal(o[name], st[name]), name

    for step in range(3):
        x = parity.rand(2, 5, 3, 4, layout="channels_last" if step % 2 else "contiguous")
        run(x, parity.rand(2, 5, 3, 4), torch.randn(2, 5, 3, 4, device=DEVICE))
    for m in (ours, stock, ref):
        m.eval()
    run(parity.rand(3, 5, 2, 3), parity.rand(3, 5, 2, 3), torch.randn(3, 5, 2, 3, device=DEVICE))


def test_module_state_dict_both_ways():
    stock = nn.BatchNorm2d(6)
    with torch.no_grad():
        stock.running_mean.normal_()
        stock.weight.normal_()
    stock.num_batches_tracked.fill_(7)
    ours = fnn.BatchNormAct2d(6, activation="gelu")
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    for k, v in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())
    assert int(back.num_batches_tracked) == 7
    assert "activation='gelu'" in repr(ours)
    assert list(fnn.BatchNormAct2d(6, affine=False, track_running_stats=False).state_dict()) == []


def test_module_bad_input():
    m = fnn.BatchNormAct2d(3)
    parity.assert_raises_like(lambda: m(torch.randn(3, 4, 4)), lambda: nn.BatchNorm2d(3)(torch.randn(3, 4, 4)),
                              match="expected 4D input")
    parity.assert_raises_like(lambda: m(torch.randn(2, 4, 4, 4)), lambda: nn.BatchNorm2d(3)(torch.randn(2, 4, 4, 4)))
    parity.assert_raises_like(lambda: m(torch.randn(1, 3, 1, 1)), lambda: nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),
                              match="more than 1 value per channel")
    with pytest.raises(ValueError, match="activation must be one of"):
        fnn.BatchNormAct2d(3, activation="tanhh")


# ----------------------------------------------------------------------------------------------
# Bad input, NaN/Inf, backends.

def _args(C=3, shape=(2, 3, 4, 4)):
    return torch.randn(*shape), torch.zeros(C), torch.ones(C), torch.ones(C), torch.zeros(C)


@pytest.mark.parametrize("case", ["weight_len", "bias_len", "rm_len", "rv_len", "rank1", "rank0", "one_value",
                                  "one_value_4d", "eval_no_rm", "eval_no_rv", "train_only_rm", "weight_type",
                                  "int_input", "param_dtype", "param_mixed", "eps_negative", "momentum_none",
                                  "residual_shape"])
def test_bad_input_like_torch(case):
    x, rm, rv, w, b = _args()
    args = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True)
    r = None
    if case == "weight_len":
        args["weight"] = torch.ones(4)
    elif case == "bias_len":
        args["bias"] = torch.ones(2)
    elif case == "rm_len":
        args["running_mean"] = torch.zeros(4)
    elif case == "rv_len":
        args.update(running_var=torch.ones(2), training=False)
    elif case == "rank1":
        args["input"] = torch.randn(3)
    elif case == "rank0":  # (in training torch fails earlier, indexing the missing batch dim)
        args.update(input=torch.randn(()), training=False)
    elif case == "one_value":
        args["input"] = torch.randn(1, 3)
    elif case == "one_value_4d":
        args["input"] = torch.randn(1, 3, 1, 1)
    elif case == "eval_no_rm":
        args.update(running_mean=None, training=False)
    elif case == "eval_no_rv":
        args.update(running_var=None, training=False)
    elif case == "train_only_rm":
        args["running_var"] = None
    elif case == "weight_type":
        args["weight"] = 3.0
    elif case == "int_input":
        args["input"] = x.int()
    elif case == "param_dtype":  # float32 input, float16 parameters
        args.update(weight=w.half(), bias=b.half(), running_mean=rm.half(), running_var=rv.half())
    elif case == "param_mixed":  # float16 input: float16 weight with float32 running statistics
        args.update(input=x.half(), weight=w.half(), bias=b.half())
    elif case == "eps_negative":
        args["eps"] = -1.0
    elif case == "momentum_none":
        args["momentum"] = None
    elif case == "residual_shape":
        r = torch.randn(2, 3, 4, 5)

    def stock():
        return stock_fn(args["input"], args["running_mean"], args["running_var"], args["weight"], args["bias"],
                        args["training"], args.get("momentum", 0.1), args.get("eps", 1e-5), "relu", r)

    parity.assert_raises_like(lambda: FF.batch_norm_act(**args, residual=r), stock)


def test_bad_input_without_torch_counterpart():
    x, rm, rv, w, b = _args()
    with pytest.raises(ValueError, match="activation must be one of"):
        FF.batch_norm_act(x, rm, rv, w, b, activation="tanhh")
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        FF.batch_norm_act(x, rm, rv, w, b, residual=torch.randn(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="would broadcast the output"):
        FF.batch_norm_act(x, rm, rv, w, b, residual=torch.randn(3, 2, 3, 4, 4))
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        FF.batch_norm_act(x, rm, rv, w, b, residual=1.0)
    with pytest.raises(ValueError, match="batch_mean and batch_var"):
        NA.batch_norm_act_train(x, rm, rv, w, b, 0.1, 1e-5, "relu", None, batch_mean=torch.zeros(3))
    with pytest.raises(RuntimeError, match="batch_var should contain 3 elements"):
        NA.batch_norm_act_train(x, rm, rv, w, b, 0.1, 1e-5, "relu", None, torch.zeros(3), torch.ones(4))
    with pytest.raises(RuntimeError, match="batch_mean must be torch.float32"):
        NA.batch_norm_act_train(x, rm, rv, w, b, 0.1, 1e-5, "relu", None, torch.zeros(3).half(), torch.ones(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        NA.batch_norm_act_train(torch.randn(1, 3), rm, rv, w, b, 0.1, 1e-5, "relu", None)
    with pytest.raises(_dispatch.BackendError, match="float64"):
        with fastnets.use_backend("triton"):
            FF.batch_norm_act(x.double(), rm.double(), rv.double())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on Inf
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_inf_propagate_as_torch(backend, training, value):
    x = parity.rand(3, 4, 5, 3)
    x[1, 2, 3, 1] = value
    x[0, 0, 0, 0] = -value if value != value else value  # NaN, or -Inf beside +Inf in another channel
    C = 4
    w, b = 1 + 0.5 * parity.rand(C), parity.rand(C)
    rm, rv = 0.1 * parity.rand(C), 0.5 + torch.rand(C, device=DEVICE)
    x64 = x.double().requires_grad_()
    rm64, rv64 = rm.double(), rv.double()
    ref = stock_fn(x64, rm64, rv64, w.double(), b.double(), training, 0.1, 1e-5, "relu", None)
    rm_s, rv_s = rm.clone(), rv.clone()
    xs = x.clone().requires_grad_()
    stock = stock_fn(xs, rm_s, rv_s, w, b, training, 0.1, 1e-5, "relu", None)
    rm_o, rv_o = rm.clone(), rv.clone()
    xo = x.clone().requires_grad_()
    with parity.ran_on(backend, "norm_act"):
        out = FF.batch_norm_act(xo, rm_o, rv_o, w, b, training, 0.1, 1e-5, "relu")
    parity.assert_parity(out, ref, stock, "output")
    parity.assert_parity(rv_o, rv64, rv_s, "running_var")
    # The running mean of a channel holding +-Inf is Inf in torch's CPU batch-norm (a sum) and may be
    # NaN in its CUDA one (Welford's update: Inf - Inf); so is it in ours (Triton: Inf; CUDA C++:
    # Inf or NaN, by the order a thread meets the values). Required: non-finite exactly there.
    finite = torch.isfinite(rm64)
    assert torch.equal(torch.isfinite(rm_o), finite)
    parity.assert_parity(rm_o[finite], rm64[finite], rm_s[finite], "running_mean")
    if training:  # every gradient of the channels with a non-finite value is NaN, as torch's
        g = torch.randn_like(x)
        (ref_g,) = torch.autograd.grad(ref, x64, g.double())
        (stock_g,) = torch.autograd.grad(stock, xs, g)
        with parity.ran_on(backend, "norm_act"):
            (out_g,) = torch.autograd.grad(out, xo, g)
        parity.assert_parity(out_g, ref_g, stock_g, "grad input")


def test_float64_and_cpu_auto_run_the_reference():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with _dispatch.trace() as launches:
        y = FF.batch_norm_act(x, rm, rv, training=True, activation="gelu", residual=x.detach())
    assert {b for _, b in launches} == {"torch"}
    rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
    ref = F.gelu(F.batch_norm(x, rm2, rv2, training=True) + x.detach())
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    (g,), (g2,) = torch.autograd.grad(y, x, torch.ones_like(y)), torch.autograd.grad(ref, x, torch.ones_like(ref))
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("training", [True, False])
def test_empty_input(training):
    x = torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    w = torch.ones(3, device=DEVICE, requires_grad=True)
    y = FF.batch_norm_act(x, rm, rv, w, None, training)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(3, device=DEVICE))
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))


# ----------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile (through the reference on the CPU; the interpreter cannot
# run fake tensors), the kernels' registrations on a GPU.

def _op_samples(device):
    x = torch.randn(3, 4, 5, 2, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    r = torch.randn(3, 4, 5, 2, device=device)
    mean, var = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    return x, w, b, r, mean, var


def _opcheck(backend, device):
    x, w, b, r, mean, var = _op_samples(device)
    xg = x.clone().requires_grad_()
    torch.library.opcheck(NA.ops[backend], (xg, mean, var, w, b, r, 1e-5, 3, True))
    torch.library.opcheck(NA.ops[backend], (xg, mean, var, None, None, None, 1e-5, 0, False))
    torch.library.opcheck(NA.stats_ops[backend], (x, torch.zeros(4, device=device), torch.ones(4, device=device),
                                                   None, None, 0.1))
    torch.library.opcheck(NA.stats_ops[backend], (x, None, None, mean, var, 0.1))
    g = torch.randn_like(x)
    torch.library.opcheck(NA.backward_ops[backend], (g, x, mean, var, w.detach(), b.detach(), r, 1e-5, 1, True,
                                                      True, True, True))


def _compile_check(backend, device, compile_backend):
    def f(x, rm, rv, w, b, r):
        return FF.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, "relu", r)

    x, w, b, r, _, _ = _op_samples(device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    xg, xg2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastnets.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
        y = compiled(xg, rm, rv, w, b, r)
        (gx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
        y2 = f(xg2, rm2, rv2, w, b, r)
        (gx2,) = torch.autograd.grad(y2, xg2, torch.ones_like(y2))
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_opcheck_reference():
    _opcheck("torch", DEVICE)


def test_compile_reference():
    torch._dynamo.reset()
    _compile_check("torch", DEVICE, "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_kernels_gpu(backend):
    _opcheck(backend, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_kernels_gpu(backend):
    torch._dynamo.reset()
    _compile_check(backend, DEVICE, "inductor")


def _extension_with_norm_act():
    from fastnets import _ext

    mod, _ = _ext.load()
    return mod if mod is not None and hasattr(mod, "norm_act_forward") else None


@pytest.mark.skipif(GPU or _extension_with_norm_act() is None,
                    reason="needs fastnets._C built with norm_act, on a machine without a GPU")
def test_cuda_glue_reaches_the_launch_cpu(monkeypatch):
    """Without a GPU the CUDA C++ kernels cannot run, but everything before the launch can: the
    Python side's arguments against the pybind11 signatures, and the C++ checks (dims, strides,
    partition). Each call must get as far as the kernel launch, which fails for want of a device."""
    import contextlib
    import types

    from fastnets import _ext

    monkeypatch.setattr(_ext, "stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    x = torch.randn(4, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    r, g = torch.randn(4, 6, 5, 7), torch.randn(4, 6, 5, 7)
    w, b, m, v = torch.randn(6), torch.randn(6), torch.randn(6), torch.rand(6) + 0.5
    calls = [
        lambda: NA._cuda_stats(x, torch.zeros(6), torch.ones(6), None, None, 0.1),
        lambda: NA._cuda_stats(x[:, :, ::2], None, None, None, None, 0.1),
        lambda: NA._cuda_stats(x.half(), torch.zeros(6).half(), torch.ones(6).half(), m, v, 0.1),
        lambda: NA._cuda_fwd(x, m, v, w, b, r, 1e-5, 3, True),
        lambda: NA._cuda_fwd(x.bfloat16(), m, v, None, None, None, 1e-5, 0, False),
        lambda: NA._cuda_bwd(g, x, m, v, w, b, r, 1e-5, 1, True, True, True, True),
        lambda: NA._cuda_bwd(g, x, m, v, None, None, None, 1e-5, 1, False, True, False, False),
        lambda: NA._cuda_bwd(torch.randn(2, 6), torch.randn(2, 6), m, v, w, None, None, 1e-5, 4, True, False, False,
                             True),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"launch of \w+_kernel failed"):
            call()


# ----------------------------------------------------------------------------------------------
# Real sizes, natively on a GPU (Triton and CUDA C++).

@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,layout", [(torch.float16, "channels_last"), (torch.bfloat16, "channels_last"),
                                          (torch.float32, "contiguous"), (torch.float16, "contiguous")])
def test_densenet_block_gpu(backend, training, dtype, layout):
    check((64, 256, 56, 56), backend, dtype=dtype, layout=layout, training=training, residual=training)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,layout,act", [((32, 96, 112, 112), "channels_last", "silu"),
                                              ((128, 1024, 7, 7), "contiguous", "relu"),
                                              ((256, 2048), "contiguous", "gelu"),
                                              ((8, 64, 16, 28, 28), "contiguous", "relu6"),
                                              ((16, 3, 97, 89), "noncontiguous", "sigmoid")])
def test_real_shapes_gpu(backend, shape, layout, act):
    check(shape, backend, dtype=torch.float16, layout=layout, act=act)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_given_statistics_gpu(backend):
    check((64, 128, 28, 28), backend, dtype=torch.bfloat16, layout="channels_last", given_stats=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_stable_statistics_gpu(backend):
    x = parity.to_layout((300 + torch.randn(64, 64, 56, 56)).to(DEVICE), "channels_last")
    check(tuple(x.shape), backend, layout="channels_last", x=x, residual=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_gpu(backend):
    x = parity.rand(64, 256, 56, 56, dtype=torch.float16, layout="channels_last", requires_grad=True)
    w = (1 + 0.5 * parity.rand(256)).requires_grad_()
    outs = []
    for _ in range(2):
        rm, rv = torch.zeros(256, device=DEVICE), torch.ones(256, device=DEVICE)
        with parity.ran_on(backend, "norm_act"):
            y = FF.batch_norm_act(x, rm, rv, w, None, True)
            grads = torch.autograd.grad(y, [x, w], torch.ones_like(y))
        outs.append([y, *grads, rm, rv])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_int64_indexing_gpu(backend):
    """More than 2^30 elements: the CUDA kernels' int64 path and Triton's int64 offsets. The parity
    rule against a float32 reference of the same float16 input, errors measured on the GPU (a
    float64 reference, copied to the host, would cost minutes)."""
    N, C, H, W = 2, 8, 8200, 8200  # 1.08e9 elements
    x = torch.randn(N, C, H, W, device=DEVICE, dtype=torch.float16)
    stats = [(torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)) for _ in range(3)]
    with parity.ran_on(backend, "norm_act"):
        y = FF.batch_norm_act(x, *stats[0], None, None, True)
    ref = F.relu(F.batch_norm(x.float(), *stats[1], None, None, True))
    err = (y.float() - ref).abs().max().item()
    del y
    stock_err = (F.relu(F.batch_norm(x, *stats[2], None, None, True)).float() - ref).abs().max().item()
    assert err <= parity.FACTOR * stock_err + parity.FLOOR[torch.float16] * max(1.0, ref.abs().max().item())
    for i, name in enumerate(("running_mean", "running_var")):
        parity.assert_parity(stats[0][i], stats[1][i], stats[2][i], name)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA elementwise kernels' 128-bit path (csrc/norm_act.cu: channels_last, C a multiple
# of 8 for 16-bit dtypes or 4 for float32, aligned pointers) and the scalar path it falls back to
# (a pointer one element past a 16-byte boundary, C = 60 for 16-bit dtypes, odd C, NCHW).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", parity.DTYPES)
@pytest.mark.parametrize("C,misaligned,layout", [(64, False, "channels_last"), (64, True, "channels_last"),
                                                 (60, False, "channels_last"), (33, False, "channels_last"),
                                                 (64, False, "contiguous")])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_vector_and_scalar_paths_gpu(dtype, C, misaligned, layout, training):
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip("fastnets._C sees no device")
    shape = (3, C, 5, 7)
    x = parity.rand(*shape, dtype=dtype, layout=layout)
    if misaligned:
        x = parity.misaligned(x)
    for act in ("relu", "silu"):
        check(shape, "cuda", dtype=dtype, layout=layout, act=act, training=training, x=x.detach().clone()
              if not misaligned else parity.misaligned(x))
