"""ReLU forward + backward against ``torch.relu``: bandwidth-bound, so GB/s against the copy peak."""

import torch

from torchblocks.cli.bench.harness import Case, block_providers, generator
from torchblocks.functional import relu

TENSORS_MOVED = 5  # forward reads x, writes y; backward reads dy and y, writes dx


def native_relu(x):
    return torch.relu(x)


def cases(device: str, dtype: torch.dtype, quick: bool):
    """x of 1 MiB up to 1 GiB (CUDA) or 256 MiB (CPU); 4 MiB when ``quick``.

    Example::

        >>> rows = harness.measure(next(cases("cuda", torch.bfloat16, quick=True)), "cuda", torch.bfloat16, peak=3000.0)
    """
    sizes_mib = [4] if quick else [1, 4, 16, 64, 256] + ([1024] if device == "cuda" else [])
    for mib in sizes_mib:
        elements = mib * 2**20 // dtype.itemsize

        def make_inputs(seed, provider, elements=elements):
            random = generator(device, seed)
            x = torch.randn(elements, generator=random, device=device, dtype=dtype).requires_grad_()
            grad_output = torch.randn(elements, generator=random, device=device, dtype=dtype)
            return (x,), (x,), grad_output

        providers = block_providers(relu, native_relu)
        moved = TENSORS_MOVED * elements * dtype.itemsize
        yield Case("relu", f"{mib} MiB", mib, "MiB of x", moved, "GB/s", make_inputs, providers,
                   min_bytes=moved, our_bytes=moved)
