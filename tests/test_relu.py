import pytest
import torch
import torch.nn.functional as F

import torchblocks
from torchblocks import backend
from torchblocks.testing import assert_compiled_matches_eager, assert_parity, assert_rejected_like_native

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(0,), (3, 0), (1,), (7,), (3, 5), (2, 3, 4, 5), (1025,), (65, 33)]


def make_input(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def check_against_native(x, target, inplace=False, grad_output=None):
    """relu of x (as built, any layout): output and input gradient against F.relu."""
    grad_outputs = None if grad_output is None else [grad_output]
    if inplace:  # in place on a non-leaf made from the leaf
        assert_parity(lambda t: torchblocks.functional.relu(t * 1, inplace=True), lambda t: F.relu(t * 1, inplace=True),
                      [x], grad_outputs=grad_outputs)
    else:
        assert_parity(torchblocks.functional.relu, F.relu, [x], grad_outputs=grad_outputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(target, shape, dtype):
    check_against_native(make_input(shape, dtype, target.device), target)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "permuted-4d", "rank-6-gaps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_contiguous_input(target, layout, dtype):
    base = make_input((6, 10, 12), dtype, target.device)
    x = {
        "transposed": base[0].t(),
        "sliced": base[1::2, :, 3::4],
        "expanded": base[:1, :1].expand(6, 5, 12),
        "permuted-4d": base.reshape(2, 3, 10, 12).permute(3, 1, 0, 2),
        "rank-6-gaps": make_input((4, 3, 4, 3, 4, 3), dtype, target.device)[::2, :, 1:, ::2, :, :2],
    }[layout]
    assert not x.is_contiguous()
    check_against_native(x, target)


def test_non_contiguous_grad_output(target):
    x = make_input((33, 17), torch.float32, target.device)
    grad_output = make_input((17, 33), torch.float32, target.device, seed=1).t()
    check_against_native(x, target, grad_output=grad_output)
    check_against_native(x, target, grad_output=torch.ones(()).to(target.device).expand(33, 17))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_integer_input(target, dtype):
    x = torch.arange(-7, 8, dtype=dtype, device=target.device)
    assert torch.equal(torchblocks.functional.relu(x), F.relu(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_as_native(target, dtype):
    values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.5, -2.5]
    x = torch.tensor(values, dtype=dtype, device=target.device)
    check_against_native(x, target, grad_output=torch.ones_like(x))
    y = torchblocks.functional.relu(x)
    assert torch.equal(torch.signbit(y), torch.signbit(F.relu(x)))  # -0.0 stays -0.0, as native


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_writes_into_input(target, dtype):
    x = make_input((5, 9), dtype, target.device)
    expected = F.relu(x)
    version = x._version
    y = torchblocks.functional.relu(x, inplace=True)
    assert y is x
    assert torch.equal(x, expected)
    assert x._version > version  # autograd sees the write


def test_inplace_on_a_non_contiguous_view(target):
    base = make_input((8, 6), torch.float32, target.device)
    expected = base.clone()
    expected[:, ::2] = F.relu(expected[:, ::2])
    torchblocks.functional.relu(base[:, ::2], inplace=True)
    assert torch.equal(base, expected)


def test_inplace_gradient(target):
    check_against_native(make_input((4, 7), torch.float32, target.device), target, inplace=True)


def test_inplace_on_leaf_requiring_grad_raises_like_native(target):
    x = make_input((3,), torch.float32, target.device).requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torchblocks.functional.relu(x, inplace=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_saves_only_the_output(target, inplace):
    saved = []
    x = make_input((6,), torch.float32, target.device).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = torchblocks.functional.relu(x * 1, inplace=inplace)
    relu_saved = [t for t in saved if t.data_ptr() == y.data_ptr()]
    assert len(saved) == 1 and len(relu_saved) == 1  # y, not x and y


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)], ids=str)
def test_gradcheck(target, shape):
    x = make_input(shape, torch.float64, target.device)
    x = (x + 0.1 * x.sign()).requires_grad_()  # off the kink at 0
    assert torch.autograd.gradcheck(torchblocks.functional.relu, (x,), check_batched_grad=True)
    assert torch.autograd.gradcheck(lambda t: torchblocks.functional.relu(t * 1, inplace=True), (x,),
                                    check_batched_grad=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_matches_eager(target, inplace):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torchblocks.nn.ReLU(inplace=inplace), torch.nn.Linear(16, 4), torchblocks.nn.ReLU()
    ).to(target.device)
    assert_compiled_matches_eager(model, [make_input((5, 8), torch.float32, target.device)])


def test_module():
    assert repr(torchblocks.nn.ReLU()) == "ReLU()"
    assert repr(torchblocks.nn.ReLU(inplace=True)) == "ReLU(inplace=True)"
    x = torch.randn(4, 3)
    assert torch.equal(torchblocks.nn.ReLU()(x), torch.nn.ReLU()(x))


@pytest.mark.parametrize(
    "args, message",
    [
        (([1.0, -1.0],), "relu: input must be a torch.Tensor, got list"),
        ((torch.tensor([1 + 1j]),), "relu: input of dtype torch.complex64 is not supported, as in F.relu ("),
        ((torch.tensor([True]),), "relu: input of dtype torch.bool is not supported, as in F.relu ("),
        ((torch.zeros(1).expand(3), True),
         "relu: input is written in place, so no two of its elements may share a memory location; "
         "got shape (3,) with strides (0,) (expanded)"),
    ],
)
def test_bad_input(args, message):
    assert_rejected_like_native(lambda: torchblocks.functional.relu(*args), lambda: F.relu(*args), message)


def test_inplace_takes_any_truthy_value_like_native():
    x, expected = torch.tensor([-1.0, 2.0]), torch.tensor([0.0, 2.0])
    assert torchblocks.functional.relu(x, 1) is x and torch.equal(x, expected)


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(backend, "INTERPRETER", False)
    monkeypatch.setattr(backend, "TRITON_AVAILABLE", True)
    x = torch.randn(3)
    with torchblocks.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torchblocks.functional.relu(x)
    x_before = x.clone()
    with torchblocks.use_backend("triton"), pytest.raises(RuntimeError):
        torchblocks.functional.relu(x, inplace=True)
    assert torch.equal(x, x_before)  # a failed call writes nothing


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with 8 GiB free")
def test_int64_offsets_past_2_31_elements():
    n = 2**31 + 1024
    x = torch.full((n,), -1.0, dtype=torch.float16, device="cuda")
    x[-3:] = torch.tensor([2.0, -3.0, 4.0], dtype=torch.float16)
    with torchblocks.use_backend("triton"):
        y = torchblocks.functional.relu(x)
    assert y[-3:].tolist() == [2.0, 0.0, 4.0] and y[:-3].abs().sum().item() == 0
