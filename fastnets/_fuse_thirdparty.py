"""Third-party layers with stock semantics, for fastnets.fuse (fastnets/fuse.py): recognised by
what their forward does, never by their name, and without importing the libraries that define them.

- Batch-norm subclasses (timm's BatchNormAct2d and the like): a subclass of nn.BatchNorm2d whose
  forward, traced with torch.fx in train and in eval mode, is exactly
      F.batch_norm(x, <the running statistics, weight, bias, training flag, averaging factor and eps
                      that nn.BatchNorm2d.forward passes in that mode>)
      -> child_1 -> child_2 -> ...   (its own submodules, each called on the previous result)
  (shape asserts aside). The factor is checked for a momentum and for momentum=None (the
  cumulative average: the trace sees num_batches_tracked incremented once, then its inverse).
  Such a module is an nn.BatchNorm2d followed by its children: fuse() runs it as one batch-norm
  (folded into the conv before it, or fused_batch_norm_act alone) with the activation fused when the
  children are nn.Identity's and one activation the fused ops apply; otherwise the children run
  after the fused batch-norm, as they are (dropout, DropBlock, hardswish, ...: exact in every mode).
- Subclasses of the stock modules fuse() replaces (nn.LayerNorm: timm's LayerNorm; the pooling
  modules; ...) and of nn.Conv2d / nn.Linear: recognised when their forward traces, in both modes,
  to the same graph as the stock class's forward on the same module.
- Functional calls in a traced forward, rewritten to the fastnets function of the same signature
  and semantics: F.scaled_dot_product_attention, F.layer_norm, F.batch_norm (with the activation
  that follows it, when it is its only user), F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
  F.adaptive_max_pool2d (and their _with_indices forms), F.local_response_norm. Activations are
  fused into the op before them (conv, batch-norm, linear); a lone activation stays a torch call
  (torch's is already one pass, and keeps the input's memory format).
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastnets import functional as FF
from fastnets.models._common import activation_name

# ----------------------------------------------------------------------------------------------
# Tracing one module's own forward (children as leaves), with num_batches_tracked observed rather
# than touched.


class _Counter:
    """Stands for num_batches_tracked while a forward is traced: records add_, reads as a number."""

    def __init__(self, value: int):
        self.value, self.adds = value, []

    def add_(self, other):
        self.adds.append(other)
        self.value += other
        return self

    def __float__(self):
        return float(self.value)

    def __int__(self):
        return int(self.value)

    def item(self):
        return self.value


class _ProbeTracer(fx.Tracer):
    """Every submodule a leaf; `num_batches_tracked` a _Counter (the real buffer is not touched)."""

    def __init__(self, counter_start: int = 6):
        super().__init__()
        self.counter = _Counter(counter_start)

    def is_leaf_module(self, m, qualname):
        return True

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if attr == "num_batches_tracked" and isinstance(attr_val, torch.Tensor):
            return self.counter
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _trace(module: nn.Module, training: bool, as_class: type | None = None):
    """(graph, counter): the forward of type(module), or of `as_class` (a base class of it: its
    forward and helper methods), traced on `module` with every module under it in `training`
    mode. Modes and class are restored afterwards; TraceError etc. propagate."""
    modes = {m: m.training for m in module.modules()}
    cls = type(module)
    tracer = _ProbeTracer()
    try:
        module.train(training)
        if as_class is not None:
            module.__class__ = as_class
        graph = tracer.trace(module)
    finally:
        module.__class__ = cls
        for m, t in modes.items():
            m.training = t
    return graph, tracer.counter


# Traced results by (class, instance state): an fx trace costs tens of milliseconds, and a model
# holds many modules of one class in a few configurations.
_MEMO: dict = {}


def _state_key(m: nn.Module):
    """What a forward's trace can depend on, besides its code: the instance's plain attributes,
    which parameters and buffers are None, the submodules' names and classes, and the hooks."""
    items = []
    for k, v in sorted(m.__dict__.items()):
        if k == "training" or k.startswith("_fastnets"):
            continue
        if k in ("_parameters", "_buffers"):
            items.append((k, tuple((n, t is None) for n, t in v.items())))
        elif k == "_modules":
            items.append((k, tuple((n, type(c), _has_hooks(c) if c is not None else None) for n, c in v.items())))
        elif isinstance(v, dict):
            items.append((k, tuple(v.keys())))
        elif isinstance(v, torch.Tensor):
            items.append((k, (v.dtype, tuple(v.shape))))
        else:
            items.append((k, repr(v)))
    return type(m), tuple(items)


def _memo(kind: str, m: nn.Module, compute):
    key = (kind, _state_key(m))
    try:
        hash(key)
    except TypeError:
        return compute()
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def _first_line(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:100]}"


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _bound(fn, args, kwargs):
    """fn's arguments by name, defaults applied (None when fn has no Python signature)."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _checks_only(graph: fx.Graph) -> set:
    """The nodes that only serve shape checks (torch._assert and what feeds only it): they have no
    effect on a valid input."""
    dead = {n for n in graph.nodes if n.op == "call_function" and n.target is torch._assert}
    pure = {getattr, len}
    changed = True
    while changed:
        changed = False
        for n in graph.nodes:
            if n in dead or n.op not in ("call_function", "call_method"):
                continue
            is_pure = ((n.op == "call_function" and (n.target in pure or getattr(n.target, "__module__", None)
                                                      in ("_operator", "operator")))
                       or (n.op == "call_method" and n.target in ("dim", "size")))
            if is_pure and all(u in dead for u in n.users):
                dead.add(n)
                changed = True
    return dead


# ----------------------------------------------------------------------------------------------
# Batch-norm subclasses (norm + activation modules).

class NormActPlan:
    """How fuse() runs a recognised batch-norm subclass: one batch-norm with `activation` fused,
    then the submodules named in `after`, in order."""

    __slots__ = ("activation", "after")

    def __init__(self, activation: str | None, after: tuple[str, ...]):
        self.activation, self.after = activation, after

    @property
    def plain(self) -> bool:
        """Exactly an nn.BatchNorm2d (nothing after it)."""
        return self.activation is None and not self.after

    def __repr__(self):
        return f"NormActPlan(activation={self.activation!r}, after={self.after!r})"


def _bn_graph(m: nn.BatchNorm2d, graph: fx.Graph, counter: _Counter, training: bool):
    """The submodules called after the batch-norm (a tuple of names) when `graph` is
    nn.BatchNorm2d's computation on m in this mode followed by a chain of submodule calls; else
    a string saying what differs."""
    dead = _checks_only(graph)
    nodes = [n for n in graph.nodes if n not in dead]
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"its forward takes {len(inputs)} arguments (the stock one takes the input alone)"
    calls = [n for n in nodes if n.op == "call_function" and n.target is F.batch_norm]
    if len(calls) != 1:
        return f"its forward calls F.batch_norm {len(calls)} times"
    bn = calls[0]
    args = _bound(F.batch_norm, bn.args, bn.kwargs)
    # What nn.BatchNorm2d.forward passes in this mode (torch/nn/modules/batchnorm.py, _BatchNorm.forward).
    factor, adds = (0.0 if m.momentum is None else m.momentum), []
    if training and m.track_running_stats and m.num_batches_tracked is not None:
        adds = [1]
        factor = 1.0 / float(counter.value) if m.momentum is None else m.momentum
    bn_training = training or (m.running_mean is None and m.running_var is None)
    keep = not training or m.track_running_stats

    def attr(name, present):
        return name if present and getattr(m, name) is not None else None

    want = {"input": inputs[0], "running_mean": attr("running_mean", keep), "running_var": attr("running_var", keep),
            "weight": attr("weight", True), "bias": attr("bias", True)}
    for name, expected in want.items():
        got = args[name]
        if isinstance(got, fx.Node) and got.op == "get_attr":
            got = got.target
        if got != expected:
            return f"its F.batch_norm gets {name}={got} where nn.BatchNorm2d passes {expected}"
    if type(args["training"]) is not bool or args["training"] != bn_training:
        return f"its F.batch_norm gets training={args['training']!r} in {'train' if training else 'eval'} mode"
    if not isinstance(args["momentum"], float) or args["momentum"] != factor:
        return f"its F.batch_norm gets momentum={args['momentum']!r} where nn.BatchNorm2d passes {factor!r}"
    if not isinstance(args["eps"], float) or args["eps"] != m.eps:
        return f"its F.batch_norm gets eps={args['eps']!r}, the module's is {m.eps!r}"
    if counter.adds != adds:
        return "it updates num_batches_tracked differently from nn.BatchNorm2d"
    after, cur = [], bn
    for n in nodes[nodes.index(bn) + 1:]:
        if n.op == "output":
            if n.args != (cur,) or n.kwargs:
                return "its forward returns more than the normalized tensor"
            break
        if n.op != "call_module" or n.args != (cur,) or n.kwargs:
            return f"its forward does more after F.batch_norm than call its submodules ({n.op} {n.target})"
        after.append(n.target)
        cur = n
    users = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output") and n is not bn
             and n.target not in after]
    if users:
        return f"its forward computes more than F.batch_norm ({users[0].op} {users[0].target})"
    return tuple(after)


def norm_act_plan(m: nn.Module):
    """A NormActPlan for a batch-norm subclass that is nn.BatchNorm2d followed by its own
    submodules (see the module docstring), else a string saying why not."""
    if not isinstance(m, nn.BatchNorm2d):
        return f"{type(m).__name__} is not an nn.BatchNorm2d"
    if type(m).__call__ is not nn.Module.__call__:
        return "it overrides __call__"
    if _has_hooks(m):
        return "it has hooks (a fused call would skip them)"
    chain = _memo("norm-act", m, lambda: _bn_chain(m))
    if isinstance(chain, str):
        return chain
    after = [name for name in chain
             if not (type(m.get_submodule(name)) is nn.Identity and not _has_hooks(m.get_submodule(name)))]
    if not after:
        return NormActPlan(None, ())
    if len(after) == 1:
        act = m.get_submodule(after[0])
        name = activation_name(act)
        if name is not None and not _has_hooks(act):
            return NormActPlan(name, ())
    return NormActPlan(None, tuple(after))


def _bn_chain(m: nn.BatchNorm2d):
    """The submodules m's forward calls after its batch-norm, when it is nn.BatchNorm2d's in both
    modes; else why not."""
    chains = []
    for training in (True, False):
        try:
            graph, counter = _trace(m, training)
        except Exception as exc:  # noqa: BLE001 - cannot trace: cannot prove
            return f"torch.fx cannot trace its forward ({_first_line(exc)})"
        found = _bn_graph(m, graph, counter, training)
        if isinstance(found, str):
            return found
        chains.append(found)
    if chains[0] != chains[1]:
        return "its forward calls different submodules in train and eval mode"
    return chains[0]


def norm_act_forward(self, input):
    """The forward fuse() gives a recognised batch-norm subclass called on its own."""
    from fastnets.nn.norm_act import fused_batch_norm_act
    plan = self.__dict__["_fastnets_norm_act"]
    out = fused_batch_norm_act(input, self, plan.activation)
    for name in plan.after:
        out = self.get_submodule(name)(out)
    return out


# ----------------------------------------------------------------------------------------------
# Subclasses of stock modules whose forward is the stock one.

def _same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    na, nb = list(a.nodes), list(b.nodes)
    if len(na) != len(nb):
        return False
    index = {}
    for i, (x, y) in enumerate(zip(na, nb)):
        index[x], index[y] = i, i
    def norm(v):
        if isinstance(v, fx.Node):
            return ("node", index[v])
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, tuple(norm(e) for e in v))
        if isinstance(v, dict):
            return ("dict", tuple((k, norm(e)) for k, e in v.items()))
        return ("value", type(v), v)
    for x, y in zip(na, nb):
        if x.op != y.op or (x.op != "placeholder" and x.target != y.target):
            return False
        if x.op == "placeholder":
            if norm(x.args) != norm(y.args):
                return False
            continue
        ax = _bound(x.target, x.args, x.kwargs) if x.op == "call_function" else None
        ay = _bound(y.target, y.args, y.kwargs) if x.op == "call_function" else None
        if ax is not None and ay is not None:
            if norm(ax) != norm(ay):
                return False
        elif norm(x.args) != norm(y.args) or norm(x.kwargs) != norm(y.kwargs):
            return False
    return True


def stock_forward(m: nn.Module, base: type):
    """True when m (an instance of a subclass of `base`) computes what base's forward does: its
    forward traces to the same graph as base's on m, in train and in eval mode; else a string
    saying why not."""
    if type(m).__call__ is not nn.Module.__call__:
        return "it overrides __call__"
    return _memo(f"stock {base.__qualname__}", m, lambda: _stock_forward(m, base))


def _stock_forward(m: nn.Module, base: type):
    for training in (True, False):
        try:
            ours, ours_counter = _trace(m, training)
        except Exception as exc:  # noqa: BLE001
            return f"torch.fx cannot trace its forward ({_first_line(exc)})"
        try:
            stock, stock_counter = _trace(m, training, as_class=base)
        except Exception as exc:  # noqa: BLE001
            return f"torch.fx cannot trace {base.__name__}'s forward to compare ({_first_line(exc)})"
        if not _same_graph(ours, stock) or ours_counter.adds != stock_counter.adds:
            return f"its forward computes something else than {base.__name__}'s"
    return True


# ----------------------------------------------------------------------------------------------
# Functional calls in a traced forward.

def max_pool2d_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    """F.max_pool2d_with_indices (the form F.max_pool2d takes with return_indices=True): always
    (output, indices)."""
    return FF.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def adaptive_max_pool2d_with_indices(input, output_size, return_indices=False):
    """F.adaptive_max_pool2d_with_indices: always (output, indices)."""
    return FF.adaptive_max_pool2d(input, output_size, return_indices=True)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               activation=None):
    """F.batch_norm (same arguments) followed by `activation`, as one fastnets batch_norm_act."""
    return FF.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, activation)


# stock function -> (pattern in the summary, the fastnets function: same arguments, same names)
FUNCTIONAL = {
    F.scaled_dot_product_attention: ("F.scaled_dot_product_attention", FF.scaled_dot_product_attention),
    F.layer_norm: ("F.layer_norm", FF.layer_norm),
    F.batch_norm: ("F.batch_norm", batch_norm),
    F.max_pool2d: ("F.max_pool2d", FF.max_pool2d),
    F.max_pool2d_with_indices: ("F.max_pool2d", max_pool2d_with_indices),
    F.avg_pool2d: ("F.avg_pool2d", FF.avg_pool2d),
    F.adaptive_avg_pool2d: ("F.adaptive_avg_pool2d", FF.adaptive_avg_pool2d),
    F.adaptive_max_pool2d: ("F.adaptive_max_pool2d", FF.adaptive_max_pool2d),
    F.adaptive_max_pool2d_with_indices: ("F.adaptive_max_pool2d", adaptive_max_pool2d_with_indices),
    F.local_response_norm: ("F.local_response_norm", FF.local_response_norm),
}
# What the rewritten forwards call (kept as calls if such a forward is traced again).
CALLS = tuple({fn for _, fn in FUNCTIONAL.values()})
# Names whose presence in a class's code makes its forward worth tracing for FUNCTIONAL.
_NAMES = {"scaled_dot_product_attention", "layer_norm", "batch_norm", "max_pool2d", "avg_pool2d",
          "adaptive_avg_pool2d", "adaptive_max_pool2d", "local_response_norm", "max_pool2d_with_indices",
          "adaptive_max_pool2d_with_indices"}


def calls_functional(module: nn.Module) -> bool:
    """Whether the code of module's class (its own methods, up to but not including torch.nn's
    classes) names one of the functions rewritten here: a cheap filter before tracing."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.") or cls is object:
            continue
        for value in vars(cls).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and _NAMES & _all_names(code):
                return True
    return False


def _all_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _all_names(const)
    return names


def rewrite_functional(rewriter) -> int:
    """Replaces the FUNCTIONAL calls in rewriter.graph (a fuse._GraphRewriter) by their fastnets
    functions (F.batch_norm with the activation after it, when that is its only user)."""
    graph, count = rewriter.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in FUNCTIONAL or node.graph is not graph:
            continue
        pattern, fn = FUNCTIONAL[node.target]
        kwargs, last, act = dict(node.kwargs), node, None
        if node.target is F.batch_norm:
            nxt = rewriter.sole_user(node)
            act = rewriter.activation(nxt, node)
            if act is not None:
                kwargs["activation"], last = act, nxt
                pattern = "F.batch_norm-act"
        with graph.inserting_before(last):
            new = graph.call_function(fn, node.args, kwargs)
        last.replace_all_uses_with(new)
        if last is not node:
            graph.erase_node(last)
        graph.erase_node(node)
        where = f"{rewriter.path}:{node.name}" if rewriter.path else node.name
        rewriter.summary.fused.append((pattern, where))
        count += 1
    return count
