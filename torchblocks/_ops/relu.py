"""ReLU: y = max(x, 0).

Backward (y saved, not x: y > 0 exactly where x > 0):
    dL/dx = dL/dy * 1[y > 0]
Double backward: the backward is linear in dL/dy and flat in y, so its own
backward is the same mask, applied to the incoming gradient.
Forward mode (jvp), with the same mask: dy = dx * 1[y > 0]

Three dispatcher ops, ``torchblocks::relu``, ``relu_`` and ``relu_backward``,
defined here with their fakes, vmap rules and kernels for every device
(Triton or the reference, by the backend), and the Functions below as their
autograd. The compiled eager CPU path (eager_cpu.cpp) registers C++ kernels
of the same ops at their CPU and AutogradCPU keys while it serves, and
``functional.relu`` calls the op through it: one op, whatever runs it.
"""

import torch

from torchblocks._ops._dispatch import LIBRARY, Function, call, define, forward_ad_open, kernels, pick, register_autograd
from torchblocks._ops._vmap import batch_first


def _relu_forward(input: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """``kernels.relu.relu_forward`` in plain PyTorch; ``out`` may be ``input``."""
    return torch.clamp_min(input, 0, out=out)


def _relu_backward(grad_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``kernels.relu.relu_backward`` in plain PyTorch: the one-pass select
    ``output <= 0 ? 0 : grad_output`` (a bool mask and masked_fill compute
    the same in three passes, 4x slower on the CPU)."""
    return torch.ops.aten.threshold_backward(grad_output, output, 0)


def _relu(input: torch.Tensor) -> torch.Tensor:
    return pick(input, kernels.relu.relu_forward, _relu_forward)(input)


def _relu_(input: torch.Tensor) -> None:
    pick(input, kernels.relu.relu_forward, _relu_forward)(input, out=input)


def _relu_grad(grad_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return pick(output, kernels.relu.relu_backward, _relu_backward)(grad_output, output)


# One op each, whatever runs it. Their kernels on every device are the three
# above (Triton or the reference, by the backend); the compiled eager CPU path
# (eager_cpu.cpp) registers its own CPU and AutogradCPU kernels over them
# while it serves the reference backend's CPU calls.
define("relu(Tensor input) -> Tensor", _relu, lambda input: torch.empty_like(input))
define("relu_(Tensor(a!) input) -> ()", _relu_, lambda input: None)
define("relu_backward(Tensor grad_output, Tensor output) -> Tensor", _relu_grad,
       lambda grad_output, output: torch.empty_like(output))


def relu_in_place(input: torch.Tensor) -> torch.Tensor:
    """max(input, 0) written into ``input``, which it returns: the in-place op,
    without autograd's bookkeeping.

    Example::

        >>> relu_in_place(torch.randn(4))
    """
    call(torch.ops.torchblocks.relu_, input)
    return input


def _backward_through_the_mask(ctx, grad):
    """The backward of both Functions below, from the saved y: grad * 1[y > 0]
    (none for their second input), by ReLUBackwardFunction, so that it can be
    differentiated again."""
    (output,) = ctx.saved_tensors
    return ReLUBackwardFunction.apply(grad, output), None


class ReLUFunction(Function):
    """relu as an autograd Function; saves only the output for backward."""

    @staticmethod
    def forward(input, inplace):
        if inplace:
            # mark_dirty bumps the version counter: the write itself must not, so
            # that it moves once, as native's relu_ moves it (functional.relu
            # calls relu_in_place where no graph is recorded); a compiling trace
            # functionalizes the write and keeps no version counter
            if torch.compiler.is_compiling():
                return relu_in_place(input)
            with torch.autograd._unsafe_preserve_version_counter(input):
                return relu_in_place(input)
        return call(torch.ops.torchblocks.relu, input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, inplace = inputs
        if inplace:
            ctx.mark_dirty(input)
        ctx.save_for_backward(output)
        if forward_ad_open():
            ctx.save_for_forward(output)
        ctx.inplace = inplace

    backward = staticmethod(_backward_through_the_mask)

    @staticmethod
    def jvp(ctx, tangent_input, _):
        """dy = dx * 1[y > 0]; in place, the input's tangent is masked in place,
        as native's relu_ does (autograd requires it of a dirtied input)."""
        (output,) = ctx.saved_tensors
        tangent_output = _relu_backward(tangent_input, output)
        return tangent_input.copy_(tangent_output) if ctx.inplace else tangent_output

    @staticmethod
    def vmap(info, in_dims, input, inplace):
        return ReLUFunction.apply(input, inplace), in_dims[0]


class ReLUBackwardFunction(Function):
    """dx = dy * 1[y > 0] as a Function of its own, so that a gradient of the
    gradient exists (``create_graph=True``). Linear in dy, piecewise constant in y:
        d(dx)/d(dy) = 1[y > 0]  (this same Function),   d(dx)/dy = 0
    jvp: d(dx) = d(dy) * 1[y > 0]
    """

    @staticmethod
    def forward(grad_output, output):
        return call(torch.ops.torchblocks.relu_backward, grad_output, output)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        if forward_ad_open():
            ctx.save_for_forward(inputs[1])

    backward = staticmethod(_backward_through_the_mask)

    @staticmethod
    def jvp(ctx, tangent_grad_output, _):
        """d(dx) = d(dy) * 1[y > 0] (flat in y)."""
        (output,) = ctx.saved_tensors
        return _relu_backward(tangent_grad_output, output)

    @staticmethod
    def vmap(info, in_dims, grad_output, output):
        batched = [batch_first(t, dim, info.batch_size) for t, dim in zip((grad_output, output), in_dims)]
        return ReLUBackwardFunction.apply(*batched), 0


def _relu__version_bump(keys, input):
    """relu_'s one version bump, as torch's generated ADInplaceOrView kernels
    bump (for a custom op that key falls through: no_grad and inference mode
    would write without one)."""
    with torch._C._AutoDispatchBelowADInplaceOrView():
        torch.ops.torchblocks.relu_.default.redispatch(keys & torch._C._after_ADInplaceOrView_keyset, input)
    torch.autograd.graph.increment_version(input)


# The ops under torch.func.vmap (their Functions carry rules of their own): elementwise, so
# the op itself on the physical tensor.
def _relu_vmap(info, in_dims, input):
    return torch.ops.torchblocks.relu.default(input), in_dims[0]


def _relu__vmap(info, in_dims, input):
    torch.ops.torchblocks.relu_.default(input)
    return None, None


def _relu_backward_vmap(info, in_dims, grad_output, output):
    batched = [batch_first(t, dim, info.batch_size) for t, dim in zip((grad_output, output), in_dims)]
    return torch.ops.torchblocks.relu_backward.default(*batched), 0


torch.library.register_vmap("torchblocks::relu", _relu_vmap, lib=LIBRARY)
torch.library.register_vmap("torchblocks::relu_", _relu__vmap, lib=LIBRARY)
torch.library.register_vmap("torchblocks::relu_backward", _relu_backward_vmap, lib=LIBRARY)

# The ops' autograd where the compiled module does not serve (another device,
# the Triton backend, no compiler): the Functions above, so that a call through
# torch.ops records too.
register_autograd("relu", ReLUFunction, False)
register_autograd("relu_", ReLUFunction, True)
register_autograd("relu_backward", ReLUBackwardFunction)
LIBRARY.impl("relu_", _relu__version_bump, "ADInplaceOrView", with_keyset=True)
