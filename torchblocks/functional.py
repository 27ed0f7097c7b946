"""The functional forms of the torchblocks blocks: the public calls of SPEC.md.

Each checks its arguments first, then hands over to the autograd Function of
its block in ``torchblocks._ops``.
"""

import torch

from torchblocks._ops.relu import ReLUFunction
from torchblocks._validate import require_bool, require_real, require_tensor

__all__ = ["relu"]


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
