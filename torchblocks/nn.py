"""Modules built on ``torchblocks.functional``: drop-in twins of ``torch.nn``
(``torchblocks.patch`` swaps them into an existing model)."""

import math
from typing import Optional

import torch
from torch import nn

from torchblocks import functional as F
from torchblocks._validate import IGNORE_INDEX, check_loss_options, require_choice

__all__ = ["Dense", "DenseCrossEntropy", "ReLU", "SoftmaxCrossEntropy"]


class _LinearParameters(nn.Module):
    """``weight (out_features, in_features)`` and ``bias (out_features,)`` (or
    None), laid out and initialised as ``nn.Linear``'s: Dense's and
    DenseCrossEntropy's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        self.in_features = in_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, the same random draws for the same seed:
        weight and bias uniform in +-1/sqrt(in_features)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            in_features = self.weight.shape[1]
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)


class Dense(_LinearParameters):
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
        require_choice("Dense", "activation", activation, F.ACTIVATIONS)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.out_features = out_features
        self.activation = activation

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


class SoftmaxCrossEntropy(nn.Module):
    """Cross-entropy of the softmax of the input; the twin of
    ``nn.CrossEntropyLoss`` (its deprecated ``size_average``/``reduce``
    aside). ``weight`` is a buffer, as there, so state dicts match.

    Args:
        weight: ``(C,)`` class weights, or None.
        ignore_index, reduction, label_smoothing: as in
            ``torchblocks.functional.softmax_cross_entropy``.

    Shape: input ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``; target class
    indices ``()``, ``(N)``, ``(N, d1, ...)`` or probabilities of input's
    shape; output a scalar, or the target's shape with ``reduction="none"``.

    Example::

        >>> loss_fn = torchblocks.nn.SoftmaxCrossEntropy(label_smoothing=0.1)
        >>> loss = loss_fn(torch.randn(128, 10), torch.randint(10, (128,)))
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = IGNORE_INDEX,
                 reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        check_loss_options("SoftmaxCrossEntropy", ignore_index, reduction, label_smoothing)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.softmax_cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                                       self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class DenseCrossEntropy(_LinearParameters):
    """A Dense classifier head and its cross-entropy loss in one, for large
    class counts: ``forward(input, target)`` returns the loss, never holding
    all ``(N, C)`` logits (``torchblocks.functional.dense_cross_entropy``).
    ``weight (num_classes, in_features)`` and ``bias`` are initialised and
    stored as in ``nn.Linear(in_features, num_classes)``.

    Args:
        in_features: size of each input row.
        num_classes: C.
        bias: learn an additive bias.
        ignore_index, reduction, label_smoothing: as in ``SoftmaxCrossEntropy``.

    Shape: input ``(*, in_features)``, target ``(*)`` class indices; output a
    scalar, or ``(*)`` with ``reduction="none"``.

    Example::

        >>> head = torchblocks.nn.DenseCrossEntropy(4096, 128_000)
        >>> loss = head(torch.randn(512, 4096), torch.randint(128_000, (512,)))
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, ignore_index: int = IGNORE_INDEX,
                 reduction: str = "mean", label_smoothing: float = 0.0, device=None, dtype=None):
        check_loss_options("DenseCrossEntropy", ignore_index, reduction, label_smoothing)
        super().__init__(in_features, num_classes, bias, device, dtype)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.dense_cross_entropy(input, self.weight, target, self.bias, self.ignore_index, self.reduction,
                                     self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
                f"reduction={self.reduction!r}")
