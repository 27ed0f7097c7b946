"""The layout sweep: every block, every tensor argument (the gradient of the
output included) in every memory layout, against the native twin, on every
target. Each argument reaches the op exactly as built (``testing.parity``
hands over same-layout twins); the others are contiguous."""

import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import torchblocks
from torchblocks.testing import LAYOUTS, assert_parity, with_layout


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def labels(classes, *shape, seed=1, ignored=True):
    target = torch.randint(classes, shape, generator=torch.Generator().manual_seed(seed))
    if ignored:
        target.view(-1)[1] = -100
    return target


@dataclasses.dataclass
class Block:
    ours: Callable
    native: Callable
    args: dict  # name -> contiguous values, in call order
    no_grad: tuple = ()  # floating-point arguments that take no gradient
    output_shape: tuple = None  # the shape of the gradient of the output; None: a scalar loss, not swept
    # whether the compiled eager path takes the call with (argument, layout);
    # the cases it does not are marked python_path (no reference-cpu variant)
    compiled: Callable = lambda argument, layout: True


def never(argument, layout):
    """The compiled eager path takes none of the block's calls."""
    return False


BLOCKS = {
    "relu": Block(torchblocks.functional.relu, F.relu, {"input": randn(6, 5)}, output_shape=(6, 5)),
    "dense": Block(
        lambda x, w, b: torchblocks.functional.dense(x, w, b),
        F.linear, {"input": randn(6, 5), "weight": randn(4, 5, seed=1), "bias": randn(4, seed=2)},
        output_shape=(6, 4)),
    "dense relu": Block(
        lambda x, w, b: torchblocks.functional.dense(x, w, b, activation="relu"),
        lambda x, w, b: F.relu(F.linear(x, w, b)),
        {"input": randn(6, 5), "weight": randn(4, 5, seed=1), "bias": randn(4, seed=2)}, output_shape=(6, 4)),
    "cross_entropy indices": Block(
        lambda x, t, w: torchblocks.functional.softmax_cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
        lambda x, t, w: F.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
        {"input": 3 * randn(6, 5), "target": labels(5, 6), "weight": randn(5, seed=3).abs()},
        no_grad=("weight",), output_shape=(6,), compiled=never),  # weight, smoothing, ignored rows
    "cross_entropy plain indices": Block(  # no option used, none ignored: the compiled eager path's case
        lambda x, t: torchblocks.functional.softmax_cross_entropy(x, t, reduction="none"),
        lambda x, t: F.cross_entropy(x, t, reduction="none"),
        {"input": 3 * randn(6, 5), "target": labels(5, 6, ignored=False)}, output_shape=(6,),
        # the logits and labels are read through their pointers: a lazy negation takes the Python path
        compiled=lambda argument, layout: layout != "negated" or argument == "grad_output"),
    "cross_entropy (N, C, d) indices": Block(
        lambda x, t: torchblocks.functional.softmax_cross_entropy(x, t, reduction="none"),
        lambda x, t: F.cross_entropy(x, t, reduction="none"),
        {"input": 3 * randn(3, 5, 4), "target": labels(5, 3, 4)}, output_shape=(3, 4), compiled=never),
    "cross_entropy probabilities": Block(
        lambda x, t, w: torchblocks.functional.softmax_cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
        lambda x, t, w: F.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
        {"input": 3 * randn(6, 5), "target": randn(6, 5, seed=4).softmax(dim=1), "weight": randn(5, seed=3).abs()},
        output_shape=(6,), compiled=never),
    "dense_cross_entropy": Block(
        lambda x, w, b, t: torchblocks.functional.dense_cross_entropy(x, w, t, b, reduction="none", chunk_rows=4),
        lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t, reduction="none"),
        {"input": randn(6, 5), "weight": randn(7, 5, seed=1), "bias": randn(7, seed=2), "target": labels(7, 6)},
        output_shape=(6,), compiled=never),  # reduction "none"
    "dense_cross_entropy mean": Block(
        lambda x, w, b, t: torchblocks.functional.dense_cross_entropy(x, w, t, b, chunk_rows=4),
        lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t),
        {"input": randn(6, 5), "weight": randn(7, 5, seed=1), "bias": randn(7, seed=2), "target": labels(7, 6)},
        # a row is ignored, but for the expanded target: every row the first label, which is not
        compiled=lambda argument, layout: (argument, layout) == ("target", "expanded")),
}

SWEEP = [
    pytest.param(block, argument, layout, id=f"{block}-{argument}-{layout}",
                 marks=() if spec.compiled(argument, layout) else pytest.mark.python_path)
    for block, spec in BLOCKS.items()
    for argument in [*spec.args, *(["grad_output"] if spec.output_shape else [])]
    for layout in LAYOUTS if layout != "contiguous"
]


@pytest.mark.parametrize("block, argument, layout", SWEEP)
def test_every_argument_in_every_layout(target, block, argument, layout):
    spec = BLOCKS[block]
    args = {name: value.to(target.device) for name, value in spec.args.items()}
    grad_output = randn(*spec.output_shape, seed=9).to(target.device) if spec.output_shape else None
    if argument == "grad_output":
        grad_output = with_layout(grad_output, layout)
        built = grad_output
    else:
        args[argument] = built = with_layout(args[argument], layout)
    assert not built.is_contiguous() or built.storage_offset() > 0 or built.is_neg()
    assert_parity(
        spec.ours, spec.native, list(args.values()), what=f"{block}, {argument} {layout}",
        grad_inputs=[value.is_floating_point() and name not in spec.no_grad for name, value in args.items()],
        grad_outputs=[grad_output] if grad_output is not None else None,
    )


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout not in ("expanded", "negated")])
def test_relu_in_place_on_every_layout(target, layout):
    """In place on a view of a non-leaf in each layout; the gradient reaches the leaf."""
    view = with_layout(randn(6, 5).to(target.device), layout)
    size, stride, offset = view.shape, view.stride(), view.storage_offset()
    storage = view.new_empty(0).set_(view.untyped_storage(), 0, (view.untyped_storage().nbytes() // view.element_size(),), (1,))

    def in_place(relu):
        return lambda flat: relu((flat * 1).as_strided(size, stride, offset), inplace=True)

    assert_parity(in_place(torchblocks.functional.relu), in_place(F.relu), [storage], what=f"in place, {layout}")


def test_relu_in_place_through_a_lazy_negation(target):
    """In place on a tensor with torch._neg_view's negative bit: the result
    is written through the negation, as native writes it."""
    def in_place(relu):
        return lambda x: relu(torch._neg_view(x * 1), inplace=True)

    assert_parity(in_place(torchblocks.functional.relu), in_place(F.relu), [randn(6, 5).to(target.device)],
                  what="in place, negated")


@pytest.mark.python_path  # in place, two elements sharing memory
def test_in_place_relu_on_an_expanded_tensor_raises_like_native(target):
    for relu in (torchblocks.functional.relu, F.relu):
        x = torch.zeros(1, device=target.device).expand(4)
        with pytest.raises(RuntimeError, match="memory location"):
            relu(x, inplace=True)


def test_parity_harness_hands_over_the_layout_as_built():
    """A wrong stride or a no-op in the op under test must be caught."""
    x = with_layout(randn(6, 5), "transposed")
    seen = []
    assert_parity(lambda t: seen.append((t.stride(), t.storage_offset())) or F.relu(t), F.relu, [x])
    assert seen == [(x.stride(), x.storage_offset())]
    with pytest.raises(AssertionError, match="gradient of input 0"):
        assert_parity(lambda t: F.relu(t.detach()), F.relu, [x])
    with pytest.raises(AssertionError, match="output"):
        assert_parity(lambda t: F.relu(t.contiguous().view(-1)[:30].view(5, 6).t()), F.relu, [x])
