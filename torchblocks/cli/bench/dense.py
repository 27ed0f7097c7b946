"""Dense (+ fused ReLU) forward + backward against ``F.relu(F.linear(...))``: TFLOP/s against the GEMM peak."""

import torch
import torch.nn.functional as F

from torchblocks.cli.bench.harness import Case, block_providers, generator
from torchblocks.functional import dense

GEMMS = 3  # y = x W^T forward; dx = g W and dW = g^T x backward


def bytes_moved(m: int, n: int, k: int, itemsize: int):
    """(minimum, ours) bytes of a forward + backward with bias and ReLU.
    Minimum: x, W, b, dy and y read once each way they are needed (x, W
    twice), y, dx, dW, db written once: 3MK + 3NK + 3MN + 2N elements.
    Ours, each GEMM operand once: the forward (MK + NK + N + MN), the ReLU
    mask g = dy * 1[y > 0] (3MN), dx = g W (MN + NK + MK) and dW, db from one
    pass over g (MN + MK + NK + N): 3MK + 3NK + 6MN + 2N."""
    minimum = 3 * m * k + 3 * n * k + 3 * m * n + 2 * n
    ours = 3 * m * k + 3 * n * k + 6 * m * n + 2 * n
    return minimum * itemsize, ours * itemsize


def native_dense(x, weight, bias):
    return F.relu(F.linear(x, weight, bias))


def ours_dense(x, weight, bias):
    return dense(x, weight, bias, activation="relu")


def shapes(device: str, quick: bool):
    """(M, N, K): the book's layers (128 x 512 x 784, 128 x 10 x 512), then squares unless ``quick``."""
    yield 128, 512, 784
    if not quick:
        yield 128, 10, 512
    squares = [] if quick else ([1024, 2048, 4096, 8192] if device == "cuda" else [256, 512, 1024, 2048])
    for size in squares:
        yield size, size, size


def cases(device: str, dtype: torch.dtype, quick: bool):
    """One case per shape; x, W and b all need gradients (three GEMMs a pass).

    Example::

        >>> rows = harness.measure(next(cases("cuda", torch.bfloat16, quick=True)), "cuda", torch.bfloat16, peak=3000.0)
    """
    for m, n, k in shapes(device, quick):
        def make_inputs(seed, provider, m=m, n=n, k=k):
            random = generator(device, seed)
            x = torch.randn(m, k, generator=random, device=device, dtype=dtype).requires_grad_()
            weight = (torch.randn(n, k, generator=random, device=device, dtype=dtype) / k**0.5).requires_grad_()
            bias = torch.randn(n, generator=random, device=device, dtype=dtype).requires_grad_()
            grad_output = torch.randn(m, n, generator=random, device=device, dtype=dtype)
            return (x, weight, bias), (x, weight, bias), grad_output

        providers = block_providers(ours_dense, native_dense)
        flops = GEMMS * 2 * m * n * k
        minimum, ours = bytes_moved(m, n, k, dtype.itemsize)
        yield Case("dense", f"M={m} N={n} K={k}", flops / 1e9, "GFLOP per pass", flops, "TFLOP/s", make_inputs, providers,
                   matmul=True, min_bytes=minimum, our_bytes=ours)
