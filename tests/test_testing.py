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

def _off_by(values: torch.Tensor, where, amount: float) -> torch.Tensor:
    wrong = values.clone()
    wrong[where] += amount
    return wrong


def _hidden_by_the_norm(comparison) -> bool:
    """Failed, by the row check alone: the norm-wise error is within bounds."""
    return not comparison.ok and comparison.error <= comparison.allowed and comparison.row_error > comparison.row_allowed


@pytest.mark.parametrize("dtype, huge", [(torch.float64, 6e38), (torch.float32, 3e38)], ids=str)
def test_a_wrong_loss_beside_a_huge_one_fails(dtype, huge):
    """Per-sample losses (reduction="none") with one of 6e38: the norm-wise
    error of a loss off by 5 nats is 1e-38, which any tolerance passes."""
    losses = torch.tensor([huge, 1.0, 2.0, 3.0], dtype=dtype)
    comparison = testing.compare(_off_by(losses, 1, 5.0), losses)
    assert _hidden_by_the_norm(comparison), comparison
    assert "row (1,): 6.0 vs expected 1.0" in comparison.detail
    with pytest.raises(AssertionError, match=r"worst row 1\.67"):  # 5 / max(1, 3), the typical loss
        testing.assert_close(_off_by(losses, 1, 5.0), losses)


@pytest.mark.parametrize("dtype", testing.HALF_DTYPES, ids=str)
def test_a_wrong_16_bit_loss_beside_a_huge_one_fails_the_twin_rule(dtype):
    """The same under the twin rule: native's losses are the float64 ones
    rounded once (the closest any result can be), one of them near the
    dtype's largest; ours has another off by 5."""
    huge = torch.finfo(dtype).max / 2
    exact = torch.tensor([huge, 1.0, 2.0, 3.0], dtype=torch.float64).to(dtype).double()
    native = exact.to(dtype)
    comparison = testing.compare(_off_by(native, 2, 5.0), native, exact=exact)
    assert _hidden_by_the_norm(comparison), comparison
    assert "row (2,): 7.0 vs expected 2.0 in float64, native 2.0" in comparison.detail
    assert testing.compare(native, native, exact=exact).ok


def test_a_wrong_row_beside_a_huge_row_fails():
    """(N, C): row 0 of 1e30 hides an element of row 5 off by 5 from the
    norm-wise error; the detail names the row and its worst element."""
    expected = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    expected[0] *= 1e30
    comparison = testing.compare(_off_by(expected, (5, 3), 5.0), expected)
    assert _hidden_by_the_norm(comparison), comparison
    assert "row (5,), worst at (5, 3)" in comparison.detail
    report = testing.parity(lambda x: _off_by(x, (5, 3), 5.0), lambda x: x + 0, [expected], grad_inputs=[False])
    assert not report.ok and "row (5,)" in str(report)


def test_correct_values_near_zero_pass_the_row_check():
    """Rounding a correct computation errs on the scale of the terms, not of
    a result near zero: a gradient of 1e-8 where native has 0, a sum that
    cancels to 1e-6 computed in another order, a zero row of a masked
    target rounded to 1e-20. Each is far off relative to itself, and passes."""
    generator = torch.Generator().manual_seed(0)
    gradient = torch.randn(100, generator=generator)
    gradient[7] = 0.0
    assert testing.compare(_off_by(gradient, 7, 1e-8), gradient).ok

    terms = torch.randn(16, 512, generator=generator)
    terms[3] -= terms[3].mean()  # row 3 sums to about 0
    native, ours = terms.sum(dim=-1), terms.flip(-1).cumsum(dim=-1)[:, -1]
    assert (ours[3] - native[3]).abs() > 0.01 * native[3].abs()
    assert testing.compare(ours, native).ok

    rows = torch.randn(6, 10, generator=generator)
    rows[::2] = 0.0  # half the rows ignored: exact zeros, kept out of the typical scale
    assert testing.compare(_off_by(rows, (2, 4), 1e-20), rows).ok


def test_a_cancelled_entry_of_a_large_block_is_judged_at_its_scale():
    """GPT-2's fused q, k, v bias: its gradient has blocks of about 1e-12, 1e-6
    and 1e-3, and an entry of the last that cancels to about 0 errs on the
    scale of that block's terms (here a relative 1e-6 on each, as an
    upstream gradient's rounding carries). The median of the entries, 1e-5,
    would fail it; the 90th percentile is the scale of the large block."""
    generator = torch.Generator().manual_seed(0)
    terms = torch.randn(96, 256, generator=generator, dtype=torch.float64)
    terms *= torch.tensor([1e-12, 1e-6, 1e-3], dtype=torch.float64).repeat_interleave(32)[:, None]
    terms[68] -= terms[68].mean()
    native = terms.sum(dim=-1).float()
    ours = (terms * (1 + 1e-6 * torch.randn(terms.shape, generator=generator, dtype=torch.float64))).sum(-1).float()
    median_scale = max(native[68].abs(), native.abs().median())
    assert (ours - native)[68].abs() > testing.tolerance(torch.float32) * 96 ** 0.5 * median_scale
    assert testing.compare(ours, native).ok


@pytest.mark.parametrize("dtype", testing.HALF_DTYPES, ids=str)
def test_the_twin_rule_row_check_takes_rounding_that_lands_in_other_rows(dtype):
    """Two 16-bit products of three matrices, each rounding its intermediate
    once, (x W1) W2 against x (W1 W2): equally close to float64, but their
    errors land in different rows of 4. Native's error in the very row
    would be the wrong bound (ours' worst row exceeds it, by the twin
    allowance of that row alone, in some of these seeds); native's row
    errors together are the bound."""
    generator = torch.Generator().manual_seed(0)
    over_the_very_row = 0
    for _ in range(20):
        x, w1, w2 = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).double() / 4
                     for shape in [(64, 32), (24, 32), (4, 24)])
        exact = x @ w1.T @ w2.T
        ours = ((x @ w1.T).to(dtype).double() @ w2.T).to(dtype)
        native = (x @ (w1.T @ w2.T).to(dtype).double()).to(dtype)
        comparison = testing.compare(ours, native, exact=exact)
        assert comparison.row_error <= comparison.row_allowed, comparison
        native_rows = torch.maximum(testing.row_errors(native, exact), testing.row_errors(exact.to(dtype), exact))
        over_the_very_row += bool((testing.row_errors(ours, exact) >
                                   testing.twin_allowance(native_rows, dtype, elements=4)).any())
    assert over_the_very_row > 0


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
