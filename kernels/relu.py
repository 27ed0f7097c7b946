"""ReLU on the GPU: y = max(x, 0), and its gradient dx = dy * 1[y > 0].

Two elementwise kernels, each with a flat fast path for dense tensors and a
strided path for any other layout (see ``_launch.launch_elementwise``).
Offsets are int64, so tensors past 2^31 elements index correctly.
"""

import torch
import triton
import triton.language as tl

from ._launch import element_offsets, launch_elementwise, readable


@triton.jit
def relu_forward_kernel(
    # pointers
    input_ptr,  # *T, x, any shape
    output_ptr,  # *T, y, same shape as x; may be x itself (in place)
    # dimensions
    n_elements,  # number of elements of x
    size1, size2, size3,  # sizes of dims 1..3 of the collapsed 4-D shape
    in_stride0, in_stride1, in_stride2, in_stride3,  # strides of x
    out_stride0, out_stride1, out_stride2, out_stride3,  # strides of y
    # meta-parameters
    CONTIGUOUS: tl.constexpr,  # x and y share one dense layout: flat index
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    index = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = index < n_elements
    in_offsets = element_offsets(index, size1, size2, size3, in_stride0, in_stride1, in_stride2, in_stride3, CONTIGUOUS)
    x = tl.load(input_ptr + in_offsets, mask=mask)
    # x < 0 is false for NaN and -0.0, which pass through as in torch.relu
    y = tl.where(x < 0, 0, x)
    out_offsets = element_offsets(index, size1, size2, size3, out_stride0, out_stride1, out_stride2, out_stride3,
                                  CONTIGUOUS)
    tl.store(output_ptr + out_offsets, y, mask=mask)


@triton.jit
def relu_backward_kernel(
    # pointers
    grad_output_ptr,  # *T, dL/dy, same shape as y
    output_ptr,  # *T, y = relu(x), saved by the forward pass
    grad_input_ptr,  # *T, dL/dx, written
    # dimensions
    n_elements,  # number of elements of y
    size1, size2, size3,  # sizes of dims 1..3 of the collapsed 4-D shape
    go_stride0, go_stride1, go_stride2, go_stride3,  # strides of dL/dy
    out_stride0, out_stride1, out_stride2, out_stride3,  # strides of y
    gi_stride0, gi_stride1, gi_stride2, gi_stride3,  # strides of dL/dx
    # meta-parameters
    CONTIGUOUS: tl.constexpr,  # all three share one dense layout: flat index
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    index = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = index < n_elements
    go_offsets = element_offsets(index, size1, size2, size3, go_stride0, go_stride1, go_stride2, go_stride3, CONTIGUOUS)
    out_offsets = element_offsets(index, size1, size2, size3, out_stride0, out_stride1, out_stride2, out_stride3,
                                  CONTIGUOUS)
    grad_output = tl.load(grad_output_ptr + go_offsets, mask=mask)
    output = tl.load(output_ptr + out_offsets, mask=mask)
    # dx = dy where y > 0, else 0; written as `y <= 0` so a NaN y passes dy
    # through, as torch's threshold_backward does
    grad_input = tl.where(output <= 0, 0, grad_output)
    gi_offsets = element_offsets(index, size1, size2, size3, gi_stride0, gi_stride1, gi_stride2, gi_stride3, CONTIGUOUS)
    tl.store(grad_input_ptr + gi_offsets, grad_input, mask=mask)


def relu_forward(input: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """y = relu(x) for a tensor of any shape and strides; ``out`` may be
    ``input`` itself for the in-place form. Returns y."""
    if out is not None and out.is_neg():  # written through a lazy negation: computed apart, then copied in
        return out.copy_(relu_forward(input))
    (input,) = readable(input)
    if out is None:
        out = torch.empty_like(input)
    launch_elementwise(relu_forward_kernel, input, out)
    return out


def relu_backward(grad_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """dL/dx from dL/dy and the saved output y (same shape, any strides)."""
    grad_output, output = readable(grad_output, output)
    grad_input = torch.empty_like(output)
    launch_elementwise(relu_backward_kernel, grad_output, output, grad_input)
    return grad_input
