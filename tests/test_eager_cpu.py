"""The compiled eager CPU path (torchblocks/_ops/eager_cpu.cpp): taken by plain
eager CPU calls only, the same numbers as the Python Functions to the bit,
differentiable twice; a failed build leaves the Python path running. Its
parity with native PyTorch is every reference-cpu test of the blocks (the
reference-cpu-python target runs those through the Python Functions)."""

import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchblocks
import torchblocks.functional as TF
import torchblocks.optim
from torchblocks import backend
from torchblocks._ops import _eager_cpu
from torchblocks.testing import assert_close

OFF = os.environ.get("TORCHBLOCKS_EAGER_CPU") == "0"
pytestmark = pytest.mark.eager_cpu


def from_eager_cpu(node) -> bool:
    """Whether an autograd node comes from eager_cpu.cpp: its nodes are named torchblocks::<Block>Backward."""
    return "torchblocks::" in node.name()


def randn(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def indices(rows, classes, seed=0, dtype=torch.int64):
    return torch.randint(classes, (rows,), generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def python_eager():
    """Runs a call through the Python Functions: ``python_eager(fn, *args)``."""
    def run(fn, *args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_eager_cpu, "_enabled", False)
            return fn(*args, **kwargs)
    return run


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
def test_it_builds_here():
    assert _eager_cpu.module() is not None, _eager_cpu.build_error()


CALLS = {  # block: (call, its node's name in eager_cpu.cpp)
    "relu": (lambda: TF.relu(randn(5, 7).requires_grad_()), "torchblocks::ReLUBackward"),
    "relu_": (lambda: TF.relu(randn(5, 7).requires_grad_() * 1, inplace=True), "torchblocks::ReLUBackward"),
    "dense": (lambda: TF.dense(randn(4, 8), randn(6, 8).requires_grad_(), randn(6)), "torchblocks::DenseBackward"),
    "dense-relu": (lambda: TF.dense(randn(4, 8).requires_grad_(), randn(6, 8), None, "relu"),
                   "torchblocks::DenseBackward"),
    "dense-3d": (lambda: TF.dense(randn(2, 4, 8).requires_grad_(), randn(6, 8), None), "torchblocks::DenseBackward"),
    "cross_entropy": (lambda: TF.softmax_cross_entropy(randn(9, 5).requires_grad_(), indices(9, 5)),
                      "torchblocks::CrossEntropyBackward"),
    "dense_cross_entropy": (lambda: TF.dense_cross_entropy(randn(9, 4).requires_grad_(), randn(6, 4), indices(9, 6)),
                            "torchblocks::DenseCrossEntropyBackward"),
}


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
@pytest.mark.parametrize("block", CALLS)
def test_plain_eager_cpu_calls_take_it(block, python_eager):
    call, name = CALLS[block]
    output = call()
    node = output.grad_fn.next_functions[0][0] if output.dim() == 3 else output.grad_fn  # through the unfolding view
    assert node.name() == name
    assert not from_eager_cpu(python_eager(call).grad_fn)


def test_other_calls_take_the_python_functions(op_names):
    """Calls outside the common case are recorded by the Python Functions (for
    cross-entropy, behind the same op: its C++ kernels hand them over)."""
    logits, labels = randn(9, 5).requires_grad_(), indices(9, 5)
    labels_with_ignored = labels.clone()
    labels_with_ignored[2] = -100
    python_calls = {
        "class weights": lambda: TF.softmax_cross_entropy(logits, labels, weight=torch.rand(5)),
        "label smoothing": lambda: TF.softmax_cross_entropy(logits, labels, label_smoothing=0.1),
        "an ignored row": lambda: TF.softmax_cross_entropy(logits, labels_with_ignored),
        "inplace_backward": lambda: TF.softmax_cross_entropy(logits * 1, labels, inplace_backward=True),
        "probabilities": lambda: TF.softmax_cross_entropy(logits, torch.softmax(randn(9, 5), 1)),
    }
    x, w = randn(9, 4).requires_grad_(), randn(5, 4)
    python_calls.update({
        f"head, {what}": lambda options=options: TF.dense_cross_entropy(x, w, labels, **options)
        for what, options in [("an ignored row", {"ignore_index": int(labels[3])}), ("label smoothing",
                              {"label_smoothing": 0.1}), ('"none"', {"reduction": "none"})]
    })
    python_calls["head, bfloat16"] = lambda: TF.dense_cross_entropy(x.bfloat16(), w.bfloat16(), labels)
    for what, call in python_calls.items():
        assert not from_eager_cpu(call().grad_fn), what


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
def test_relu_is_one_op_whose_kernels_modes_and_transforms_see(op_names):
    """ReLU's C++ kernels are those of the op torchblocks::relu: a dispatch
    mode sees the op and the C++ node records under it; torch.func and
    forward-mode AD run through the same node."""
    x = randn(6).requires_grad_()
    with op_names() as mode:
        output = TF.relu(x)
    assert "torchblocks::relu" in mode.names and output.grad_fn.name() == "torchblocks::ReLUBackward"
    assert torch.equal(torch.func.grad(lambda x: TF.relu(x).sum())(x), (x > 0).float())
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.detach(), torch.ones(6))
        assert torch.equal(torch.autograd.forward_ad.unpack_dual(TF.relu(dual)).tangent, (x > 0).float())


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
def test_cross_entropy_is_one_op_whose_kernels_modes_and_transforms_see(op_names):
    """Cross-entropy's C++ kernels are those of the op torchblocks::cross_entropy.
    In the common case a dispatch mode sees the op, run below its C++ node;
    otherwise (class weights, an ignored row) the kernels hand the call to the
    op's Python autograd, whose Function runs the rows' op
    torchblocks::cross_entropy_forward. The profiler sees every call of the
    op. torch.func.grad runs through the C++ node. Each result against native's."""
    logits, labels = randn(9, 5, dtype=torch.float64).requires_grad_(), indices(9, 5)
    ignored = labels.clone()
    ignored[::4] = 1
    calls = {  # what: (ours, native, whether the C++ node records it: else the Python Function does)
        "common": (lambda x: TF.softmax_cross_entropy(x, labels), lambda x: F.cross_entropy(x, labels), True),
        "weights": (lambda x: TF.softmax_cross_entropy(x, labels, weight=torch.rand(5, dtype=torch.float64,
                                                                                   generator=torch.Generator()
                                                                                   .manual_seed(1))),
                    lambda x: F.cross_entropy(x, labels, weight=torch.rand(5, dtype=torch.float64,
                                                                           generator=torch.Generator().manual_seed(1))),
                    False),
        "ignored": (lambda x: TF.softmax_cross_entropy(x, ignored, ignore_index=1),
                    lambda x: F.cross_entropy(x, ignored, ignore_index=1), False),
    }
    for what, (ours, native, in_cpp) in calls.items():
        with op_names() as mode:
            output = ours(logits)
        assert ("torchblocks::cross_entropy" if in_cpp else "torchblocks::cross_entropy_forward") in mode.names, what
        assert from_eager_cpu(output.grad_fn) == in_cpp, what
        with torch.profiler.profile() as profiler:
            ours(logits)
        assert "torchblocks::cross_entropy" in {event.name for event in profiler.events()}, what
        assert_close(output, native(logits), what=what)
        assert_close(torch.autograd.grad(output, logits)[0], torch.autograd.grad(native(logits), logits)[0], what=what)
    assert from_eager_cpu(torch.ops.torchblocks.cross_entropy(logits, labels, None, 1, -100, 0.0).grad_fn)
    ours, native, _ = calls["common"]
    assert_close(torch.func.grad(ours)(logits), torch.func.grad(native)(logits), what="torch.func.grad")


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
def test_dense_under_autocast_casts_as_native_then_takes_the_op(op_names):
    """Autocast casts the arguments as native's linear does; the cast call is
    the op with the C++ node, which a dispatch mode sees."""
    x, w, b = randn(4, 8).requires_grad_(), randn(6, 8), randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with op_names() as mode:
            output = TF.dense(x, w, b)
        native = F.linear(x, w, b)
    assert output.dtype == native.dtype == torch.bfloat16 and output.grad_fn.name() == "torchblocks::DenseBackward"
    assert "torchblocks::dense" in mode.names
    exact = F.linear(*(t.bfloat16().double() for t in (x.detach(), w, b)))
    assert_close(output, native, exact=exact)


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
def test_relu_kernels_leave_the_op_with_the_reference_backend_or_the_switch(monkeypatch):
    """A call through torch.ops gets the C++ node while the module serves, and
    the Python Function once the backend turns to triton or the path is turned
    off, before any functional call could notice."""
    x = randn(5).requires_grad_()
    assert TF.relu(x).grad_fn.name() == "torchblocks::ReLUBackward"  # registers the kernels
    assert torch.ops.torchblocks.relu(x).grad_fn.name() == "torchblocks::ReLUBackward"
    if backend.TRITON_AVAILABLE and backend.INTERPRETER:
        with torchblocks.use_backend("triton"):
            assert torch.ops.torchblocks.relu(x).grad_fn.name() == "ReLUFunctionBackward"
        assert TF.relu(x).grad_fn.name() == "torchblocks::ReLUBackward"
    monkeypatch.setattr(_eager_cpu, "_enabled", True)  # what teardown restores
    _eager_cpu.set_enabled(False)
    assert torch.ops.torchblocks.relu(x).grad_fn.name() == "ReLUFunctionBackward"
    assert TF.relu(x).grad_fn.name() == "ReLUFunctionBackward"


@pytest.mark.parametrize("name, options, update", [("SGD", {"momentum": 0.9}, "aten::_foreach_add_"),
                                                    ("RMSprop", {}, "aten::_foreach_addcdiv_"),
                                                    ("Adam", {}, "aten::_foreach_addcdiv_")], ids=["sgd", "rmsprop", "adam"])
def test_a_watched_optimizer_step_takes_the_reference(name, options, update, op_names):
    """Under a dispatch mode the compiled step leaves every parameter to the
    reference, whose foreach op that writes the parameters, ``update``, the
    mode then sees; the numbers are torch.optim's."""
    ours, theirs = (torch.nn.Parameter(randn(10)) for _ in range(2))
    ours_optimizer = getattr(torchblocks.optim, name)([ours], lr=0.1, **options)
    native_optimizer = getattr(torch.optim, name)([theirs], lr=0.1, **options)
    for param, optimizer in ((ours, ours_optimizer), (theirs, native_optimizer)):
        param.grad = randn(10, seed=1)
        optimizer.step()  # makes the state, so that the watched step below has only the update to do
        param.grad = randn(10, seed=2)
    native_optimizer.step()
    with op_names() as mode:
        ours_optimizer.step()
    assert update in mode.names, mode.names
    assert_close(ours.detach(), theirs.detach())


def test_an_ignore_index_beyond_int64_takes_the_python_path(python_eager):
    """C++ cannot take it; no target can equal it, so nothing is ignored."""
    x, w, labels = randn(6, 4), randn(5, 4), indices(6, 5)
    for loss in (lambda: TF.softmax_cross_entropy(x @ w.t(), labels, ignore_index=2**70),
                 lambda: TF.dense_cross_entropy(x, w, labels, ignore_index=2**70)):
        assert torch.equal(loss(), python_eager(loss))


def _forward_and_backward(fn, *inputs, grad_output):
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    output = fn(*leaves)
    output.backward(grad_output)
    return [output] + [leaf.grad for leaf in leaves if leaf.is_floating_point()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_relu_and_dense_give_the_python_functions_bits(dtype, python_eager):
    x = randn(33, 17, dtype=dtype).t()  # (17, 33), transposed: strides reach the ops as built
    w, b = randn(12, 33, dtype=dtype, seed=1), randn(12, dtype=dtype, seed=2)
    blocks = {
        "relu": (lambda x: TF.relu(x), [x], randn(17, 33, dtype=dtype, seed=4)),
        "dense": (lambda x, w, b: TF.dense(x, w, b), [x, w, b], randn(17, 12, dtype=dtype, seed=5)),
        "dense-relu": (lambda x, w: TF.dense(x, w, activation="relu"), [x, w], randn(17, 12, dtype=dtype, seed=6)),
    }
    for name, (fn, inputs, grad_output) in blocks.items():
        compiled = _forward_and_backward(fn, *inputs, grad_output=grad_output)
        python = python_eager(_forward_and_backward, fn, *inputs, grad_output=grad_output)
        for ours, theirs in zip(compiled, python):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs), name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("rows, classes", [(17, 33), (1, 1), (64, 301), (300, 131)],
                         ids=["17x33", "1x1", "64x301", "300x131"])
def test_cross_entropy_matches_the_python_function(rows, classes, layout, reduction, dtype, python_eager):
    """Above 2**15 logits, the Python Function's ops one for one: its bits.
    Up to 2**15 the compiled path is passes over the rows around one exp2
    op (sums in eight lanes): close, not equal."""
    x = randn(rows, classes, dtype=dtype) if layout == "contiguous" else randn(classes, rows, dtype=dtype).t()
    x[0, 0] = 30.0  # a row whose max stands out: exp(x - max) overflows unless the max is subtracted
    labels = indices(rows, classes, dtype=torch.uint8)
    grad_loss = randn(rows, dtype=dtype, seed=3) if reduction == "none" else torch.tensor(0.7, dtype=dtype)

    def fn(x, y):
        return TF.softmax_cross_entropy(x, y, reduction=reduction)

    compiled = _forward_and_backward(fn, x, labels, grad_output=grad_loss)
    python = python_eager(_forward_and_backward, fn, x, labels, grad_output=grad_loss)
    # bfloat16 follows the twin rule: the Python Function's error against native's float64 result
    exact = _forward_and_backward(lambda x, y: F.cross_entropy(x, y, reduction=reduction), x.double(), labels,
                                  grad_output=grad_loss.double()) if dtype == torch.bfloat16 else [None, None]
    assert from_eager_cpu(fn(x.requires_grad_(), labels).grad_fn)
    for ours, theirs, float64, what in zip(compiled, python, exact, ["loss", "gradient"]):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
        if rows * classes > 2**15:
            assert torch.equal(ours, theirs), what
        else:
            assert_close(ours, theirs, what=what, exact=float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction, bias", [("mean", True), ("sum", False)])
def test_the_head_gives_the_python_functions_bits(reduction, bias, dtype, python_eager):
    """Chunk for chunk the Python head's ops: its bits, with x transposed and
    37 rows that no chunk size divides. Summed over other chunks, dL/dW
    differs in its last bits, so a path that ignored ``chunk_rows`` would fail."""
    x = randn(9, 37, dtype=dtype).t()
    w, b = randn(23, 9, dtype=dtype, seed=1), randn(23, dtype=dtype, seed=2) if bias else None
    labels = indices(37, 23)
    grad_loss = torch.tensor(0.7, dtype=dtype)

    def head(chunk_rows):
        return lambda *leaves: TF.dense_cross_entropy(*leaves[:2], labels, *leaves[2:], reduction=reduction,
                                                      chunk_rows=chunk_rows)

    inputs = [x, w] + ([b] if bias else [])
    assert from_eager_cpu(head(5)(*[t.requires_grad_() for t in inputs]).grad_fn)
    for chunk_rows in (1, 5, None):
        compiled = _forward_and_backward(head(chunk_rows), *inputs, grad_output=grad_loss)
        python = python_eager(_forward_and_backward, head(chunk_rows), *inputs, grad_output=grad_loss)
        for ours, theirs, what in zip(compiled, python, ["loss", "dL/dx", "dL/dW", "dL/db"]):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
            assert torch.equal(ours, theirs), f"{what}, chunks of {chunk_rows}"
    other_chunks = python_eager(_forward_and_backward, head(37), *inputs, grad_output=grad_loss)
    assert not torch.equal(compiled[2], other_chunks[2])


@pytest.mark.parametrize("block", ["relu", "dense", "dense-relu", "cross_entropy", "dense_cross_entropy"])
def test_gradcheck_and_gradgradcheck(block):
    x = randn(5, 6, dtype=torch.float64).requires_grad_()
    w, b = randn(4, 6, dtype=torch.float64, seed=1).requires_grad_(), randn(4, dtype=torch.float64).requires_grad_()
    labels = indices(5, 6)
    fn, inputs = {
        "relu": (TF.relu, [x + 0.1]),  # away from the kink at 0
        "dense": (TF.dense, [x, w, b]),
        "dense-relu": (lambda x, w, b: TF.dense(x, w, b, "relu"), [x, w, b]),
        "cross_entropy": (lambda x: TF.softmax_cross_entropy(x, labels, reduction="none"), [x]),
        "dense_cross_entropy": (lambda x, w, b: TF.dense_cross_entropy(x, w, indices(5, 4), b, chunk_rows=2),
                                [x, w, b]),
    }[block]
    inputs = [t.detach().requires_grad_() for t in inputs]
    assert from_eager_cpu(fn(*inputs).grad_fn) or OFF
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True)


NODE_CALLS = {  # block: (fn of leaves, leaves); every input the node saves is a leaf here
    "relu": (lambda x: TF.relu(x), lambda: [randn(5, 7).requires_grad_()]),
    "dense-relu": (lambda x, w, b: TF.dense(x, w, b, "relu"),
                   lambda: [randn(4, 8).requires_grad_(), randn(6, 8, seed=1).requires_grad_(), randn(6, seed=2)]),
    "cross_entropy": (lambda x: TF.softmax_cross_entropy(x, indices(9, 5)), lambda: [randn(9, 5).requires_grad_()]),
    "dense_cross_entropy": (lambda x, w: TF.dense_cross_entropy(x, w, indices(9, 6), chunk_rows=4),
                            lambda: [randn(9, 4).requires_grad_(), randn(6, 4, seed=1).requires_grad_()]),
}


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
@pytest.mark.parametrize("block", NODE_CALLS)
def test_the_nodes_keep_autograds_contract(block):
    """What torch's own nodes do: saved tensors go through saved_tensors_hooks
    (checkpointing, offloading), an input changed in place before the backward
    is an error, and a graph is freed after its backward."""
    fn, leaves = NODE_CALLS[block]
    inputs = leaves()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        output = fn(*inputs)
    assert from_eager_cpu(output.grad_fn) and packed, "saved tensors pass through the hooks"
    output.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        output.sum().backward()
    output = fn(*leaves())
    output.sum().backward(retain_graph=True)  # a retained graph keeps what it saved
    output.sum().backward()
    inputs = leaves()
    output = fn(*inputs)
    changed = output if block == "relu" else inputs[0]
    with torch.no_grad():
        changed.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
@pytest.mark.parametrize("block", NODE_CALLS)
def test_dual_tensors_carry_their_tangent(block, monkeypatch):
    """A dual tensor's tangent comes out as the Python Functions' jvp gives it
    (tests/test_contract.py holds both against native's), rather than being
    lost: the ops' C++ kernels compute it (for the losses from p computed as
    the forward computes it, so to rounding)."""
    fn, leaves = NODE_CALLS[block]
    inputs = [leaf.detach() for leaf in leaves()]

    def primal_and_tangent():
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(inputs[0], torch.linspace(-1, 1, inputs[0].numel()).view_as(
                inputs[0]))
            return torch.autograd.forward_ad.unpack_dual(fn(dual, *inputs[1:]))

    output, tangent = primal_and_tangent()
    monkeypatch.setattr(_eager_cpu, "_enabled", False)
    python_output, python_tangent = primal_and_tangent()
    assert tangent is not None and torch.count_nonzero(tangent) > 0
    assert torch.equal(output, python_output)
    if block in ("cross_entropy", "dense_cross_entropy"):
        assert_close(tangent, python_tangent, what="tangent")
    else:
        assert torch.equal(tangent, python_tangent)


def test_a_retained_graph_gives_the_same_gradient_twice():
    logits = randn(8, 5).requires_grad_()
    loss = TF.softmax_cross_entropy(logits, indices(8, 5))
    first, = torch.autograd.grad(loss, logits, retain_graph=True)  # scales the forward's buffer
    second, = torch.autograd.grad(loss, logits)  # recomputes it
    assert torch.equal(first, second)
    assert_close(first, torch.autograd.grad(torch.nn.functional.cross_entropy(logits, indices(8, 5)), logits)[0])
    x, w = randn(8, 3).requires_grad_(), randn(5, 3, seed=1).requires_grad_()
    loss = TF.dense_cross_entropy(x, w, indices(8, 5), chunk_rows=3)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)  # scales the forward's gradients
    second = torch.autograd.grad(loss, (x, w))  # recomputes them
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    native = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w.t(), indices(8, 5)), (x, w))
    for ours, theirs in zip(first, native):
        assert_close(ours, theirs)


def test_a_failed_build_warns_once_and_the_python_path_runs(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler")

    _eager_cpu._register(False)  # its kernels off the ops, as in a process that never built it (the next call serves)
    monkeypatch.setattr(_eager_cpu, "_build", no_compiler)
    monkeypatch.setattr(_eager_cpu, "_module", None)
    monkeypatch.setattr(_eager_cpu, "_build_error", None)
    x = randn(4).requires_grad_()
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        y = TF.relu(x)
    assert torch.equal(y, x.clamp_min(0)) and y.grad_fn.name() == "ReLUFunctionBackward"
    assert "no C++ compiler" in _eager_cpu.build_error()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once: no second warning
        assert TF.relu(x).grad_fn.name() == "ReLUFunctionBackward"


def test_turned_off_by_the_environment():
    code = ("import torch, torchblocks.functional as TF; from torchblocks._ops import _eager_cpu; "
            "print(_eager_cpu.module(), type(TF.relu(torch.randn(3, requires_grad=True)).grad_fn).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TORCHBLOCKS_EAGER_CPU": "0"})
    assert result.stdout.split() == ["None", "ReLUFunctionBackward"] and "compiling" not in result.stderr


def _adam_step_on_20m_parameters():
    param = torch.nn.Parameter(torch.zeros(20_000_000))
    param.grad = torch.ones_like(param)
    optimizer = torchblocks.optim.Adam([param], amsgrad=True)
    optimizer.step()  # its state made
    return optimizer.step


def _relu_of_64m_elements():
    x = torch.randn(64_000_000)
    return lambda: TF.relu(x)


@pytest.mark.skipif(OFF, reason="TORCHBLOCKS_EAGER_CPU=0 turns the compiled path off")
@pytest.mark.parametrize("make_call", [_adam_step_on_20m_parameters, _relu_of_64m_elements], ids=["adam", "relu"])
def test_a_compiled_call_lets_other_python_threads_run(make_call):
    """A long compiled call runs without the GIL, as torch's own ops do: a
    Python thread waiting on it starts within the call's first half, not
    when it returns. torch on one thread, so that a core is free for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        call = make_call()
        go, started = threading.Event(), []
        waiting = threading.Thread(target=lambda: (go.wait(), started.append(time.perf_counter())))
        waiting.start()
        begin = time.perf_counter()
        go.set()
        call()
        end = time.perf_counter()
        waiting.join()
    finally:
        torch.set_num_threads(threads)
    assert started[0] - begin < (end - begin) / 2, (started[0] - begin, end - begin)
