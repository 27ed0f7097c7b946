"""The fused Dense + cross-entropy head against ``F.cross_entropy(F.linear(...))``:
TFLOP/s against the GEMM peak, and the memory the (N, C) logits would take."""

import torch
import torch.nn.functional as F

from torchblocks._ops.dense_cross_entropy import default_chunk_rows
from torchblocks.cli.bench.harness import Case, block_providers, generator
from torchblocks.functional import dense_cross_entropy

GEMMS = 3  # logits = x W^T; dx = g W; dW = g^T x


def bytes_moved(rows: int, hidden: int, classes: int, dtype: torch.dtype):
    """(minimum, ours) bytes of a forward + backward ("mean", no bias).
    Minimum, with no logits in memory: x and W read, dx and dW written, the
    targets read: 2NK + 2CK elements + 8N bytes. Ours, per chunk of rows
    (``default_chunk_rows``), each GEMM operand once: the chunk's logits
    written by the GEMM, read and overwritten with their gradient by the
    cross-entropy kernel, read by the dx and the dW GEMMs (5 per element);
    x read twice and dx written; W read twice per chunk; the float32 dW
    accumulator written by the first chunk and read and written by the
    others, then converted to a 16-bit W's dtype; the backward scales dx and dW in
    place (read and write each)."""
    chunk = default_chunk_rows(rows, hidden, classes)
    chunks = -(-rows // chunk)
    size, accumulator = dtype.itemsize, 8 if dtype == torch.float64 else 4
    minimum = (2 * rows * hidden + 2 * classes * hidden) * size + 8 * rows
    ours = (5 * rows * classes + 3 * rows * hidden + 2 * chunks * classes * hidden) * size + 8 * rows
    ours += (2 * chunks - 1) * classes * hidden * accumulator
    if accumulator != size:  # dW converted to W's dtype
        ours += classes * hidden * (accumulator + size)
    ours += 2 * (rows * hidden + classes * hidden) * size
    return minimum, ours


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

        providers = block_providers(dense_cross_entropy, native_head)
        flops = GEMMS * 2 * rows * hidden * classes
        minimum, ours = bytes_moved(rows, hidden, classes, dtype)
        yield Case("dense_cross_entropy", f"N={rows} K={hidden} C={classes}", classes, "classes", flops, "TFLOP/s",
                   make_inputs, providers, matmul=True, min_bytes=minimum, our_bytes=ours)
