"""Modules built on ``torchblocks.functional``: drop-in twins of ``torch.nn``,
and ``patch``, which swaps them into an existing model."""

import math
from typing import Optional

import torch
from torch import nn

from torchblocks import functional as F
from torchblocks._validate import require_choice

__all__ = ["Dense", "ReLU", "patch"]


class Dense(nn.Module):
    """``act(x @ weight^T + bias)``; the twin of ``nn.Linear`` (+ ``nn.ReLU``).

    Parameters ``weight (out_features, in_features)`` and ``bias
    (out_features,)`` are laid out and initialised exactly as ``nn.Linear``'s
    (same random draws for the same seed), so their state dicts load into
    each other.

    Args:
        in_features, out_features: sizes of each input and output sample.
        bias: learn an additive bias.
        activation: None or ``"relu"``, fused into the matmul on the GPU.

    Shape: input ``(*, in_features)``, output ``(*, out_features)``.

    Example::

        >>> layer = torchblocks.nn.Dense(784, 512, activation="relu")
        >>> layer(torch.randn(128, 784)).shape
        torch.Size([128, 512])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        require_choice("Dense", "activation", activation, F.ACTIVATIONS)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: weight and bias uniform in +-1/sqrt(in_features)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Optional[str] = None) -> "Dense":
        """A Dense holding ``linear``'s very Parameter objects (no copy)."""
        dense = cls(linear.in_features, linear.out_features, bias=False, activation=activation, device="meta")
        dense.weight = linear.weight
        dense.bias = linear.bias
        return dense.train(linear.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dense(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return text + (f", activation={self.activation!r}" if self.activation else "")


class ReLU(nn.Module):
    """``max(x, 0)`` elementwise; the twin of ``nn.ReLU``.

    Args:
        inplace: overwrite the input with the result.

    Shape: input ``(*)``, output ``(*)``, the same shape.

    Example::

        >>> model = nn.Sequential(nn.Linear(784, 512), torchblocks.nn.ReLU())
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(input, inplace=self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _replacement(module: nn.Module) -> Optional[nn.Module]:
    """The torchblocks twin of ``module``, or None to keep it. Only exact
    native types are replaced (a subclass may rely on more than the forward),
    and never a module with hooks (they would be lost)."""
    if _has_hooks(module):
        return None
    if type(module) is nn.Linear:
        return Dense.from_linear(module)
    if type(module) is nn.ReLU:
        return ReLU(inplace=module.inplace).train(module.training)
    return None


def _fusable(first: nn.Module, second: nn.Module) -> bool:
    return type(first) is nn.Linear and type(second) is nn.ReLU and not _has_hooks(first) and not _has_hooks(second)


def patch(model: nn.Module) -> nn.Module:
    """Swap torchblocks blocks into ``model``, in place and recursively.

    Every ``nn.Linear`` becomes a ``Dense`` and every ``nn.ReLU`` a ``ReLU``,
    keeping the very same ``Parameter`` objects (an optimizer built before
    the patch still trains the model) and every hyperparameter. Inside an
    ``nn.Sequential``, an ``nn.Linear`` directly followed by an ``nn.ReLU``
    becomes one ``Dense(activation="relu")`` and the ReLU's slot an
    ``nn.Identity``, so indices and outputs stay the same. Modules with hooks
    and subclasses of these types are left as they are.

    Args:
        model: any module.

    Returns:
        ``model`` (patched), or its replacement if ``model`` itself is an
        ``nn.Linear`` or ``nn.ReLU``.

    Example::

        >>> net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
        >>> torchblocks.patch(net)  # Dense(relu), Identity, Dense
    """
    replacement = _replacement(model)
    if replacement is not None:
        return replacement
    children = model._modules
    names = list(children)
    for index, name in enumerate(names):
        child = children[name]
        if child is None:
            continue
        following = children[names[index + 1]] if index + 1 < len(names) else None
        if isinstance(model, nn.Sequential) and following is not None and _fusable(child, following):
            children[name] = Dense.from_linear(child, activation="relu")
            children[names[index + 1]] = nn.Identity()
        else:
            children[name] = patch(child)
    return model
