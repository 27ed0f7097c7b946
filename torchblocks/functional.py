"""The functional forms of the torchblocks blocks: the public calls of SPEC.md.

Each checks its arguments first, then hands over to the autograd Function of
its block in ``torchblocks._ops``.
"""

import math
from typing import Optional

import torch

from torchblocks._ops.dense import DenseFunction
from torchblocks._ops.relu import ReLUFunction
from torchblocks._validate import (
    autocast_like_native,
    require_bool,
    require_choice,
    require_floating,
    require_like,
    require_real,
    require_tensor,
)

__all__ = ["dense", "relu"]

ACTIVATIONS = (None, "relu")


def dense(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None
) -> torch.Tensor:
    """A dense layer, ``act(input @ weight^T + bias)``; twin of ``F.linear``
    (followed by ``F.relu`` when ``activation="relu"``, fused into the
    matmul's epilogue on the GPU).

    Args:
        input: ``(*, in_features)``, floating point; any leading dimensions
            (none included) are folded into the rows of one matmul.
        weight: ``(out_features, in_features)``, as ``nn.Linear`` stores it.
        bias: ``(out_features,)`` or None.
        activation: None or ``"relu"``.

    Returns:
        ``(*, out_features)``, the dtype of ``input`` (the autocast dtype
        under ``torch.autocast``, as native).

    Example::

        >>> x = torch.randn(128, 784)
        >>> w, b = torch.randn(512, 784) * 0.05, torch.zeros(512)
        >>> h = torchblocks.functional.dense(x, w, b, activation="relu")  # (128, 512)
    """
    require_tensor("dense", "input", input)
    require_tensor("dense", "weight", weight)
    if bias is not None:
        require_tensor("dense", "bias", bias)
    require_choice("dense", "activation", activation, ACTIVATIONS)
    input, weight, bias = autocast_like_native(input, weight, bias)
    require_floating("dense", "input", input)
    require_like("dense", "weight", weight, "input", input)
    if weight.dim() != 2:
        raise ValueError(f"dense: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(
            f"dense: input's last dimension must be in_features = weight.shape[1] = {in_features}, "
            f"got input of shape {tuple(input.shape)}"
        )
    if bias is not None:
        require_like("dense", "bias", bias, "input", input)
        if bias.shape != (out_features,):
            raise ValueError(
                f"dense: bias must have shape (out_features,) = ({out_features},), got {tuple(bias.shape)}"
            )
    rows = math.prod(input.shape[:-1])  # not -1: ambiguous when in_features is 0
    output = DenseFunction.apply(input.reshape(rows, in_features), weight, bias, activation == "relu")
    return output.reshape(*input.shape[:-1], out_features)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Rectified linear unit, ``max(input, 0)`` elementwise; twin of ``F.relu``.

    Args:
        input: tensor of any shape ``(*)``, any strides, a floating-point or
            integer dtype.
        inplace: write the result into ``input`` and return it.

    Returns:
        Tensor of shape ``(*)``, the dtype of ``input``. NaN stays NaN.

    Example::

        >>> x = torch.randn(128, 512, requires_grad=True)
        >>> y = torchblocks.functional.relu(x)
        >>> y.sum().backward()  # x.grad == (y > 0)
    """
    require_tensor("relu", "input", input)
    require_real("relu", "input", input)
    require_bool("relu", "inplace", inplace)
    return ReLUFunction.apply(input, inplace)
