"""Dense: y = act(x @ W^T + b), with x (M, K), W (N, K), b (N,), act = relu or none.

Backward (y saved under relu: y > 0 exactly where x @ W^T + b > 0):
    g = dL/dy * 1[y > 0] under relu, else dL/dy
    dL/dx = g @ W,    dL/dW = g^T @ x,    dL/db = sum over rows of g
"""

from typing import Optional

import torch

from torchblocks import backend
from torchblocks._ops import relu as _relu  # noqa: F401  (registers torchblocks::relu_backward)


@torch.library.custom_op("torchblocks::dense", mutates_args=())
def dense(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    if backend.use_triton(input):
        from torchblocks.kernels.dense import dense_matmul

        return dense_matmul(input, weight.t(), bias=bias, relu=relu)
    output = input @ weight.t() if bias is None else torch.addmm(bias, input, weight.t())
    return output.clamp_min_(0) if relu else output


@dense.register_fake
def _(input, weight, bias, relu):
    return input.new_empty((input.shape[0], weight.shape[0]))


@torch.library.custom_op("torchblocks::matmul", mutates_args=())
def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A @ B for 2-D tensors of any strides: the gradient GEMMs."""
    if backend.use_triton(a):
        from torchblocks.kernels.dense import dense_matmul

        return dense_matmul(a, b)
    return a @ b


@matmul.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("torchblocks::matmul_row_sum", mutates_args=())
def matmul_row_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A @ B, the row sums of A): dW and db from one pass over g."""
    if backend.use_triton(a):
        from torchblocks.kernels.dense import dense_matmul

        return dense_matmul(a, b, row_sum=True)
    return a @ b, a.sum(dim=1)


@matmul_row_sum.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1])), a.new_empty((a.shape[0],))


class DenseFunction(torch.autograd.Function):
    """dense on a 2-D input; saves x only if dW is needed, W only if dx is,
    and y only under relu."""

    @staticmethod
    def forward(ctx, input, weight, bias, relu):
        output = torch.ops.torchblocks.dense(input, weight, bias, relu)
        needs_input, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.relu = relu
        ctx.save_for_backward(
            input if needs_weight else None, weight if needs_input else None, output if relu else None
        )
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        needs_input, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad = torch.ops.torchblocks.relu_backward(grad_output, output) if ctx.relu else grad_output
        grad_input = torch.ops.torchblocks.matmul(grad, weight) if needs_input else None
        grad_weight = grad_bias = None
        if needs_weight and needs_bias:
            grad_weight, grad_bias = torch.ops.torchblocks.matmul_row_sum(grad.t(), input)
        elif needs_weight:
            grad_weight = torch.ops.torchblocks.matmul(grad.t(), input)
        elif needs_bias:
            grad_bias = grad.sum(dim=0)
        return grad_input, grad_weight, grad_bias, None
