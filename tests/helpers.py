"""Test helpers shared by the block test files."""

import torch

from torchblocks.testing import assert_close


def assert_compiled_matches_eager(module, inputs, reduce=lambda output: output.sum()):
    """``torch.compile(module, fullgraph=True)`` (so any graph break fails)
    gives eager's output and parameter gradients; ``reduce`` turns the output
    into the scalar to differentiate."""
    eager = module(*inputs)
    reduce(eager).backward()
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)(*inputs)
    reduce(compiled).backward()
    assert_close(compiled, eager)
    for param, expected in zip(module.parameters(), eager_grads):
        assert_close(param.grad, expected, what="parameter gradient")
