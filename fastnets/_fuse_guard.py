"""Guards for the forwards that fuse() rewrites: a rewritten forward runs only for calls shaped like
the one it was traced for.

torch.fx traces a forward once, with proxies for its arguments, and freezes every Python decision
the forward makes about them: `if shortcut is None` (a proxy is never None), `if flag:` on a
default, `children.append(...)` on a list it would have built, how many of `*args` it got. Called
another way (timm's DLA calls the same block as `block(x)`, `block(x, shortcut)` and
`block(x, None, children)`), the rewritten forward would silently compute something else.

So each rewritten forward is specialized on the structure of one call, its *key*:
- every tensor is a placeholder (shapes, dtypes and devices are not specialized on: fx cannot branch
  on them without failing to trace);
- every other value is a constant of the trace: None, bools, numbers, strings, dtypes, devices;
- lists, tuples and dicts are unpacked (their lengths, and the keys of dicts, are constants);
- the number of positional arguments and the names of the keyword arguments are part of the key.
At fuse time each module's forward is traced for the call with its required positional arguments
only, all tensors (`block(x)`; the defaults of the other parameters apply, as in the call). The
guard, installed as the module's forward, computes the key of each call (a few tuple operations,
microseconds) and looks it up: a match runs the rewritten forward on the call's tensors; a new key
is traced and rewritten once for it (at most MAX_SPECIALIZATIONS per module; the summary lists
them); a call with another kind of value (an object fx would treat as an opaque constant), past
the limit, or while torch.compile traces, runs the module's original forward.
"""
from __future__ import annotations

import enum
import inspect
import keyword
import re
from typing import Any, Callable

import torch

#: New keys traced per module at call time, beyond the one traced by fuse() itself.
MAX_SPECIALIZATIONS = 8


class _TensorLeaf:
    """Marks a tensor in a key."""

    __slots__ = ()

    def __repr__(self):
        return "Tensor"

    def __reduce__(self):
        return "TENSOR"


TENSOR = _TensorLeaf()

# Values that are constants of a trace, compared by type and value.
_CONSTANT_TYPES = frozenset([type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                             torch.memory_format, torch.layout, torch.Size, type(Ellipsis), slice])


class _Unsupported(Exception):
    pass


def _key(value, leaves: list):
    kind = type(value)
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return TENSOR
    if kind is tuple or kind is list:
        return (kind, tuple([_key(v, leaves) for v in value]))
    if kind is dict:
        return (dict, tuple([(k, _key(v, leaves)) for k, v in value.items()]))
    if kind in _CONSTANT_TYPES or isinstance(value, enum.Enum):
        if kind is slice:
            return (slice, (value.start, value.stop, value.step))
        return (kind, value)
    raise _Unsupported(kind.__name__)


_ONE_TENSOR = ((TENSOR,), ())


def call_key(args: tuple, kwargs: dict):
    """(key, tensors) of a call, or (None, reason) when an argument is not a tensor, a constant or
    a container of those."""
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
        return _ONE_TENSOR, args  # the common call, m(x)
    leaves: list = []
    try:
        key = (tuple([_key(a, leaves) for a in args]),
               tuple([(k, _key(v, leaves)) for k, v in kwargs.items()]))
    except _Unsupported as exc:
        return None, f"an argument of type {exc}"
    except TypeError:  # an unhashable constant inside (a dict key, say)
        return None, "an unhashable argument"
    return key, leaves


def default_key(forward: Callable):
    """The key of a call with the required positional parameters only, all tensors (`m(x)`), or None
    when the forward has required keyword-only parameters."""
    params = list(inspect.signature(forward).parameters.values())[1:]  # past self
    kinds = inspect.Parameter
    if any(p.kind is kinds.KEYWORD_ONLY and p.default is p.empty for p in params):
        return None
    required = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    return (tuple([TENSOR] * len(required)), ())


def _rebuild(part, leaves):
    if part is TENSOR:
        return next(leaves)
    kind, value = part
    if kind is tuple or kind is list:
        return kind([_rebuild(v, leaves) for v in value])
    if kind is dict:
        return {k: _rebuild(v, leaves) for k, v in value}
    if kind is slice:
        return slice(*value)
    return value


def rebuild(key, leaves) -> tuple[tuple, dict]:
    """The call's (args, kwargs) with `leaves` (tensors or fx proxies, in order) for its tensors."""
    it = iter(leaves)
    args = tuple(_rebuild(a, it) for a in key[0])
    kwargs = {k: _rebuild(v, it) for k, v in key[1]}
    return args, kwargs


def leaf_names(forward: Callable, key) -> list[str]:
    """Names for the tensors of a key (the placeholders of the traced forward): the parameter's
    name, with the index inside a container."""
    params = [p for p in list(inspect.signature(forward).parameters.values())[1:]
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in inspect.signature(forward).parameters.values()
                if p.kind is inspect.Parameter.VAR_POSITIONAL), "args")
    names: list[str] = []

    def walk(part, name):
        if part is TENSOR:
            names.append(name)
        elif part[0] in (tuple, list, dict):
            for i, v in enumerate(part[1]):
                if part[0] is dict:
                    i, v = v
                walk(v, f"{name}_{i}")

    for i, part in enumerate(key[0]):
        walk(part, params[i].name if i < len(params) else f"{var}_{i - len(params)}")
    for k, part in key[1]:
        walk(part, str(k))
    unique: list[str] = []  # identifiers (dict keys can be any string), each once
    for name in names:
        name = re.sub(r"\W", "_", name)
        name = name if name[:1].isalpha() or name[:1] == "_" else f"_{name}"
        while name in unique or keyword.iskeyword(name):
            name += "_"
        unique.append(name)
    return unique


def describe(key) -> str:
    """A call of that structure, as text: `(Tensor, None, [Tensor, Tensor])`."""
    def text(part):
        if part is TENSOR:
            return "Tensor"
        kind, value = part
        if kind is tuple:
            return "(" + ", ".join(text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        if kind is list:
            return "[" + ", ".join(text(v) for v in value) + "]"
        if kind is dict:
            return "{" + ", ".join(f"{k!r}: {text(v)}" for k, v in value) + "}"
        return repr(value)

    return "(" + ", ".join([text(a) for a in key[0]] + [f"{k}={text(v)}" for k, v in key[1]]) + ")"


def specialized_parameters(forward: Callable) -> str:
    """What the trace of a `m(x)` call freezes beyond its tensors: the optional parameters at their
    defaults, *args empty, **kwargs empty; "" when the forward has none."""
    frozen = []
    for p in list(inspect.signature(forward).parameters.values())[1:]:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            frozen.append(f"*{p.name}=()")
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            frozen.append(f"**{p.name}={{}}")
        elif p.default is not p.empty:
            frozen.append(f"{p.name}={p.default!r}")
    return ", ".join(frozen)


class Guard:
    """The state of one module's guarded forward: its original forward and its specializations
    (key -> rewritten forward, a function of (module, *tensors), or None: run the original)."""

    def __init__(self, original: Callable, key, fn: Callable, specialize: Callable, path: str, summary):
        self.original = original
        self.table: dict = {key: fn}
        self.specialize = specialize  # specialize(module, key, path) -> (fn or None, patterns)
        self.path = path
        self.summary = summary
        self.traced = 0

    def miss(self, module, key):
        """The rewritten forward for a new key (traced now), or None."""
        if torch.compiler.is_compiling() or torch.jit.is_scripting():
            return None  # no tracing inside another tracer; the original forward runs
        if self.traced >= MAX_SPECIALIZATIONS:
            return None
        self.traced += 1
        fn, patterns = self.specialize(module, key, self.path)
        self.table[key] = fn
        self.summary.specializations.append((self.path, describe(key), tuple(patterns)))
        return fn


def guarded_forward(self, *args: Any, **kwargs: Any):
    """The forward fuse() installs on a module whose forward it rewrote (see the module docstring)."""
    guard: Guard = self.__dict__["_fastnets_guard"]
    key, leaves = call_key(args, kwargs)
    if key is None:
        return guard.original(self, *args, **kwargs)
    fn = guard.table.get(key, guard)
    if fn is guard:
        fn = guard.miss(self, key)
    if fn is None:
        return guard.original(self, *args, **kwargs)
    return fn(self, *leaves)
