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
