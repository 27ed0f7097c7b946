"""Dense: y = act(x @ W^T + b), with x (M, K), W (N, K), b (N,), act = relu or none.

Backward (y saved under relu: y > 0 exactly where x @ W^T + b > 0):
    g = dL/dy * 1[y > 0] under relu, else dL/dy
    dL/dx = g @ W,    dL/dW = g^T @ x,    dL/db = sum over rows of g
Each product is bilinear, so the backward is built from differentiable
Functions (the mask, the GEMMs) and double backward needs nothing more.
Forward mode (jvp), with the same mask under relu:
    dy = (dx @ W^T + x @ dW^T + db) * 1[y > 0]

Three dispatcher ops, ``torchblocks::dense``, ``matmul`` and
``matmul_row_sum``, defined here with their fakes, vmap rules and kernels for
every device, and the Functions below as their autograd; the compiled eager
CPU path (eager_cpu.cpp) registers C++ kernels of the same ops while it serves.
"""

from typing import Optional

import torch

from torchblocks._ops._dispatch import LIBRARY, Function, call, define, forward_ad_open, kernels, pick, register_autograd
from torchblocks._ops._vmap import fold_rows
from torchblocks._ops.relu import ReLUBackwardFunction, _relu_backward


def _dense_matmul(a, b, bias=None, relu=False, row_sum=False, out=None, row_sums=None, accumulate=False):
    """``kernels.dense.dense_matmul`` in plain PyTorch: the same arguments
    and results. C = act(A @ B + bias), with ``row_sum`` also the row sums of
    A; or with ``out`` the product written (``accumulate``: added) through
    ``out``'s strides in its dtype, ``row_sums`` likewise."""
    if out is not None:
        a, b = a.to(out.dtype), b.to(out.dtype)
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        if row_sums is not None and accumulate:
            row_sums.add_(a.sum(dim=1))
        elif row_sums is not None:
            torch.sum(a, dim=1, out=row_sums)
        return out
    product = a @ b if bias is None else torch.addmm(bias, a, b)
    if relu:
        product.clamp_min_(0)
    return (product, a.sum(dim=1)) if row_sum else product


def _dense(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return pick(input, kernels.dense.dense_matmul, _dense_matmul)(input, weight.t(), bias=bias, relu=relu)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return pick(a, kernels.dense.dense_matmul, _dense_matmul)(a, b)


def _matmul_row_sum(a: torch.Tensor, b: torch.Tensor) -> tuple:
    return pick(a, kernels.dense.dense_matmul, _dense_matmul)(a, b, row_sum=True)


# One op each, whatever runs it; the compiled eager CPU path (eager_cpu.cpp)
# registers its own CPU and AutogradCPU kernels over these while it serves.
#   dense: act(input @ weight^T + bias);  matmul: A @ B for 2-D tensors of any
#   strides (the gradient GEMMs);  matmul_row_sum: (A @ B, the row sums of A),
#   dW and db from one pass over g.
define("dense(Tensor input, Tensor weight, Tensor? bias, bool relu) -> Tensor", _dense,
       lambda input, weight, bias, relu: input.new_empty((input.shape[0], weight.shape[0])))
define("matmul(Tensor a, Tensor b) -> Tensor", _matmul, lambda a, b: a.new_empty((a.shape[0], b.shape[1])))
define("matmul_row_sum(Tensor a, Tensor b) -> (Tensor, Tensor)", _matmul_row_sum,
       lambda a, b: (a.new_empty((a.shape[0], b.shape[1])), a.new_empty((a.shape[0],))))


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False,
                row_sums: Optional[torch.Tensor] = None) -> None:
    """out = A @ B, or out += A @ B with ``accumulate``, written through
    ``out``'s strides in ``out``'s dtype (a float32 accumulator sums 16-bit
    products unrounded); ``row_sums`` (M,) likewise receives the row sums of
    A. For the fused head, inside its custom op: no autograd, no new C.

    Example::

        >>> grad_weight = torch.zeros(10, 784)
        >>> matmul_into(grad_logits.t(), x, grad_weight, accumulate=True)
    """
    pick(a, kernels.dense.dense_matmul, _dense_matmul)(a, b, out=out, row_sums=row_sums, accumulate=accumulate)


def _product_tangent(a, b, tangent_a, tangent_b):
    """The tangent of A @ B: dA @ B + A @ dB, a missing (None) tangent
    counting as zero. In torch ops on every backend: under jacfwd the
    tangents are batched (vmap), the primals not."""
    tangent = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    if tangent_a is not None:
        tangent = tangent + tangent_a @ b
    if tangent_b is not None:
        tangent = tangent + a @ tangent_b
    return tangent


def dense_tangent(input, weight, tangent_input, tangent_weight, tangent_bias):
    """The tangent of x @ W^T + b, (M, N): dx @ W^T + x @ dW^T + db, a
    missing (None) tangent counting as zero."""
    tangent = _product_tangent(input, weight.t(), tangent_input,
                               tangent_weight.t() if tangent_weight is not None else None)
    return tangent + tangent_bias if tangent_bias is not None else tangent


class DenseFunction(Function):
    """dense on a 2-D input; saves x only if dW is needed, W only if dx is,
    and y only under relu. Its backward is made of Functions (the ReLU mask,
    the GEMMs), so it can itself be differentiated."""

    @staticmethod
    def forward(input, weight, bias, relu):
        return call(torch.ops.torchblocks.dense, input, weight, bias, relu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, relu = inputs
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        ctx.relu = relu
        ctx.save_for_backward(
            input if needs_weight else None, weight if needs_input else None, output if relu else None
        )
        if forward_ad_open():
            ctx.save_for_forward(input, weight, output if relu else None)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        needs_input, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad = ReLUBackwardFunction.apply(grad_output, output) if ctx.relu else grad_output
        grad_input = MatmulFunction.apply(grad, weight) if needs_input else None
        grad_weight = grad_bias = None
        if needs_weight and needs_bias:
            grad_weight, grad_bias = MatmulRowSumFunction.apply(grad.t(), input)
        elif needs_weight:
            grad_weight = MatmulFunction.apply(grad.t(), input)
        elif needs_bias:
            grad_bias = grad.sum(dim=0)
        return grad_input, grad_weight, grad_bias, None

    @staticmethod
    def jvp(ctx, tangent_input, tangent_weight, tangent_bias, _):
        """dy = (dx @ W^T + x @ dW^T + db) * 1[y > 0]."""
        input, weight, output = ctx.saved_tensors
        tangent_output = dense_tangent(input, weight, tangent_input, tangent_weight, tangent_bias)
        return _relu_backward(tangent_output, output) if ctx.relu else tangent_output

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, relu):
        return fold_rows(DenseFunction.apply, info, in_dims, (input, weight, bias, relu), row_args=(0,))


class MatmulFunction(Function):
    """C = A @ B, the gradient GEMMs of Dense, differentiable in turn:
        dA = dC @ B^T,    dB = A^T @ dC
    jvp: dC = dA @ B + A @ dB
    """

    @staticmethod
    def forward(a, b):
        return call(torch.ops.torchblocks.matmul, a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)
        if forward_ad_open():
            ctx.save_for_forward(a, b)

    @staticmethod
    def backward(ctx, grad_c):
        a, b = ctx.saved_tensors
        grad_a = MatmulFunction.apply(grad_c, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = MatmulFunction.apply(a.t(), grad_c) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b

    @staticmethod
    def jvp(ctx, tangent_a, tangent_b):
        """dC = dA @ B + A @ dB, a missing (None) tangent counting as zero."""
        a, b = ctx.saved_tensors
        return _product_tangent(a, b, tangent_a, tangent_b)

    @staticmethod
    def vmap(info, in_dims, a, b):
        return fold_rows(MatmulFunction.apply, info, in_dims, (a, b), row_args=(0,))


class MatmulRowSumFunction(MatmulFunction):
    """(C, r) = (A @ B, the row sums of A): dW and db of Dense in one pass over
    g. Saves what MatmulFunction saves.
        dA = dC @ B^T + dr (broadcast along each row),    dB = A^T @ dC
    jvp: (dC, dr) = (dA @ B + A @ dB, the row sums of dA)
    """

    @staticmethod
    def forward(a, b):
        return call(torch.ops.torchblocks.matmul_row_sum, a, b)

    @staticmethod
    def backward(ctx, grad_c, grad_row_sum):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = MatmulFunction.apply(grad_c, b.t()) + grad_row_sum[:, None]
        if ctx.needs_input_grad[1]:
            grad_b = MatmulFunction.apply(a.t(), grad_c)
        return grad_a, grad_b

    @staticmethod
    def jvp(ctx, tangent_a, tangent_b):
        """(dA @ B + A @ dB, the row sums of dA), a missing tangent zero."""
        a, b = ctx.saved_tensors
        tangent_row_sum = tangent_a.sum(dim=1) if tangent_a is not None else a.new_zeros(a.shape[0])
        return _product_tangent(a, b, tangent_a, tangent_b), tangent_row_sum

    @staticmethod
    def vmap(info, in_dims, a, b):
        return fold_rows(MatmulRowSumFunction.apply, info, in_dims, (a, b), row_args=(0,))


# The ops' autograd where the compiled module does not serve, and their vmap rules:
# the batch folded into the rows of A (input), or one call per entry.
for _name, _function in (("dense", DenseFunction), ("matmul", MatmulFunction),
                         ("matmul_row_sum", MatmulRowSumFunction)):
    register_autograd(_name, _function)
    torch.library.register_vmap(
        f"torchblocks::{_name}",
        lambda info, in_dims, *args, op=getattr(torch.ops.torchblocks, _name).default: fold_rows(
            op, info, in_dims, args, row_args=(0,)),
        lib=LIBRARY)
