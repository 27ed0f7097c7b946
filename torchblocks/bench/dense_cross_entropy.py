"""The fused Dense + cross-entropy head against ``F.cross_entropy(F.linear(...))``:
TFLOP/s against the GEMM peak, and the memory the (N, C) logits would take."""

import torch
import torch.nn.functional as F

from torchblocks.bench.harness import Case, generator, training_step
from torchblocks.functional import dense_cross_entropy

GEMMS = 3  # logits = x W^T; dx = g W; dW = g^T x


def native_head(x, weight, target):
    return F.cross_entropy(F.linear(x, weight), target)


def shapes(device: str, quick: bool):
    """(N, K, C): rows, hidden size, classes."""
    if quick:
        return [(128, 64, 2048)]
    if device == "cuda":
        return [(8192, 4096, 32768), (8192, 4096, 65536), (8192, 4096, 131072)]
    return [(512, 256, 1000), (512, 256, 8000), (512, 256, 32000)]


def cases(device: str, dtype: torch.dtype, quick: bool):
    """x and W need gradients; targets are class indices.

    Example::

        >>> rows = harness.measure(next(cases("cuda", torch.bfloat16, quick=True)), "cuda", torch.bfloat16, peak=3000.0)
    """
    for rows, hidden, classes in shapes(device, quick):
        def make_inputs(seed, provider, rows=rows, hidden=hidden, classes=classes):
            random = generator(device, seed)
            x = torch.randn(rows, hidden, generator=random, device=device, dtype=dtype).requires_grad_()
            weight = torch.randn(classes, hidden, generator=random, device=device, dtype=dtype) / hidden**0.5
            target = torch.randint(classes, (rows,), generator=random, device=device)
            return (x, weight.requires_grad_(), target), (x, weight), None

        providers = {"torchblocks": training_step(dense_cross_entropy), "native": training_step(native_head),
                     "compiled": training_step(torch.compile(native_head))}
        flops = GEMMS * 2 * rows * hidden * classes
        yield Case("dense_cross_entropy", f"N={rows} K={hidden} C={classes}", classes, "classes", flops, "TFLOP/s",
                   make_inputs, providers, matmul=True)
