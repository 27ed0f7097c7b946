"""What the launchers and the host side (``torchblocks._ops``, ``torchblocks.backend``)
share, defined once; the one module of this package that does not import triton."""

import os

import torch

# The Triton interpreter is chosen when triton's kernels are defined, that is
# when this package's kernel modules are first imported: read it once, here.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and softmax statistics are computed in: float32 for
    float16/bfloat16/float32 tensors, float64 for float64.

    Example::

        >>> accumulation_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
