"""Comparison against a native twin: the one table of tolerances and the one
error measure shared by ``torchblocks check`` and the test suite."""

import torch

# Largest allowed ||actual - expected|| / ||expected||, by dtype.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
# float32 matmuls that run in TF32 on a GPU.
TF32_TOLERANCE = 1e-3


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance for results of ``dtype`` (0 for integers: exact)."""
    return TOLERANCES.get(dtype, 0.0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` over the finite entries, in
    float64; ``inf`` when shapes differ or the non-finite entries (NaN, +inf,
    -inf) are not in the same places. An all-zero ``expected`` makes any
    difference infinite.

    Example::

        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
        0.0
    """
    if actual.shape != expected.shape:
        return float("inf")
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return float("inf")
    if not torch.equal(actual[~finite].nan_to_num(), expected[~finite].nan_to_num()):
        return float("inf")
    difference = (actual[finite] - expected[finite]).norm().item()
    if difference == 0.0:
        return 0.0
    return difference / max(expected[finite].norm().item(), torch.finfo(torch.float64).tiny)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, what: str = "output"):
    """Assert ``relative_error(actual, expected) <= tolerance(dtype)``, with a
    message that says what differed, by how much, and where the largest
    difference is. ``dtype`` defaults to ``expected.dtype``."""
    dtype = dtype or expected.dtype
    error, allowed = relative_error(actual, expected), tolerance(dtype)
    if error <= allowed:
        return
    detail = f"shapes {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if actual.shape == expected.shape and actual.numel():
        gap = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().nan_to_num(float("inf"))
        where = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape))
        detail = f"largest difference at {where}: {actual[where].item()!r} vs expected {expected[where].item()!r}"
    raise AssertionError(f"{what}: relative error {error:.3g} > {allowed:g} for {dtype}; {detail}")
