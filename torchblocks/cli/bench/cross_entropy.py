"""Softmax cross-entropy forward + backward against ``F.cross_entropy``: GB/s against the copy peak."""

import torch
import torch.nn.functional as F

from torchblocks.cli.bench.harness import Case, block_providers, generator
from torchblocks.functional import softmax_cross_entropy

LOGITS_MOVED = 3  # forward reads the logits; backward reads them again and writes their gradient


def our_bytes(rows: int, classes: int, dtype: torch.dtype) -> int:
    """What the two kernels move: the logits three times (one online pass in
    the forward), the int64 targets twice, and per row the loss, lse and
    target weight written, the lse read back, loss and weights summed (in
    float32, float64 for float64 logits)."""
    per_row = 8 if dtype == torch.float64 else 4
    return LOGITS_MOVED * rows * classes * dtype.itemsize + 2 * 8 * rows + 6 * per_row * rows


def native_cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def shapes(device: str, quick: bool):
    """(N, C) pairs: a 1,000-class head, then vocabulary-sized ones on CUDA,
    and on the CPU the book's 10 classes first."""
    if quick:
        return [(1024, 1000)]
    if device == "cuda":
        return [(4096, 1000), (8192, 32768), (8192, 65536), (8192, 131072)]
    return [(128, 10), (1024, 1000), (4096, 1000), (4096, 8192)]


def cases(device: str, dtype: torch.dtype, quick: bool):
    """Mean reduction over class-index targets; the logits are the leaf that needs a gradient.

    Example::

        >>> rows = harness.measure(next(cases("cuda", torch.bfloat16, quick=True)), "cuda", torch.bfloat16, peak=3000.0)
    """
    for rows, classes in shapes(device, quick):
        def make_inputs(seed, provider, rows=rows, classes=classes):
            random = generator(device, seed)
            logits = torch.randn(rows, classes, generator=random, device=device, dtype=dtype).requires_grad_()
            target = torch.randint(classes, (rows,), generator=random, device=device)
            return (logits, target), (logits,), None

        providers = block_providers(softmax_cross_entropy, native_cross_entropy)
        logits_bytes = rows * classes * dtype.itemsize
        minimum = LOGITS_MOVED * logits_bytes + 8 * rows  # and the targets, once
        yield Case("cross_entropy", f"N={rows} C={classes}", logits_bytes / 2**20, "MiB of logits",
                   LOGITS_MOVED * logits_bytes, "GB/s", make_inputs, providers, min_bytes=minimum,
                   our_bytes=our_bytes(rows, classes, dtype))
