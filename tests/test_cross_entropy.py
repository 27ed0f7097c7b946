import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchblocks
from torchblocks.testing import (assert_close, assert_compiled_matches_eager, assert_parity,
                                assert_rejected_like_native, tolerance)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FORMS = {"(C)": ((7,), ()), "(N, C)": ((6, 7), (6,)), "(N, C, d1, d2)": ((2, 7, 3, 2), (2, 3, 2))}
# The compiled eager path takes plain (N, C) logits with class indices, none
# ignored, no weight, no label smoothing, no inplace_backward: a case or test
# with any other marked python_path, its reference-cpu variant not generated.
PYTHON_PATH = pytest.mark.python_path
FORM_CASES = [pytest.param(form, marks=() if form == "(N, C)" else PYTHON_PATH) for form in FORMS]


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def index_target(shape, classes, device, ignore=False, seed=1):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(classes, shape, generator=generator)
    if ignore and target.dim():
        target.view(-1)[::3] = -100
    return target.to(device)


def probability_target(shape, device, dtype, seed=2):
    return randn(*shape, dtype=dtype, device=device, seed=seed).softmax(dim=1 if len(shape) > 1 else 0)


def check_against_native(x, target, **options):
    """The loss, and the gradients of the logits, of probability targets and
    of their class weights, against F.cross_entropy; every tensor as built."""
    inplace = options.pop("inplace_backward", False)
    weight = options.pop("weight", None)
    probabilities = target.is_floating_point()

    def ours(x, target, weight=None):
        return torchblocks.functional.softmax_cross_entropy(x * 1 if inplace else x, target, weight,
                                                            inplace_backward=inplace, **options)

    def native(x, target, weight=None):
        return F.cross_entropy(x, target, weight, **options)

    inputs = [x, target] + ([weight] if weight is not None else [])
    assert_parity(ours, native, inputs, grad_inputs=[True, probabilities, probabilities][:len(inputs)])


INDEX_OPTIONS = [
    pytest.param(*options, id="-".join(map(str, options)), marks=PYTHON_PATH if any(options[1:]) else ())
    for options in itertools.product(["none", "mean", "sum"], [False, True], [False, True], [0.0, 0.25])
]
PROBABILITY_OPTIONS = list(itertools.product(["none", "mean", "sum"], [False, True], [0.0, 0.25]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORM_CASES)
@pytest.mark.parametrize("reduction, weighted, ignore, smoothing", INDEX_OPTIONS)
def test_parity_index_targets(target, form, dtype, reduction, weighted, ignore, smoothing):
    input_shape, target_shape = FORMS[form]
    classes = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    options = {"reduction": reduction, "label_smoothing": smoothing}
    if weighted:
        options["weight"] = randn(classes, dtype=dtype, device=target.device, seed=3).abs()
    check_against_native(randn(*input_shape, dtype=dtype, device=target.device),
                         index_target(target_shape, classes, target.device, ignore), **options)


@PYTHON_PATH  # probabilities
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction, weighted, smoothing", PROBABILITY_OPTIONS, ids=lambda v: str(v))
def test_parity_probability_targets(target, form, dtype, reduction, weighted, smoothing):
    input_shape, _ = FORMS[form]
    classes = input_shape[0] if len(input_shape) == 1 else input_shape[1]
    options = {"reduction": reduction, "label_smoothing": smoothing}
    if weighted:
        options["weight"] = randn(classes, dtype=dtype, device=target.device, seed=3).abs()
    check_against_native(randn(*input_shape, dtype=dtype, device=target.device),
                         probability_target(input_shape, target.device, dtype), **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 2, 4099], ids=lambda c: f"C={c}")
@pytest.mark.parametrize("smoothing", [0.0, pytest.param(0.1, marks=PYTHON_PATH)])
def test_row_lengths(target, classes, smoothing, dtype):
    # 4099 is longer than one chunk of the kernel (MAX_BLOCK_C = 4096); in
    # float16 native's smoothing term overflows there, and ours stays finite
    check_against_native(randn(3, classes, dtype=dtype, device=target.device),
                         index_target((3,), classes, target.device), label_smoothing=smoothing)


@PYTHON_PATH  # ignored rows
@pytest.mark.parametrize("classes", [3, 10, 32, 300], ids=lambda c: f"C={c}")
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace_backward"])
@pytest.mark.parametrize("weighted, smoothing", [(False, 0.0), (True, 0.1)], ids=["plain", "weighted-smoothed"])
def test_short_rows_several_to_a_program(target, classes, inplace, weighted, smoothing):
    # short rows are tiled several to a program: 200 rows end in a partial
    # block whatever the block size, and the rows ignored, weighted, strided
    # (every other column) land in every position of a block
    x = randn(200, 2 * classes, device=target.device)[:, ::2]
    weight = randn(classes, device=target.device, seed=3).abs() if weighted else None
    check_against_native(x, index_target((200,), classes, target.device, ignore=True), weight=weight,
                         label_smoothing=smoothing, reduction="none", inplace_backward=inplace)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, pytest.param(0.1, marks=PYTHON_PATH)])
def test_extreme_and_non_finite_logits(target, dtype, smoothing):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([
        [1e4, -1e4, 0.0], [-1e4, 1e4, 2.0], [3e38, -3e38, 1.0], [-3e38, 3e38, 0.0],
        [-inf, 0.0, 1.0], [-inf, -inf, 1.0], [-inf, -inf, -inf], [inf, 0.0, 1.0], [nan, 0.0, 1.0],
    ], dtype=dtype, device=target.device)
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 1, 2, 1], device=target.device)
    check_against_native(x, labels, reduction="none", label_smoothing=smoothing)
    check_against_native(x, torch.full_like(labels, -100), reduction="sum", label_smoothing=smoothing)  # NaN rows ignored
    finite_rows = x[:6]
    check_against_native(finite_rows, labels[:6], label_smoothing=smoothing)
    wide = torch.cat([x, torch.zeros(9, 16, dtype=dtype, device=target.device)], dim=1)
    check_against_native(wide, labels, reduction="none", label_smoothing=smoothing)  # within the first eight logits


def test_first_and_last_class_and_uint8_targets(target):
    x = randn(4, 9, device=target.device)
    check_against_native(x, torch.tensor([0, 8, 0, 8], device=target.device))
    check_against_native(x, torch.tensor([0, 8, 3, 8], dtype=torch.uint8, device=target.device))


@PYTHON_PATH  # ignored rows
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace_backward"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(target, reduction, inplace):
    check_against_native(randn(3, 4, device=target.device), torch.full((3,), -100, device=target.device),
                         reduction=reduction, label_smoothing=0.1, inplace_backward=inplace)
    check_against_native(randn(3, 4, device=target.device), torch.full((3,), 2, device=target.device),
                         ignore_index=2, reduction=reduction, weight=torch.rand(4, device=target.device))


@PYTHON_PATH  # no rows
def test_empty_batch(target):
    check_against_native(randn(0, 4, device=target.device), torch.zeros(0, dtype=torch.long, device=target.device))
    check_against_native(randn(0, 4, device=target.device), torch.zeros(0, dtype=torch.long, device=target.device),
                         reduction="sum")


@PYTHON_PATH  # ignored rows, weights, smoothing, probabilities
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(target, kind, reduction):
    x = randn(4, 5, dtype=torch.float64, device=target.device).requires_grad_()
    weight = randn(5, dtype=torch.float64, device=target.device, seed=3).abs()
    if kind == "index":
        labels = torch.tensor([1, -100, 4, 0], device=target.device)
        inputs = (x,)
        fn = lambda x: torchblocks.functional.softmax_cross_entropy(  # noqa: E731
            x, labels, weight, reduction=reduction, label_smoothing=0.2)
    else:
        probabilities = probability_target((4, 5), target.device, torch.float64).requires_grad_()
        inputs = (x, probabilities)
        fn = lambda x, t: torchblocks.functional.softmax_cross_entropy(  # noqa: E731
            x, t, weight, reduction=reduction, label_smoothing=0.2)
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True)


@PYTHON_PATH  # inplace_backward
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward_matches_and_reuses_the_logits_storage(target, reduction):
    x = randn(5, 6, device=target.device)
    labels = index_target((5,), 6, target.device, ignore=True)
    check_against_native(x, labels, reduction=reduction, label_smoothing=0.1, inplace_backward=True)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1
    torchblocks.functional.softmax_cross_entropy(logits, labels, reduction=reduction, inplace_backward=True)
    expected = torch.softmax(x, dim=1) - F.one_hot(labels.clamp(min=0), 6) * (labels != -100)[:, None]
    expected = expected * (labels != -100)[:, None]
    assert_close(logits.detach(), expected, what="logits storage after the forward pass (the gradient)")


@PYTHON_PATH  # inplace_backward
def test_inplace_backward_misuse_is_caught_not_wrong(target):
    x = randn(4, 5, device=target.device).requires_grad_()
    labels = index_target((4,), 5, target.device)
    logits = x.exp()  # exp saves its output for its own backward
    loss = torchblocks.functional.softmax_cross_entropy(logits, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="inplace_backward=True overwrites input with its gradient"):
        torchblocks.functional.softmax_cross_entropy(x, labels, inplace_backward=True)
    twice = torchblocks.functional.softmax_cross_entropy(x * 1, labels, inplace_backward=True)
    twice.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        twice.backward()


@PYTHON_PATH  # the reference's own functions, called directly
def test_out_of_range_index_without_a_host_check_gives_nan(target):
    # what a CUDA tensor meets below the CPU-only check: no host sync, no
    # out-of-bounds read, a NaN loss and gradient for the row
    if target.backend == "triton":
        from torchblocks.kernels.cross_entropy import cross_entropy_backward as backward
        from torchblocks.kernels.cross_entropy import cross_entropy_forward as forward
    else:
        from torchblocks._ops.cross_entropy import _reference_forward as forward
        from torchblocks._ops.cross_entropy import _reference_gradient as backward
    logits = randn(3, 4, device=target.device)
    labels = torch.tensor([1, 4, -7], device=target.device)
    loss, lse, _ = forward(logits, labels, None, -100, 0.0)
    assert loss[0].isfinite() and loss[1:].isnan().all()
    grad = backward(logits, labels, None, lse, torch.ones(3, device=target.device), -100, 0.0)
    assert grad[0].isfinite().all() and grad[1:].isnan().all()


def test_out_of_range_index_on_the_cpu_raises_index_error():
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        torchblocks.functional.softmax_cross_entropy(torch.randn(3, 5), torch.tensor([0, 7, 1]))
    with pytest.raises(IndexError, match="Target -2 is out of bounds"):
        torchblocks.functional.softmax_cross_entropy(torch.randn(3, 5), torch.tensor([0, -2, 1]))


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.randn(4, 5), torch.zeros(3, dtype=torch.long)), {},
     "softmax_cross_entropy: target of class indices must have shape (4,) for input of shape (4, 5), got (3,)"),
    ((torch.randn(2, 5, 3), torch.zeros(2, dtype=torch.long)), {},
     "softmax_cross_entropy: target of class indices must have shape (2, 3) for input of shape (2, 5, 3), got (2,)"),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.int32)), {},
     "softmax_cross_entropy: target must hold class indices (int64 or uint8) or class probabilities "
     "(floating point), got dtype torch.int32"),
    ((torch.randn(4, 5), torch.rand(4, 6)), {},
     "softmax_cross_entropy: target of class probabilities must have the shape of input (4, 5), got (4, 6)"),
    ((torch.randn(4, 5), torch.rand(4)), {},
     "got (4,); class indices must be integers (int64 or uint8: use target.long())"),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), {"weight": torch.rand(4)},
     "softmax_cross_entropy: weight must have shape (C,) = (5,), got (4,)"),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), {"weight": torch.rand(5, dtype=torch.float64)},
     "softmax_cross_entropy: weight must have the dtype of input (torch.float32), got torch.float64"),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), {"reduction": "avg"},
     "softmax_cross_entropy: reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), {"label_smoothing": 1.5},
     "softmax_cross_entropy: label_smoothing must be between 0.0 and 1.0, got 1.5"),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), {"ignore_index": 1.0},
     "softmax_cross_entropy: ignore_index must be an int, got float"),
    ((torch.ones(4, 5, dtype=torch.long), torch.zeros(4, dtype=torch.long)), {},
     "softmax_cross_entropy: input of dtype torch.int64 is not supported, as in F.cross_entropy ("),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.long, device="meta")), {},
     "softmax_cross_entropy: target must be on the device of input (cpu), got meta"),
    ((torch.tensor(1.0), torch.tensor(0)), {},
     "softmax_cross_entropy: input must have a class dimension, (C), (N, C) or (N, C, d1, ...), got a scalar"),
    ((torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), {"weight": torch.rand(5, requires_grad=True)},
     "softmax_cross_entropy: weight is not differentiable with class-index targets"),
])
def test_bad_input_is_rejected_like_native(args, kwargs, message):
    def native():
        F.cross_entropy(*args, **kwargs).backward()  # native rejects a weight that requires grad only then

    assert_rejected_like_native(lambda: torchblocks.functional.softmax_cross_entropy(*args, **kwargs), native,
                                message)


def test_out_of_range_label_smoothing_below_zero_means_none_as_in_native():
    x, labels, probabilities = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.rand(4, 5).softmax(dim=1)
    for target in (labels, probabilities):
        for smoothing in (-0.1, torch.tensor(0.2), True):
            assert_close(torchblocks.functional.softmax_cross_entropy(x, target, label_smoothing=smoothing),
                         F.cross_entropy(x, target, label_smoothing=smoothing))


@PYTHON_PATH  # probabilities
@pytest.mark.parametrize("target_dtype", [torch.float64, torch.float16], ids=str)
def test_probability_targets_of_another_dtype_promote_like_native(target, target_dtype):
    x = randn(4, 5, device=target.device)
    probabilities = probability_target((4, 5), target.device, torch.float64).to(target_dtype)
    # a float64 loss of float32 log-probabilities: float32's tolerance
    assert_parity(torchblocks.functional.softmax_cross_entropy, F.cross_entropy, [x, probabilities],
                  allowed=tolerance(torch.float32))


def test_torch_compile_fullgraph_matches_eager(target):
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(torchblocks.nn.Dense(8, 16, activation="relu"), torchblocks.nn.Dense(16, 5))
            self.loss = torchblocks.nn.SoftmaxCrossEntropy(label_smoothing=0.1)

        def forward(self, x, labels):
            return self.loss(self.body(x), labels)

    inputs = [randn(6, 8, device=target.device), index_target((6,), 5, target.device, ignore=True)]
    assert_compiled_matches_eager(Classifier().to(target.device), inputs)


def test_autocast_computes_in_float32_like_native():
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu"):
        ours = torchblocks.functional.softmax_cross_entropy(x, labels)
        native = F.cross_entropy(x, labels)
    assert ours.dtype == native.dtype
    assert_close(ours, native)


def test_module_matches_cross_entropy_loss_and_its_state_dict():
    weight = torch.rand(5)
    native = nn.CrossEntropyLoss(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.1)
    ours = torchblocks.nn.SoftmaxCrossEntropy(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.1)
    x, labels = torch.randn(6, 5), torch.tensor([0, 2, 4, 1, 2, 3])
    assert_close(ours(x, labels), native(x, labels))
    ours.load_state_dict(native.state_dict())
    native.load_state_dict(ours.state_dict())
    assert repr(torchblocks.nn.SoftmaxCrossEntropy()) == (
        "SoftmaxCrossEntropy(ignore_index=-100, reduction='mean', label_smoothing=0.0)"
    )
    with pytest.raises(ValueError, match="SoftmaxCrossEntropy: reduction must be one of"):
        torchblocks.nn.SoftmaxCrossEntropy(reduction="avg")


def test_patch_replaces_cross_entropy_loss_keeping_its_options():
    model = nn.ModuleDict({"head": nn.Linear(4, 3), "loss": nn.CrossEntropyLoss(weight=torch.rand(3), ignore_index=1,
                                                                               label_smoothing=0.2)})
    native_loss = model["loss"]
    x, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 2])
    expected = native_loss(model["head"](x), labels)
    torchblocks.patch(model)
    assert isinstance(model["loss"], torchblocks.nn.SoftmaxCrossEntropy)
    assert model["loss"].weight is native_loss.weight and model["loss"].label_smoothing == 0.2
    assert_close(model["loss"](model["head"](x), labels), expected)


def test_cpu_plain_rows_take_the_gradient_from_the_forward(monkeypatch):
    """On the CPU in eager mode, plain rows (no weight, smoothing or ignored
    row) get dloss/dx from the forward's exp: the first backward recomputes
    nothing, a retained graph's second backward gives the very same gradient
    (the general recomputation would differ in the last bits), and both match
    native's."""
    from torchblocks._ops import cross_entropy as ops

    recomputed = []
    reference_gradient = ops._reference_gradient
    monkeypatch.setattr(ops, "_reference_gradient", lambda *args, **kwargs: recomputed.append(1) or
                        reference_gradient(*args, **kwargs))
    x = randn(64, 10).requires_grad_()
    target = torch.randint(10, (64,), generator=torch.Generator().manual_seed(3))
    native_x = x.detach().requires_grad_()
    with torchblocks.use_backend("reference"):
        loss = torchblocks.functional.softmax_cross_entropy(x, target)
        native = F.cross_entropy(native_x, target)
        first = torch.autograd.grad(loss, x, retain_graph=True)[0]
        second = torch.autograd.grad(loss, x)[0]
    assert not recomputed
    assert torch.equal(first, second)
    assert_close(first, torch.autograd.grad(native, native_x)[0], what="gradient")
