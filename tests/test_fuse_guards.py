"""fastnets.fuse guards: a rewritten forward runs only for calls shaped like the one it was traced
for (fastnets/_fuse_guard.py). Small modules that reproduce timm's DLA pattern (an optional
shortcut that defaults to the input, an optional list of children) and its variants: non-tensor
flags, *args, **kwargs, list arguments; each compared with the stock module in eval and train mode
(outputs, gradients, batch-norm statistics) under the parity rule. Without the guards the DLA
module loses its residual add when called without a shortcut (the fused call gets None)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnets
from fastnets import _dispatch, _fuse_guard
from model_cases import assert_step_matches, randomize


def _conv_bn(c_in, c_out, k=3):
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)


class DlaBasic(nn.Module):
    """timm's DlaBasic pattern: `if shortcut is None: shortcut = x`, `children` unused."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c, c)
        self.conv2, self.bn2 = _conv_bn(c, c)

    def forward(self, x, shortcut=None, children=None):
        if shortcut is None:
            shortcut = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return F.relu(out)


class DlaRoot(nn.Module):
    """timm's DlaRoot pattern: a list argument, concatenated, its first element the residual."""

    def __init__(self, c_in, c_out, shortcut=True):
        super().__init__()
        self.conv, self.bn = _conv_bn(c_in, c_out, 1)
        self.shortcut = shortcut

    def forward(self, x_children):
        x = self.bn(self.conv(torch.cat(x_children, 1)))
        if self.shortcut:
            x += x_children[0]
        return F.relu(x)


class DlaTree(nn.Module):
    """timm's DlaTree calls: tree1(x, shortcut), tree2(x1), tree3(x1, None, children), root([...]);
    its own `children` defaults to a fresh list."""

    def __init__(self, c=4):
        super().__init__()
        self.project = nn.Sequential(*_conv_bn(c, c, 1))
        self.tree1, self.tree2, self.tree3 = DlaBasic(c), DlaBasic(c), DlaBasic(c)
        self.root2 = DlaRoot(2 * c, c)
        self.root3 = DlaRoot(3 * c, c)

    def forward(self, x, shortcut=None, children=None):
        children = [] if children is None else children
        shortcut = self.project(x)
        children.append(x)
        x1 = self.tree1(x, shortcut)
        x2 = self.tree2(x1)
        x3 = self.tree3(x1, None, children)
        return self.root2([x2, x1]) + self.root3([x3, x2] + children)


def _randomized(module):
    return randomize(module)


def _check(model, x, what):
    fused = fastnets.fuse(model)
    for train in (False, True):
        m, ref = copy.deepcopy(fused).train(train), copy.deepcopy(model).train(train)
        with _dispatch.use_backend("torch"):
            assert_step_matches(m, copy.deepcopy(ref), ref.double(), x, train, f"{what} {'train' if train else 'eval'}")
    return fused


def test_dla_pattern_block_called_without_its_shortcut():
    torch.manual_seed(1)
    block = _randomized(DlaBasic())
    fused = fastnets.fuse(block)
    assert fused.fuse_summary.counts == {"conv-bn-act": 1, "conv-bn-add-act": 1}
    assert ("", "shortcut=None, children=None") in fused.fuse_summary.guarded
    x, s = torch.randn(2, 4, 7, 6), torch.randn(2, 4, 7, 6)
    fused.eval(), block.eval()
    with torch.no_grad(), _dispatch.use_backend("torch"):
        # the call traced at fuse time: block(x), the shortcut is x
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
        # another structure: traced once for itself, then reused
        torch.testing.assert_close(fused(x, s), block(x, s), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(x, shortcut=s), block(x, shortcut=s), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(x, s), block(x, s), rtol=1e-5, atol=1e-5)
    calls = [(where, call) for where, call, _ in fused.fuse_summary.specializations]
    assert calls == [("", "(Tensor, Tensor)"), ("", "(Tensor, shortcut=Tensor)")]
    assert all(p == ("conv-bn-act", "conv-bn-add-act") for _, _, p in fused.fuse_summary.specializations)
    assert "guarded" in str(fused.fuse_summary) and "(Tensor, Tensor)" in str(fused.fuse_summary)


def test_dla_pattern_tree_eval_and_train():
    torch.manual_seed(2)
    model = _randomized(DlaTree())
    fused = _check(model, torch.randn(2, 4, 9, 7), "dla tree")
    # every block's forward was rewritten (the root's for a tensor; the list call at call time)
    assert fused.fuse_summary.counts["conv-bn-add-act"] == 3 + 2, str(fused.fuse_summary)
    assert {w for w, _ in fused.fuse_summary.guarded} == {"tree1", "tree2", "tree3"}  # the root: no conv of its own


def test_list_argument_gets_its_own_specializations():
    torch.manual_seed(3)
    root = _randomized(DlaRoot(8, 4))
    fused = fastnets.fuse(root).eval()
    root.eval()
    a, b, c = (torch.randn(2, 4, 5, 5) for _ in range(3))
    with torch.no_grad(), _dispatch.use_backend("torch"):
        torch.testing.assert_close(fused([a, b]), root([a, b]), rtol=1e-5, atol=1e-5)
        root3 = _randomized(DlaRoot(12, 4)).eval()
        fused3 = fastnets.fuse(root3).eval()
        torch.testing.assert_close(fused3((a, b, c)), root3((a, b, c)), rtol=1e-5, atol=1e-5)
    assert [call for _, call, _ in fused.fuse_summary.specializations] == ["([Tensor, Tensor])"]
    assert [call for _, call, _ in fused3.fuse_summary.specializations] == ["((Tensor, Tensor, Tensor))"]


class Flags(nn.Module):
    """Non-tensor arguments that change the computation: a bool, an int, a string, an optional tensor."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = _conv_bn(4, 4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x, add_input: bool = True, repeat: int = 1, act: str = "relu", extra=None):
        y = self.bn(self.conv(x))
        if add_input:
            y = y + x
        y = F.relu(y) if act == "relu" else torch.sigmoid(y)
        for _ in range(repeat):
            y = F.relu(self.conv2(y))
        if extra is not None:
            y = y * extra
        return y


@pytest.mark.parametrize("call", [
    lambda m, x: m(x),
    lambda m, x: m(x, False),
    lambda m, x: m(x, add_input=False, act="sigmoid"),
    lambda m, x: m(x, True, 3),
    lambda m, x: m(x, repeat=0, extra=x.detach().abs() + 0.5),
    lambda m, x: m(x, True, 2, "sigmoid", x.detach() * 0.5),
], ids=["default", "flag-off", "kwargs", "repeat3", "optional-tensor", "all"])
def test_non_tensor_flags_and_optional_tensors(call):
    torch.manual_seed(4)
    model = _randomized(Flags())

    class Caller(nn.Module):  # the call under test, inside a model
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return call(self.inner, x)

    fused = _check(Caller(), torch.randn(2, 4, 6, 5), "flags")
    assert ("inner", "add_input=True, repeat=1, act='relu', extra=None") in fused.fuse_summary.guarded


class VarArgs(nn.Module):
    """*args and **kwargs: how many residuals, and which keyword options, came."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = _conv_bn(4, 4)

    def forward(self, x, *residuals, **options):
        y = self.bn(self.conv(x))
        for r in residuals:
            y = y + r
        if options.get("negate", False):
            y = -y
        return F.relu(y)


@pytest.mark.parametrize("n,options", [(0, {}), (1, {}), (2, {"negate": True}), (1, {"negate": False})])
def test_varargs_and_kwargs(n, options):
    torch.manual_seed(5)
    model = _randomized(VarArgs())

    class Caller(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x, *[x * (i + 1) for i in range(n)], **options)

    fused = _check(Caller(), torch.randn(2, 4, 5, 6), f"varargs {n} {options}")
    assert ("inner", "*residuals=(), **options={}") in fused.fuse_summary.guarded


def test_unsupported_argument_and_the_limit_run_the_original_forward():
    torch.manual_seed(6)
    block = _randomized(DlaBasic()).eval()
    fused = fastnets.fuse(block).eval()
    x = torch.randn(1, 4, 5, 5)
    calls = []

    class Opaque:  # an object fx would bake in as a constant: the guard does not specialize on it
        pass

    original = fused.__dict__["_fastnets_guard"].original
    fused.__dict__["_fastnets_guard"].original = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.no_grad(), _dispatch.use_backend("torch"):
        torch.testing.assert_close(fused(x, None, Opaque()), block(x), rtol=1e-5, atol=1e-5)
        assert calls == [1] and fused.fuse_summary.specializations == []
        for i in range(_fuse_guard.MAX_SPECIALIZATIONS + 2):
            torch.testing.assert_close(fused(x, None, [x] * i), block(x), rtol=1e-5, atol=1e-5)
    assert len(fused.fuse_summary.specializations) == _fuse_guard.MAX_SPECIALIZATIONS
    assert calls == [1, 1, 1]  # the two calls past the limit ran the original forward


def test_guard_survives_deepcopy_and_runs_on_the_copy():
    torch.manual_seed(7)
    fused = fastnets.fuse(_randomized(DlaTree())).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        fused(x)  # traces the call-time specializations
        twin = copy.deepcopy(fused)
        torch.testing.assert_close(twin(x), fused(x))
        twin.tree2.bn2.bias.add_(1.0)  # the copy's forwards read the copy's modules
        assert not torch.allclose(twin(x), fused(x))
    assert twin.tree1.__dict__["_fastnets_guard"].summary is twin.fuse_summary


def test_call_key_structure():
    t = torch.randn(2)
    key, leaves = _fuse_guard.call_key((t, None, [t, 3], (True,)), {"k": "a", "d": {"u": t}})
    assert _fuse_guard.describe(key) == "(Tensor, None, [Tensor, 3], (True,), k='a', d={'u': Tensor})"
    assert len(leaves) == 3
    args, kwargs = _fuse_guard.rebuild(key, ["A", "B", "C"])
    assert args == ("A", None, ["B", 3], (True,)) and kwargs == {"k": "a", "d": {"u": "C"}}
    # 1 and True, 1 and 1.0 are different specializations
    assert _fuse_guard.call_key((t, 1), {})[0] != _fuse_guard.call_key((t, True), {})[0]
    assert _fuse_guard.call_key((t, 1), {})[0] != _fuse_guard.call_key((t, 1.0), {})[0]
    assert _fuse_guard.call_key((t, object()), {})[0] is None
