import itertools
import re

import pytest
import torch
import torch.nn.functional as F

import torchblocks
from torchblocks.testing import (Allocations, assert_close, assert_compiled_matches_eager, assert_parity,
                                assert_rejected_like_native)


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def labels(shape, classes, device, seed=1, ignored=True):
    """Class indices, every fifth one ``ignore_index`` unless not ``ignored``."""
    target = torch.randint(classes, shape, generator=torch.Generator().manual_seed(seed))
    if ignored:
        target.view(-1)[::5] = -100
    return target.to(device)


def unfused(x, w, b, target, reduction="mean", **options):
    """The twin: F.cross_entropy(F.linear(...)), classes last, rows flattened."""
    logits = F.linear(x, w, b)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction=reduction, **options)
    return loss.reshape(target.shape) if reduction == "none" else loss


def check_against_unfused(x, w, b, target, **options):
    """Loss and the gradients of x, W and b (as built) against the unfused pair."""
    chunk_rows = options.pop("chunk_rows", None)
    assert_parity(
        lambda x, w, target, b=None: torchblocks.functional.dense_cross_entropy(x, w, target, b, chunk_rows=chunk_rows,
                                                                              **options),
        lambda x, w, target, b=None: unfused(x, w, b, target, **options),
        [x, w, target] + ([b] if b is not None else []),
    )


def _pairwise_options():
    """Every (reduction, bias, smoothing) with a chunking (None, 1 or 16 rows:
    one, 37 or 3 chunks) and a dtype in turn, such that every pair of two
    choices meets in some case (chunking and reduction, dtype and bias, ...):
    12 cases where the full product has 72, a bug of any two choices
    together still met."""
    options = list(itertools.product(["mean", "sum", "none"], [True, False], [0.0, 0.2]))
    return [(reduction, bias, smoothing, (None, 1, 16)[index % 3], (torch.float32, torch.float64)[index // 3 % 2])
            for index, (reduction, bias, smoothing) in enumerate(options)]


@pytest.mark.python_path  # ignored rows: the Python path
@pytest.mark.parametrize("reduction, bias, smoothing, chunk_rows, dtype", _pairwise_options(), ids=str)
def test_equals_the_unfused_pair(target, chunk_rows, dtype, reduction, bias, smoothing):
    N, K, C = 37, 9, 23  # 37 rows: no chunk size above divides it
    x, w = randn(N, K, dtype=dtype, device=target.device), randn(C, K, dtype=dtype, device=target.device, seed=2)
    b = randn(C, dtype=dtype, device=target.device, seed=3) if bias else None
    check_against_unfused(x, w, b, labels((N,), C, target.device), reduction=reduction, label_smoothing=smoothing,
                          chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk_rows", [None, 5], ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("reduction, bias", list(itertools.product(["mean", "sum"], [True, False])), ids=str)
def test_plain_calls_equal_the_unfused_pair(target, chunk_rows, dtype, reduction, bias):
    """The common case, which the compiled eager CPU path takes: no row
    ignored, no smoothing, "mean" or "sum"; x transposed, uint8 targets."""
    N, K, C = 37, 9, 23
    x = randn(K, N, dtype=dtype, device=target.device).t()
    w = randn(C, K, dtype=dtype, device=target.device, seed=2)
    b = randn(C, dtype=dtype, device=target.device, seed=3) if bias else None
    y = labels((N,), C, target.device, ignored=False).to(torch.uint8)
    check_against_unfused(x, w, b, y, reduction=reduction, chunk_rows=chunk_rows)


@pytest.mark.python_path  # 16 bits: the Python path
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_as_close_to_float64_as_the_unfused_pair(target, dtype, reduction):
    """Eight chunks of a 16-bit head: the loss and every gradient at least as
    close to the float64 result as native's unfused pair in the same dtype
    (the twin rule, at 1.02). dW and db are summed in float32 across chunks
    and scaled by dL/dloss before their one rounding: rounding each chunk's
    share to 16 bits first (as the head once did) is 45-70% further off on
    dW; rounding the sums before the scale (as it did until the twin rule met
    a dL/dloss that is no power of two) 8-10% in "mean". Both round the
    final result, which may land either way by a hair: 2% of slack."""
    rows, features, classes = 64, 16, 128
    x = randn(rows, features, dtype=dtype, device=target.device)
    w = (randn(classes, features, dtype=torch.float64, seed=2) / 8).to(target.device, dtype)
    b = (randn(classes, dtype=torch.float64, seed=3) / 8).to(target.device, dtype)
    assert_parity(lambda x, w, y, b: torchblocks.functional.dense_cross_entropy(x, w, y, b, chunk_rows=8,
                                                                              reduction=reduction),
                  lambda x, w, y, b: unfused(x, w, b, y, reduction=reduction),
                  [x, w, labels((rows,), classes, target.device), b], twin_factor=1.02)


@pytest.mark.python_path  # a dispatch mode watches: the Python path
def test_backward_scales_the_forward_gradients_in_place(target):
    """The forward of a "mean" head computes dL/dx, dL/dW and dL/db; the
    backward only scales them, in place: it allocates nothing the size of x
    or W, and the forward writes dL/dx into its rows and sums dL/dW in its
    float32 accumulator, with no copy and no separate add."""
    x = randn(64, 32, device=target.device).requires_grad_()
    w = randn(50, 32, device=target.device, seed=2).requires_grad_()
    with Allocations() as forward:
        loss = torchblocks.functional.dense_cross_entropy(x, w, labels((64,), 50, target.device), chunk_rows=16)
    with Allocations() as backward:
        loss.backward()
    assert (16 * 50) in [size for _, size in forward.ops], forward.ops  # a chunk's logits, seen inside the op
    assert forward.largest < 64 * 50, forward.ops  # never all the logits
    assert not [op for op, size in backward.ops if size >= x.numel()], backward.ops
    chunk_of_x = 16 * 32
    assert not [(op, size) for op, size in forward.writes
                if op in ("aten::copy_", "aten::add_", "aten::index_put_") and size >= chunk_of_x], forward.writes
    native_x, native_w = x.detach().requires_grad_(), w.detach().requires_grad_()
    unfused(native_x, native_w, None, labels((64,), 50, target.device)).backward()
    assert_close(x.grad, native_x.grad)
    assert_close(w.grad, native_w.grad)


@pytest.mark.python_path  # "none": the Python path
def test_none_backward_starts_from_the_saved_lse(target, monkeypatch):
    """reduction="none": the forward keeps lse_i; the backward recomputes each
    chunk's logits and takes the gradient from them, lse_i and its s_i
    (backward_rows), without running the forward's softmax pass again."""
    from torchblocks._ops import dense_cross_entropy as head

    calls = []
    for name in ("forward_rows", "backward_rows"):
        counted = getattr(head, name)
        monkeypatch.setattr(head, name, lambda *a, _name=name, _body=counted, **k: calls.append(_name) or _body(*a, **k))
    x = randn(64, 32, device=target.device).requires_grad_()
    w = randn(50, 32, device=target.device, seed=2).requires_grad_()
    y = labels((64,), 50, target.device)
    loss = torchblocks.functional.dense_cross_entropy(x, w, y, reduction="none", chunk_rows=16)
    assert calls == ["forward_rows"] * 4
    calls.clear()
    row_scale = randn(64, device=target.device, seed=4)
    loss.backward(row_scale)
    assert calls == ["backward_rows"] * 4
    native_x, native_w = x.detach().requires_grad_(), w.detach().requires_grad_()
    unfused(native_x, native_w, None, y, reduction="none").backward(row_scale)
    assert_close(x.grad, native_x.grad)
    assert_close(w.grad, native_w.grad)


@pytest.mark.python_path  # ignored rows: the Python path
def test_leading_dimensions_and_ignore_index(target):
    x = randn(3, 5, 8, device=target.device)
    check_against_unfused(x, randn(11, 8, device=target.device, seed=2), randn(11, device=target.device, seed=3),
                          labels((3, 5), 11, target.device), reduction="none", chunk_rows=4)
    check_against_unfused(x, randn(11, 8, device=target.device, seed=2), None,
                          torch.full((3, 5), 3, device=target.device), ignore_index=3)


def test_only_some_inputs_need_gradients(target):
    x = randn(9, 4, device=target.device)
    w = randn(6, 4, device=target.device, seed=2).requires_grad_()
    y = labels((9,), 6, target.device, ignored=False)  # the compiled path's, on reference-cpu
    loss = torchblocks.functional.dense_cross_entropy(x, w, y, chunk_rows=2)
    loss.backward()
    native_w = w.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(x, native_w), y).backward()
    assert x.grad is None
    assert_close(w.grad, native_w.grad)


@pytest.mark.python_path  # label smoothing: the Python path
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(target, reduction):
    x = randn(7, 3, dtype=torch.float64, device=target.device).requires_grad_()
    w = randn(5, 3, dtype=torch.float64, device=target.device, seed=2).requires_grad_()
    b = randn(5, dtype=torch.float64, device=target.device, seed=3).requires_grad_()
    y = labels((7,), 5, target.device)
    assert torch.autograd.gradcheck(
        lambda x, w, b: torchblocks.functional.dense_cross_entropy(
            x, w, y, b, reduction=reduction, label_smoothing=0.1, chunk_rows=3),
        (x, w, b), check_batched_grad=True,
    )


def test_never_holds_all_logits(monkeypatch):
    """The Python path; the compiled one's chunks are its, to the bit
    (test_eager_cpu.py)."""
    from torchblocks._ops import _eager_cpu

    monkeypatch.setattr(_eager_cpu, "_enabled", False)
    # the reference Dense computes each chunk's logits with addmm: record their shapes
    logits_shapes = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: logits_shapes.append(addmm(*a, **k).shape) or addmm(*a, **k))
    N, K, C = 64, 8, 100
    x, w, b = randn(N, K).requires_grad_(), randn(C, K, seed=2).requires_grad_(), randn(C, seed=3).requires_grad_()
    with torchblocks.use_backend("reference"):
        torchblocks.functional.dense_cross_entropy(x, w, labels((N,), C, "cpu"), b, chunk_rows=16).backward()
    assert logits_shapes == [(16, C)] * 4


def test_default_chunks_are_about_the_size_of_the_input():
    from torchblocks._ops.dense_cross_entropy import default_chunk_rows

    assert default_chunk_rows(8192, 4096, 131072) == 256  # 256 x 128k logits = 8192 x 4096 inputs
    assert default_chunk_rows(1024, 256, 32768) == 256  # not 8: skinny GEMMs cost more than they save
    assert default_chunk_rows(10, 512, 10) == 5  # two chunks at least: never all the logits at once
    assert default_chunk_rows(512, 256, 1000) == 256
    assert default_chunk_rows(1, 512, 10) == 1
    assert default_chunk_rows(0, 5, 7) == 1


def test_out_of_range_index_on_the_cpu_raises_index_error():
    with pytest.raises(IndexError, match="dense_cross_entropy: Target 6 is out of bounds"):
        torchblocks.functional.dense_cross_entropy(randn(3, 4), randn(6, 4), torch.tensor([0, 6, 1]))


@pytest.mark.parametrize("args, message", [
    ((randn(4, 5), randn(3, 6), torch.zeros(4, dtype=torch.long)),
     "dense_cross_entropy: input's last dimension must be in_features = weight.shape[1] = 6, got input of shape (4, 5)"),
    ((randn(4, 6), randn(3, 6), torch.zeros(5, dtype=torch.long)),
     "dense_cross_entropy: target must have shape (4,) for input of shape (4, 6), got (5,)"),
    ((randn(4, 6), randn(3, 6), torch.zeros(4)),
     "dense_cross_entropy: target must hold class indices (int64 or uint8), got dtype torch.float32"),
    ((randn(4, 6), randn(3, 6), torch.zeros(4, dtype=torch.long), randn(4)),
     "dense_cross_entropy: bias must have shape (C,) = (3,), got (4,)"),
    ((randn(4, 6), randn(3, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
     "dense_cross_entropy: weight must have the dtype of input (torch.float32), got torch.float64"),
])
def test_bad_input_is_rejected_like_the_unfused_pair(args, message):
    x, w, target, *bias = args
    assert_rejected_like_native(lambda: torchblocks.functional.dense_cross_entropy(*args),
                                lambda: unfused(x, w, bias[0] if bias else None, target), message)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"reduction": "mean "}, ValueError,
     "dense_cross_entropy: reduction must be one of 'none', 'mean', 'sum', got 'mean '"),
    ({"label_smoothing": 2}, RuntimeError, "dense_cross_entropy: label_smoothing must be between 0.0 and 1.0, got 2"),
    ({"chunk_rows": 0}, ValueError, "dense_cross_entropy: chunk_rows must be a positive int or None, got 0"),
])
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        torchblocks.functional.dense_cross_entropy(randn(4, 6), randn(3, 6), torch.zeros(4, dtype=torch.long), **kwargs)


def test_module_initialises_like_linear_and_matches():
    torch.manual_seed(4)
    linear = torch.nn.Linear(6, 9)
    torch.manual_seed(4)
    head = torchblocks.nn.DenseCrossEntropy(6, 9, label_smoothing=0.1)
    assert torch.equal(head.weight, linear.weight) and torch.equal(head.bias, linear.bias)
    x, y = randn(5, 6), torch.tensor([0, 8, 3, 3, 1])
    assert_close(head(x, y), F.cross_entropy(linear(x), y, label_smoothing=0.1))
    assert repr(head) == "DenseCrossEntropy(in_features=6, num_classes=9, bias=True, reduction='mean')"


def test_torch_compile_fullgraph_matches_eager(target):
    torch.manual_seed(0)
    head = torchblocks.nn.DenseCrossEntropy(8, 13).to(target.device)
    assert_compiled_matches_eager(head, [randn(10, 8, device=target.device),
                                         labels((10,), 13, target.device, ignored=False)])
