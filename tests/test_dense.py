import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchblocks
from torchblocks.testing import assert_close, assert_compiled_matches_eager, assert_parity, assert_rejected_like_native

SIZES = [(1, 1, 1), (1, 17, 3), (7, 1, 33), (33, 65, 17), (130, 10, 200), (257, 33, 300)]  # M, N, K


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def native_dense(x, w, b=None, activation=None):
    y = F.linear(x, w, b)
    return F.relu(y) if activation == "relu" else y


def check_against_native(x, w, b, activation, what=""):
    """Output and the gradients of x, W and b (as built, any layout) against F.linear (+ F.relu)."""
    inputs = [x, w] if b is None else [x, w, b]
    assert_parity(lambda *args: torchblocks.functional.dense(*args, activation=activation),
                  lambda *args: native_dense(*args, activation=activation), inputs, what=what)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_parity(target, size, dtype, bias, activation):
    M, N, K = size
    x, w = randn(M, K, dtype=dtype, device=target.device), randn(N, K, dtype=dtype, device=target.device, seed=1)
    b = randn(N, dtype=dtype, device=target.device, seed=2) if bias else None
    check_against_native(x, w, b, activation)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_parity_half(target, dtype, bias, activation):
    """Every epilogue (bias, ReLU, both, neither) and every gradient (dx,
    dW, and db from the GEMM's fused row sum) in 16 bits, by the twin rule."""
    x, w, b = (randn(*s, dtype=dtype, device=target.device, seed=i) for i, s in enumerate([(70, 96), (40, 96), (40,)]))
    check_against_native(x, w, b if bias else None, activation)


@pytest.mark.parametrize("leading", [(), (5,), (2, 3), (2, 1, 3)], ids=str)
def test_input_ranks(target, leading):
    x = randn(*leading, 12, device=target.device)
    check_against_native(x, randn(7, 12, device=target.device, seed=1), randn(7, device=target.device, seed=2), "relu")


def test_2d_output_is_not_a_view(target):
    """As F.linear's: FSDP2 warns on module outputs that are views (in-place ops on them skip its hooks)."""
    x = randn(4, 12, device=target.device).requires_grad_()
    w = randn(7, 12, device=target.device, seed=1).requires_grad_()
    assert not torchblocks.functional.dense(x, w, None, "relu")._is_view()
    assert not F.linear(x, w)._is_view()


def test_non_contiguous_input_and_weight(target):
    x = randn(3, 20, 16, device=target.device)[:, ::2, :].transpose(0, 1)  # (10, 3, 16), gaps and swapped dims
    w = randn(16, 9, device=target.device, seed=1).t()  # (9, 16), column-major
    b = randn(18, device=target.device, seed=2)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    check_against_native(x, w, b, "relu")
    check_against_native(x, w, None, None)


def test_relu_epilogue_keeps_nan_and_inf(target):
    x = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [1e38, 1e38], [-1e38, -1e38]], device=target.device)
    w = torch.tensor([[1.0, 1.0], [4.0, 4.0]], device=target.device)
    check_against_native(x, w, torch.tensor([0.5, -0.5], device=target.device), "relu")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck(target, bias, activation):
    x = randn(2, 3, 5, dtype=torch.float64, device=target.device).requires_grad_()
    w = randn(4, 5, dtype=torch.float64, device=target.device, seed=1).requires_grad_()
    b = randn(4, dtype=torch.float64, device=target.device, seed=2).requires_grad_() if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(
        lambda *args: torchblocks.functional.dense(*args, activation=activation), inputs, check_batched_grad=True
    )


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6)], ids=str)
def test_empty_batch(target, shape):
    x = randn(*shape, device=target.device)
    w = randn(3, 6, device=target.device, seed=1).requires_grad_()
    b = randn(3, device=target.device, seed=2).requires_grad_()
    y = torchblocks.functional.dense(x, w, b, activation="relu")
    assert y.shape == (*shape[:-1], 3)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_zero_in_features(target):
    check_against_native(randn(4, 0, device=target.device), randn(3, 0, device=target.device), randn(3, device=target.device), None)


@pytest.mark.parametrize("frozen", ["input", "weight", "bias"])
def test_only_needed_gradients(target, frozen):
    args = {"input": randn(5, 4, device=target.device), "weight": randn(3, 4, device=target.device, seed=1),
            "bias": randn(3, device=target.device, seed=2)}
    for name, tensor in args.items():
        tensor.requires_grad_(name != frozen)
    torchblocks.functional.dense(args["input"], args["weight"], args["bias"], activation="relu").sum().backward()
    assert args[frozen].grad is None
    assert all(args[n].grad is not None for n in args if n != frozen)


@pytest.mark.parametrize("activation, weight_grad, expected", [
    (None, True, 2),  # x for dW, W for dx
    ("relu", True, 3),  # and y for the mask
    ("relu", False, 2),  # frozen W: no x; W for dx, y
])
def test_saves_the_least_that_suffices(activation, weight_grad, expected):
    x = randn(5, 4).requires_grad_()
    w = randn(3, 4, seed=1).requires_grad_(weight_grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torchblocks.functional.dense(x, w, activation=activation)
    assert len(saved) == expected


def test_triton_target_runs_the_triton_kernel(target, monkeypatch):
    if target.backend != "triton":
        pytest.skip("checks the Triton path")
    from torchblocks.kernels import dense as kernels

    calls = []
    original = kernels.dense_matmul
    monkeypatch.setattr(kernels, "dense_matmul", lambda *a, **k: calls.append(k) or original(*a, **k))
    x = randn(4, 3, device=target.device).requires_grad_()
    w = randn(2, 3, device=target.device, seed=1).requires_grad_()
    b = randn(2, device=target.device, seed=2).requires_grad_()
    torchblocks.functional.dense(x, w, b, activation="relu").sum().backward()
    assert len(calls) == 3  # forward, dx, and dW with the fused row sum for db
    assert calls[0]["relu"] and calls[2]["row_sum"]


def test_torch_compile_fullgraph_matches_eager(target):
    torch.manual_seed(0)
    model = nn.Sequential(
        torchblocks.nn.Dense(12, 16, activation="relu"), torchblocks.nn.Dense(16, 8), torchblocks.nn.ReLU(),
        torchblocks.nn.Dense(8, 3, bias=False),
    ).to(target.device)
    assert_compiled_matches_eager(model, [randn(5, 12, device=target.device)], reduce=lambda y: y.square().sum())


@pytest.mark.python_path  # autocast
def test_autocast_gives_the_native_dtype(target):
    x = randn(6, 8, device=target.device)
    w = randn(4, 8, device=target.device, seed=1).requires_grad_()
    b = randn(4, device=target.device, seed=2).requires_grad_()
    with torch.autocast(target.device):
        ours = torchblocks.functional.dense(x, w, b, activation="relu")
        native = F.relu(F.linear(x, w, b))
    assert ours.dtype == native.dtype != torch.float32
    # autocast runs the linear on x, W and b rounded to its dtype
    assert_close(ours, native, exact=F.relu(F.linear(*(t.detach().to(native.dtype).double() for t in (x, w, b)))))
    ours.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


@pytest.mark.parametrize("args, message", [
    ((randn(4, 5), randn(3, 6)),
     "dense: input's last dimension must be in_features = weight.shape[1] = 6, got input of shape (4, 5)"),
    ((randn(4, 6), randn(3, 6), randn(4)),
     "dense: bias must have shape (out_features,) = (3,), got (4,)"),
    ((randn(4, 6), randn(3, 6, dtype=torch.float64)),
     "dense: weight must have the dtype of input (torch.float32), got torch.float64"),
    ((randn(4, 6), randn(3, 6), randn(3, dtype=torch.float16)),
     "dense: bias must have the dtype of input (torch.float32), got torch.float16"),
    ((randn(4, 6), randn(1, 3, 6)),
     "dense: weight must be 2-D (out_features, in_features), got shape (1, 3, 6)"),
    ((torch.tensor(1.0), randn(3, 1)),
     "dense: input's last dimension must be in_features = weight.shape[1] = 1, got input of shape ()"),
    ((randn(4, 6), [[1.0] * 6]), "dense: weight must be a torch.Tensor, got list"),
])
def test_bad_input_is_rejected_like_native(args, message):
    assert_rejected_like_native(lambda: torchblocks.functional.dense(*args), lambda: F.linear(*args), message)


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((randn(4, 6), randn(3, 6, device="meta")), {}, RuntimeError,
     "dense: weight must be on the device of input (cpu), got meta"),
    ((randn(4, 6), randn(3, 6)), {"activation": "gelu"}, ValueError,
     "dense: activation must be one of None, 'relu', got 'gelu'"),
    # native's CPU matmul takes integers; the blocks are floating-point only (SPEC)
    ((torch.ones(4, 6, dtype=torch.int64), torch.ones(3, 6, dtype=torch.int64)), {}, TypeError,
     "dense: input must be a floating-point tensor, got dtype torch.int64"),
])
def test_bad_input(args, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        torchblocks.functional.dense(*args, **kwargs)


def test_module_initialises_like_linear():
    torch.manual_seed(3)
    linear = nn.Linear(20, 7)
    torch.manual_seed(3)
    dense = torchblocks.nn.Dense(20, 7)
    assert torch.equal(dense.weight, linear.weight) and torch.equal(dense.bias, linear.bias)
    no_bias = torchblocks.nn.Dense(4, 2, bias=False, dtype=torch.float64)
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float64
    assert repr(torchblocks.nn.Dense(784, 512, activation="relu")) == (
        "Dense(in_features=784, out_features=512, bias=True, activation='relu')"
    )
    assert repr(torchblocks.nn.Dense(3, 2, bias=False)) == "Dense(in_features=3, out_features=2, bias=False)"
    with pytest.raises(ValueError, match="Dense: activation must be one of None, 'relu', got 'tanh'"):
        torchblocks.nn.Dense(3, 2, activation="tanh")


def test_state_dict_interchangeable_with_linear():
    linear, dense = nn.Linear(6, 4), torchblocks.nn.Dense(6, 4)
    dense.load_state_dict(linear.state_dict())
    x = randn(3, 6)
    assert_close(dense(x), linear(x))
    back = nn.Linear(6, 4)
    back.load_state_dict(dense.state_dict())
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)


def nested_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 8)),
        nn.ReLU(), nn.Linear(8, 3),
    )


def test_patch_keeps_outputs_and_parameters():
    model, reference = nested_model(), nested_model()
    parameters = list(model.parameters())
    assert torchblocks.patch(model) is model
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert not any(type(m) in (nn.Linear, nn.ReLU) for m in model.modules())
    assert model[0].activation == "relu" and isinstance(model[1], nn.Identity)  # fused in place
    assert isinstance(model[3], torchblocks.nn.ReLU)  # follows a Sequential, not a Linear: kept apart
    x = randn(5, 10)
    assert_close(model(x), reference(x))


def test_optimizer_built_before_patch_still_trains():
    model, reference = nested_model(), nested_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    torchblocks.patch(model)
    x, target = randn(8, 10), torch.arange(8) % 3
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            F.cross_entropy(net(x), target).backward()
            opt.step()
    for ours, native in zip(model.parameters(), reference.parameters()):
        assert_close(ours, native, what="trained parameter")


def test_patch_takes_a_module():
    with pytest.raises(TypeError, match="patch: model must be a torch.nn.Module, got list"):
        torchblocks.patch([nn.Linear(3, 2)])


def test_patch_root_and_leaves_hooked_modules_alone():
    assert isinstance(torchblocks.patch(nn.Linear(3, 2)), torchblocks.nn.Dense)
    assert torchblocks.patch(nn.ReLU(inplace=True)).inplace
    hooked = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    hooked[0].register_forward_hook(lambda *args: None)
    torchblocks.patch(hooked)
    assert type(hooked[0]) is nn.Linear and isinstance(hooked[1], torchblocks.nn.ReLU)
