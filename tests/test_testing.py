"""The test helpers of torchblocks.testing that the suite leans on: each must
be able to fail."""

import pytest
import torch

from torchblocks import testing


def test_the_host_read_guard_catches_each_kind_of_read():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: float(x.sum()), lambda: bool(x.sum()), lambda: x.tolist(),
                 lambda: x.to("cpu"), lambda: x.to(torch.device("cpu")), lambda: x.cpu(), lambda: x.numpy()):
        with pytest.raises(testing.HostRead), testing.no_host_reads():
            read()
    with testing.no_host_reads():  # device-side work passes
        x.mul_(2).add_(x.sum())
        x.to(torch.float64)


@pytest.mark.parametrize("layout", testing.LAYOUTS)
def test_with_layout_keeps_the_values_in_the_layout_it_names(layout):
    values = torch.arange(12.0).reshape(3, 4)
    built = testing.with_layout(values, layout)
    expected_values = values[:, :1].expand(3, 4) if layout == "expanded" else values
    assert torch.equal(built, expected_values)
    assert built.is_contiguous() == (layout in ("contiguous", "offset", "negated"))
    assert (built.storage_offset() == 5) == (layout == "offset")
    assert built.is_neg() == (layout == "negated")
    assert torch.equal(testing.twin(built), expected_values) and testing.twin(built).is_neg() == built.is_neg()


def test_half_precision_has_no_fixed_tolerance():
    for dtype in testing.HALF_DTYPES:
        with pytest.raises(ValueError, match="twin rule"):
            testing.tolerance(dtype)


@pytest.mark.parametrize("dtype", testing.HALF_DTYPES, ids=str)
def test_parity_holds_16_bits_to_the_twin_rule(dtype):
    """A 16-bit result as close to float64 as native's passes; one rounded
    once more than native's (a linear summed over K in three 16-bit parts,
    as a 16-bit accumulator would) fails, although it is well within the
    fixed 1e-2 the twin rule replaced."""
    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in [(64, 96), (32, 96)])

    def in_three_parts(x, w):
        return sum(torch.nn.functional.linear(x[:, k:k + 32], w[:, k:k + 32]) for k in range(0, 96, 32))

    assert testing.parity(torch.nn.functional.linear, torch.nn.functional.linear, [x, w]).ok
    report = testing.parity(in_three_parts, torch.nn.functional.linear, [x, w])
    assert not report.comparisons[0].ok and report.comparisons[0].error < 1e-2


def test_the_twin_rule_on_non_finite_results():
    """Native's infinities and NaN must be ours, except where native
    overflowed on the way and the float64 result rounds to a finite value:
    there ours may be finite, and is then held to that float64 value."""
    exact = torch.tensor([1e5, 2.0, float("nan"), 3.0], dtype=torch.float64)
    native = torch.tensor([float("inf"), 2.0, float("nan"), float("inf")], dtype=torch.float16)
    overflowed = torch.tensor([float("inf"), 2.0, float("nan"), 3.0], dtype=torch.float16)  # 1e5 > max of float16
    assert testing.compare(native, native, exact=exact).ok
    assert testing.compare(overflowed, native, exact=exact).ok
    for wrong in ([float("inf"), 2.0, 0.0, 3.0], [float("inf"), float("inf"), float("nan"), 3.0],
                  [float("inf"), 2.0, float("nan"), 3.5]):
        assert not testing.compare(torch.tensor(wrong, dtype=torch.float16), native, exact=exact).ok, wrong

def test_assert_rejected_like_native_fails_on_a_wrong_type_or_message():
    def raising(error):
        def call():
            raise error
        return call

    for error in (ValueError, NotImplementedError):
        testing.assert_rejected_like_native(raising(error("x: expected 3")), raising(error("native")), "x: expected")
    for ours, native in [(raising(ValueError("other")), raising(ValueError("native"))),
                         (lambda: None, raising(ValueError("native"))),
                         (raising(TypeError("x: expected 3")), raising(ValueError("native"))),
                         (raising(RuntimeError("x: expected 3")), raising(NotImplementedError("native"))),
                         (raising(ValueError("x: expected 3")), lambda: None)]:
        with pytest.raises(AssertionError):
            testing.assert_rejected_like_native(ours, native, "x: expected")
