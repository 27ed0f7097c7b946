"""ReLU: y = max(x, 0).

Backward (y saved, not x: y > 0 exactly where x > 0):
    dL/dx = dL/dy * 1[y > 0]
"""

import torch

from torchblocks import backend


@torch.library.custom_op("torchblocks::relu", mutates_args=())
def relu(input: torch.Tensor) -> torch.Tensor:
    if backend.use_triton(input):
        from torchblocks.kernels import relu as kernels

        return kernels.relu_forward(input)
    return input.clamp_min(0)


@relu.register_fake
def _(input):
    return torch.empty_like(input)


@torch.library.custom_op("torchblocks::relu_", mutates_args=("input",))
def relu_(input: torch.Tensor) -> None:
    if backend.use_triton(input):
        from torchblocks.kernels import relu as kernels

        kernels.relu_forward(input, out=input)
    else:
        input.clamp_min_(0)


@relu_.register_fake
def _(input):
    return None


@torch.library.custom_op("torchblocks::relu_backward", mutates_args=())
def relu_backward(grad_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if backend.use_triton(output):
        from torchblocks.kernels import relu as kernels

        return kernels.relu_backward(grad_output, output)
    # the one-pass select `output <= 0 ? 0 : grad_output`; a bool mask and
    # masked_fill compute the same in three passes, 4x slower on the CPU
    return torch.ops.aten.threshold_backward(grad_output, output, 0)


@relu_backward.register_fake
def _(grad_output, output):
    return torch.empty_like(output)


class ReLUFunction(torch.autograd.Function):
    """relu as an autograd Function; saves only the output for backward."""

    @staticmethod
    def forward(ctx, input, inplace):
        if inplace:
            torch.ops.torchblocks.relu_(input)
            ctx.mark_dirty(input)
            output = input
        else:
            output = torch.ops.torchblocks.relu(input)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return torch.ops.torchblocks.relu_backward(grad_output, output), None
