"""Numerical conventions shared by the host code and the kernels' launchers."""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and softmax statistics are computed in: float32 for
    float16/bfloat16/float32 tensors, float64 for float64.

    Example::

        >>> accumulation_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
