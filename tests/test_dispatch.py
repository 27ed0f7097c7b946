"""Plain eager calls run a custom op's body directly; everything that must see
the op (a dispatch mode, fake tensors, a compiling trace) still gets it."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import torchblocks
from torchblocks._ops import _dispatch, _eager_cpu


@pytest.mark.python_path  # the compiled eager path turned off: the Python Functions are what it tests
def test_eager_calls_skip_the_dispatcher_and_modes_see_the_op(target, monkeypatch, op_names):
    monkeypatch.setattr(_eager_cpu, "_enabled", False)  # the Python Functions' path, the one with custom ops
    direct = []
    body = _dispatch._BODIES["torchblocks::relu"]
    monkeypatch.setitem(_dispatch._BODIES, "torchblocks::relu", lambda x: direct.append(x) or body(x))
    x = torch.randn(6, device=target.device) - 0.5
    assert torch.equal(torchblocks.functional.relu(x), torch.relu(x)) and len(direct) == 1
    torchblocks.functional.relu(torch.nn.Parameter(x))  # a Parameter dispatches as a tensor
    assert len(direct) == 2
    direct.pop()
    with op_names() as mode:
        torchblocks.functional.relu(x)
    assert "torchblocks::relu" in mode.names and len(direct) == 1
    with FakeTensorMode():
        fake = torchblocks.functional.relu(torch.empty(3, 5))
    assert fake.shape == (3, 5) and len(direct) == 1


@pytest.mark.python_path  # a compiling trace
def test_a_compiled_call_keeps_the_op_in_its_graph(target):
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    x = torch.randn(6, device=target.device)
    compiled = torch.compile(lambda x: torchblocks.functional.relu(x) * 2, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), torch.relu(x) * 2)
    assert any("torchblocks" in str(node.target) for graph in graphs for node in graph.graph.nodes)


def test_plain_calls_skip_the_signature_binding_and_keywords_still_bind(monkeypatch):
    import inspect

    from torchblocks._ops.relu import ReLUFunction

    x = torch.randn(5, requires_grad=True)
    ReLUFunction.apply(x, False).sum().backward()  # each Function learns its forward's arity once
    x.grad = None
    bindings = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *args, **kwargs: bindings.append(args) or signature(*args,
                                                                                                      **kwargs))
    ReLUFunction.apply(x, False).sum().backward()
    # torch 2.14 moved Function.apply into C++, which binds on every call itself: none of ours on top
    torch_binds = torch.autograd.Function.__dict__["apply"] is torch._C._FunctionBase.__dict__["apply"]
    assert bindings == ([(ReLUFunction.forward,)] if torch_binds else [])
    assert torch.equal(x.grad, (x > 0).to(x.dtype))
    assert torch.equal(ReLUFunction.apply(x, inplace=False), torch.relu(x)) and bindings
