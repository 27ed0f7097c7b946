"""Modules built on ``torchblocks.functional``: drop-in twins of ``torch.nn``."""

import torch
from torch import nn

from torchblocks import functional as F

__all__ = ["ReLU"]


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
