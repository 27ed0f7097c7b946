"""Route the functional calls of any code to the blocks, while enabled.

``torchblocks.patch`` swaps modules; it cannot reach a ``F.linear`` written in
some ``forward``, an ``nn.CrossEntropyLoss()`` built inside one, or the
projections inside ``F.multi_head_attention_forward``. A
``torch.overrides.TorchFunctionMode`` sees every such call, wherever it comes
from, and this one hands the calls below to the blocks on the backend in force:

    F.linear                                       -> functional.dense
    F.relu, F.relu_, torch.relu[_], Tensor.relu[_] -> functional.relu
    F.cross_entropy                                -> functional.softmax_cross_entropy

A call a block cannot serve (a tensor subclass or sparse tensor, an integer
``F.linear``, a 1-D weight, the deprecated ``size_average``/``reduce``) runs
natively instead; the mode counts it in ``fallbacks`` and warns once per call
and reason. Everything else passes through untouched.
"""

import collections
import contextlib
import threading
import warnings
from types import FunctionType
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from torchblocks import functional
from torchblocks._ops._dispatch import PLAIN_TYPES
from torchblocks._validate import IGNORE_INDEX

__all__ = ["BlocksMode", "disable", "enable", "enabled"]


class _Fallback:
    """What a route returns instead of a result: run natively, because ``why``."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


def _unsupported(*tensors) -> Optional[str]:
    """Why the blocks cannot take these tensors (None: they can)."""
    for tensor in tensors:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            return f"an argument of type {type(tensor).__name__}, not a tensor"
        if type(tensor) not in PLAIN_TYPES:
            return f"a tensor subclass ({type(tensor).__name__})"
        if tensor.layout != torch.strided or tensor.is_nested or tensor.is_quantized:
            return f"a {tensor.layout} tensor" if tensor.layout != torch.strided else "a nested or quantized tensor"
    return None


def _linear(input, weight, bias=None):
    why = _unsupported(input, weight, bias)
    if why is None and not (input.is_floating_point() and weight.is_floating_point()):
        why = f"dtype {input.dtype} (dense takes floating point)"
    if why is None and weight.dim() != 2:
        why = f"a {weight.dim()}-D weight (dense takes (out_features, in_features))"
    if why is not None:
        return _Fallback(why)
    return functional.dense(input, weight, bias)


def _relu(input, inplace=False):
    why = _unsupported(input)
    if why is not None:
        return _Fallback(why)
    return functional.relu(input, inplace)


def _relu_(input):
    return _relu(input, True)


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=IGNORE_INDEX, reduce=None,
                   reduction="mean", label_smoothing=0.0):
    why = _unsupported(input, target, weight)
    if why is None and (size_average is not None or reduce is not None):
        why = "the deprecated size_average/reduce arguments"
    if why is not None:
        return _Fallback(why)
    return functional.softmax_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)


# each routed function: its name in warnings, and the route
_ROUTES: Dict[Callable, Tuple[str, Callable]] = {
    F.linear: ("F.linear", _linear),
    F.relu: ("F.relu", _relu),
    torch.relu: ("torch.relu", _relu),
    torch.Tensor.relu: ("Tensor.relu", _relu),
    torch.relu_: ("torch.relu_", _relu_),
    torch.Tensor.relu_: ("Tensor.relu_", _relu_),
    F.cross_entropy: ("F.cross_entropy", _cross_entropy),
}


def _never(*args) -> bool:
    return False


def _without_entry_check(function: FunctionType) -> FunctionType:
    """``function``'s code, but its ``has_torch_function`` entry check says no.

    A Python function of ``torch.nn.functional`` starts by handing itself to
    the mode, and the mode is popped while its handler runs, so the calls in
    its body would run natively. Run with the mode pushed again, this copy
    goes straight into its body, whose calls the mode sees."""
    namespace = dict(function.__globals__, has_torch_function=_never, has_torch_function_unary=_never,
                     has_torch_function_variadic=_never)
    copy = FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


# Python functions whose bodies call a routed function.
_COMPOSITES = (F.multi_head_attention_forward,)


class BlocksMode(TorchFunctionMode):
    """The mode behind ``enabled``; ``fallbacks`` counts the calls that ran
    natively, by (call, reason)."""

    def __init__(self):
        super().__init__()
        self.fallbacks: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        routed = _ROUTES.get(func)
        if routed is not None:
            name, route = routed
            result = route(*args, **kwargs)
            if not isinstance(result, _Fallback):
                return result
            self._fell_back(name, result.why)
        elif func in _COMPOSITES and not torch.compiler.is_compiling():
            # (dynamo cannot trace the copy: compiled, the composite's own calls stay native)
            with self:
                return _without_entry_check(func)(*args, **kwargs)
        return func(*args, **kwargs)

    def _fell_back(self, name: str, why: str) -> None:
        key = (name, why)
        if not self.fallbacks[key]:
            warnings.warn(f"torchblocks.enabled: {name} ran natively: {why}", stacklevel=4)
        self.fallbacks[key] += 1


@contextlib.contextmanager
def enabled():
    """Context manager: while active, ``F.linear``, ``F.relu`` (and
    ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu``,
    ``Tensor.relu_``) and ``F.cross_entropy`` calls made by any code on this
    thread run as torchblocks blocks, with native semantics; calls a block
    cannot serve run natively, with one warning per call and reason.
    ``torch.compile(fullgraph=True)`` traces through it; compiled, the
    projections inside ``F.multi_head_attention_forward`` stay native.

    Yields:
        the ``BlocksMode``; its ``fallbacks`` counts the native calls.

    Example::

        >>> attention = torch.nn.MultiheadAttention(64, 4)
        >>> x = torch.randn(10, 2, 64)
        >>> with torchblocks.enabled():
        ...     out, _ = attention(x, x, x)   # its four projections run as dense
    """
    with BlocksMode() as mode:
        yield mode


_enabled_here = threading.local()  # the stack of modes enable() pushed on this thread


def enable() -> BlocksMode:
    """Turn the override on for this thread until ``disable()``: ``enabled()``
    without the ``with``.

    Example::

        >>> torchblocks.enable()
        >>> y = torch.nn.functional.relu(torch.randn(4))   # torchblocks' relu
        >>> torchblocks.disable()
    """
    mode = BlocksMode()
    mode.__enter__()
    _enabled_here.__dict__.setdefault("modes", []).append(mode)
    return mode


def disable() -> None:
    """Turn off the override that ``enable()`` turned on (nothing if it is off).

    Example::

        >>> torchblocks.disable()
    """
    modes = _enabled_here.__dict__.get("modes")
    if modes:
        modes.pop().__exit__(None, None, None)
