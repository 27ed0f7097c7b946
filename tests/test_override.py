"""torchblocks.enabled(): functional calls from any code run as the blocks,
with native results; what a block cannot serve runs natively, with one warning."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

import torchblocks
from torchblocks._ops import _eager_cpu
from torchblocks.testing import assert_close

NATIVE_OPS = ("aten::linear", "aten::relu", "aten::relu_", "aten::nll_loss", "aten::nll_loss_nd", "aten::_log_softmax",
              "aten::cross_entropy_loss")


def randn(*shape, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=torch.float32)


class Functional(nn.Module):
    """A forward written with functional calls, every routed spelling of them."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(randn(16, 8, seed=1))
        self.b1 = nn.Parameter(randn(16, seed=2))
        self.w2 = nn.Parameter(randn(5, 16, seed=3))
        self.class_weight = randn(5, seed=4).abs()

    def forward(self, x, labels):
        hidden = F.relu(F.linear(x, self.w1, self.b1))
        hidden = torch.relu(hidden - 0.1).relu() + F.relu(hidden * 2, inplace=True)
        hidden = F.relu_(hidden - 0.5) + torch.relu_(hidden - 1) + (hidden - 2).relu_()
        logits = F.linear(hidden, self.w2)
        return F.cross_entropy(logits, labels, weight=self.class_weight.to(x.device), label_smoothing=0.1)


def run(model, inputs, context):
    """(output, parameter and input gradients, the profiler's event names) of model(*inputs) under context."""
    model.zero_grad()
    inputs = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    with profile() as profiler, context:
        output = model(*inputs)
        output = output[0] if isinstance(output, tuple) else output
        # weighted, so that no gradient is zero by symmetry (softmax rows sum to one)
        (output * randn(*output.shape, device=output.device, seed=9)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [t.grad for t in inputs if t.is_floating_point()]
    return output.detach(), grads, {event.name for event in profiler.events()}


def assert_runs_as_blocks(model, inputs):
    native_output, native_grads, native_events = run(model, inputs, contextlib.nullcontext())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        output, grads, events = run(model, inputs, torchblocks.enabled())
    assert_close(output, native_output)
    for grad, native_grad in zip(grads, native_grads):
        assert_close(grad, native_grad, what="gradient")
    assert set(NATIVE_OPS) & native_events, "the native run shows none of the native ops: the check proves nothing"
    assert not set(NATIVE_OPS) & events, sorted(set(NATIVE_OPS) & events)
    return {name for name in events if name.startswith("torchblocks::")}


@pytest.mark.python_path  # the profiler watches every call
def test_functional_calls_run_as_blocks(target):
    model = Functional().to(target.device)
    x, labels = randn(6, 8, device=target.device, seed=5), torch.tensor([0, 4, 2, 1, 3, 0], device=target.device)
    ran = assert_runs_as_blocks(model, [x, labels])
    assert {"torchblocks::dense", "torchblocks::relu", "torchblocks::relu_", "torchblocks::cross_entropy_forward"} <= ran, ran


class SelfAttention(nn.MultiheadAttention):
    def forward(self, x):
        return super().forward(x, x, x)[0]


@pytest.mark.python_path  # the profiler watches every call
def test_multihead_attention_and_encoder_layer_run_as_blocks(target):
    """Their projections run inside F.multi_head_attention_forward, the
    encoder layer's ReLU is a functional call."""
    torch.manual_seed(0)
    x = randn(3, 2, 8, device=target.device)
    ran = assert_runs_as_blocks(SelfAttention(8, 2).to(target.device), [x])
    assert "torchblocks::dense" in ran
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).to(target.device)
    ran = assert_runs_as_blocks(layer, [x])
    assert {"torchblocks::dense", "torchblocks::relu"} <= ran, ran


def test_unsupported_calls_run_natively_with_one_warning():
    x, w = torch.arange(6).reshape(2, 3), torch.arange(12).reshape(4, 3)
    logits, labels = randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.warns(UserWarning) as caught, torchblocks.enabled() as mode:
        integer = [F.linear(x, w) for _ in range(3)]
        summed = F.cross_entropy(logits, labels, size_average=False)
    assert all(torch.equal(y, x @ w.t()) for y in integer)
    assert torch.equal(summed, F.cross_entropy(logits, labels, reduction="sum"))
    messages = [str(warning.message) for warning in caught if "torchblocks" in str(warning.message)]
    assert messages == ["torchblocks.enabled: F.linear ran natively: dtype torch.int64 (dense takes floating point)",
                        "torchblocks.enabled: F.cross_entropy ran natively: the deprecated size_average/reduce "
                        "arguments"], messages
    assert mode.fallbacks == {("F.linear", "dtype torch.int64 (dense takes floating point)"): 3,
                              ("F.cross_entropy", "the deprecated size_average/reduce arguments"): 1}


def test_tensor_subclass_runs_natively():
    class Tagged(torch.Tensor):
        pass

    x = randn(4, 3).as_subclass(Tagged)
    with pytest.warns(UserWarning, match=r"F.relu ran natively: a tensor subclass \(Tagged\)"), torchblocks.enabled():
        y = F.relu(x)
    assert torch.equal(y, x.clamp_min(0))


def test_native_errors_stay_errors():
    with torchblocks.enabled(), pytest.raises(RuntimeError, match="in_features"):
        F.linear(randn(2, 3), randn(4, 5))


def test_enable_and_disable(monkeypatch):
    x = randn(4, 3).requires_grad_()
    torchblocks.enable()
    try:
        assert F.relu(x).grad_fn.name() == "torchblocks::ReLUBackward"  # the compiled eager path
        monkeypatch.setattr(_eager_cpu, "_enabled", False)
        assert F.relu(x).grad_fn.name() == "ReLUFunctionBackward"
    finally:
        torchblocks.disable()
    assert F.relu(x).grad_fn.name() == "ReluBackward0"
    torchblocks.disable()  # off already: nothing to do


def test_compile_fullgraph_traces_the_blocks():
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append("\n".join(m.code for m in graph_module.modules() if isinstance(m, torch.fx.GraphModule)))
        return graph_module.forward

    model = Functional()
    x, labels = randn(6, 8, seed=5), torch.tensor([0, 4, 2, 1, 3, 0])
    with torchblocks.enabled():
        torch._dynamo.reset()
        loss = torch.compile(model, fullgraph=True, backend=capture)(x, labels)
    assert_close(loss, model(x, labels))
    code = "\n".join(graphs)
    assert "torch.ops.torchblocks.dense" in code and "torch.ops.torchblocks.cross_entropy_forward" in code, code
    assert "torch.nn.functional.linear" not in code and "torch._C._nn.linear" not in code, code


def test_compile_fullgraph_of_an_encoder_layer():
    """Compiled, the feed-forward block and its ReLU run as blocks; the
    attention's projections inside F.multi_head_attention_forward stay native
    (dynamo cannot trace the re-entry that reaches them eagerly)."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append("\n".join(m.code for m in graph_module.modules() if isinstance(m, torch.fx.GraphModule)))
        return graph_module.forward

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    x = randn(3, 2, 8)
    with torchblocks.enabled():
        torch._dynamo.reset()
        output = torch.compile(layer, fullgraph=True, backend=capture)(x)
    assert_close(output, layer(x))
    code = "\n".join(graphs)
    assert "torch.ops.torchblocks.dense" in code and "torch.ops.torchblocks.relu" in code, code
