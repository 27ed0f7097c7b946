"""Dense + softmax cross-entropy head: the loss of z = x @ W^T + b against class
indices y, computed over chunks of rows so the (R, C) logits z are never all
in memory at once.

Per chunk of rows, with g = dloss_i/dz from the cross-entropy kernel (written
over the chunk's logits) scaled by s_i = dL/dloss_i:
    dL/dx = g @ W,    dL/dW += g^T @ x,    dL/db += sum over rows of g
dL/dx is written straight into the chunk's rows; dL/dW and dL/db are summed
in float32 (float64) by the GEMM's epilogue. For "mean" and "sum" every s_i
is one scalar, so the forward computes the gradients with s_i = 1 and the
backward only scales them, in place; for "none" the backward recomputes them
with its per-row s_i. A backward that is itself differentiated recomputes
them through the differentiable blocks instead.
"""

from typing import Optional

import torch

from torchblocks.kernels._common import accumulation_dtype
from torchblocks._ops._dispatch import Function, call, custom_op
from torchblocks._ops._vmap import by_loop
from torchblocks._ops.cross_entropy import (
    CrossEntropyBackwardFunction,
    _log_sum_exp,
    forward_rows,
    reduce_rows,
)
from torchblocks._ops.dense import DenseFunction, MatmulFunction, matmul_into
from torchblocks._validate import require_class_indices


# Fewer rows per chunk make the GEMMs skinny and re-accumulate dW once per chunk.
MIN_CHUNK_ROWS = 128


def default_chunk_rows(rows: int, in_features: int, classes: int) -> int:
    """Rows per chunk such that a chunk's logits hold about as many elements
    as the input, (R * K / C) rows of C classes, but at least MIN_CHUNK_ROWS."""
    return max(1, min(rows, max(MIN_CHUNK_ROWS, -(-rows * max(in_features, 1) // max(classes, 1)))))


@custom_op("torchblocks::dense_cross_entropy", mutates_args=())
def dense_cross_entropy(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    ignore_index: int, label_smoothing: float, chunk_rows: int, row_scale: Optional[torch.Tensor],
    compute_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_i, w_y, dL/dx, dL/dW, dL/db); the three gradients are empty
    unless ``compute_grads``, dL/db also without ``bias``. s_i = ``row_scale``,
    or 1 when None."""
    require_class_indices("dense_cross_entropy", target, weight.shape[0], ignore_index)
    ops = torch.ops.torchblocks
    rows = input.shape[0]
    acc = accumulation_dtype(input.dtype)
    loss = input.new_empty(rows, dtype=acc)
    row_weight = input.new_empty(rows, dtype=acc)
    grad_input = torch.empty_like(input) if compute_grads else input.new_empty(0)
    # float32 (float64) accumulators: the first chunk writes them, the others add
    # in the GEMM's epilogue, so no chunk's dW or db is rounded to a 16-bit dtype
    grad_weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if compute_grads else None
    grad_bias = torch.empty(weight.shape[0], dtype=acc, device=weight.device) if compute_grads and bias is not None else None
    if compute_grads and rows == 0:
        grad_weight.zero_()
        if grad_bias is not None:
            grad_bias.zero_()
    for start in range(0, rows, chunk_rows):
        chunk = slice(start, start + chunk_rows)
        x, y = input[chunk], target[chunk]
        logits = call(ops.dense, x, weight, bias, False)
        # targets were checked once above: the unchecked body, not the ops
        loss[chunk], _, row_weight[chunk] = forward_rows(logits, y, None, ignore_index, label_smoothing, compute_grads)
        if compute_grads:  # forward_rows wrote dL/dlogits over the logits
            if row_scale is not None:
                logits.mul_(row_scale[chunk, None].to(logits.dtype))
            matmul_into(logits, weight, grad_input[chunk])
            matmul_into(logits.t(), x, grad_weight, accumulate=start > 0, row_sums=grad_bias)
        del logits  # before the next chunk's are allocated: one chunk alive at a time
    return (
        loss, row_weight, grad_input,
        grad_weight.to(weight.dtype) if grad_weight is not None else weight.new_empty(0),
        grad_bias.to(weight.dtype) if grad_bias is not None else weight.new_empty(0),
    )


@dense_cross_entropy.register_fake
def _(input, weight, bias, target, ignore_index, label_smoothing, chunk_rows, row_scale, compute_grads):
    acc = accumulation_dtype(input.dtype)
    rows = input.shape[0]
    return (
        input.new_empty(rows, dtype=acc), input.new_empty(rows, dtype=acc),
        torch.empty_like(input) if compute_grads else input.new_empty(0),
        torch.empty_like(weight) if compute_grads else weight.new_empty(0),
        weight.new_empty(weight.shape[0]) if compute_grads and bias is not None else weight.new_empty(0),
    )


class DenseCrossEntropyFunction(Function):
    """The fused head, reduced. Outputs ``(loss, divisor, dL/dx, dL/dW, dL/db)``,
    the last four not differentiable. With ``grads_now`` ("mean" and "sum"
    only) the forward computes the gradients at s_i = 1 and the backward
    scales them. Those are constants: when the backward itself is
    differentiated (``create_graph=True``, ``torch.func``) it recomputes them
    chunk by chunk through the differentiable blocks instead."""

    @staticmethod
    def forward(input, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_rows, grads_now):
        loss, row_weight, grad_input, grad_weight, grad_bias = call(
            torch.ops.torchblocks.dense_cross_entropy,
            input, weight, bias, target, ignore_index, label_smoothing, chunk_rows, None, grads_now,
        )
        divisor = row_weight.sum()
        return reduce_rows(loss, divisor, reduction, input.dtype), divisor, grad_input, grad_weight, grad_bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_rows, grads_now = inputs
        _, divisor, grad_input, grad_weight, grad_bias = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable outputs
        ctx.options = (ignore_index, reduction, label_smoothing, chunk_rows, grads_now)
        ctx.save_for_backward(input, weight, bias, target, divisor)
        # held, not saved: the first backward scales them in place and lets them go
        ctx.gradients = (grad_input, grad_weight, grad_bias) if grads_now else None

    @staticmethod
    def backward(ctx, grad_output, *_):
        if grad_output is None:
            return (None,) * 9
        input, weight, bias, target, divisor = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, chunk_rows, grads_now = ctx.options
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if reduction == "none":
            row_scale = grad_output
        else:
            # the divisor counts the rows not ignored; when it is 0 every gradient
            # row is 0 and stays 0, as in native (not 0 * inf)
            scale = grad_output / divisor.clamp(min=1) if reduction == "mean" else grad_output
            row_scale = scale.expand(input.shape[0])
        if torch.is_grad_enabled():
            grad_input, grad_weight, grad_bias = differentiable_gradients(
                input, weight, bias, target, row_scale, ignore_index, label_smoothing, chunk_rows)
        elif grads_now:
            if ctx.gradients is not None:
                grad_input, grad_weight, grad_bias = ctx.gradients
                ctx.gradients = None
            else:  # a retained graph's second backward: the very same gradients, recomputed
                _, _, grad_input, grad_weight, grad_bias = call(
                    torch.ops.torchblocks.dense_cross_entropy,
                    input, weight, bias, target, ignore_index, label_smoothing, chunk_rows, None, True)
            for grad in (grad_input, grad_weight, grad_bias):
                grad.mul_(scale)
        else:
            _, _, grad_input, grad_weight, grad_bias = call(
                torch.ops.torchblocks.dense_cross_entropy,
                input, weight, bias, target, ignore_index, label_smoothing, chunk_rows, row_scale, True,
            )
        return (
            grad_input if needs_input else None, grad_weight if needs_weight else None,
            grad_bias if needs_bias else None, None, None, None, None, None, None,
        )

    @staticmethod
    def vmap(info, in_dims, *args):
        return by_loop(DenseCrossEntropyFunction, info, in_dims, *args)


def differentiable_gradients(input, weight, bias, target, row_scale, ignore_index, label_smoothing, chunk_rows):
    """(dL/dx, dL/dW, dL/db) given s_i = ``row_scale``, chunk by chunk through
    the differentiable blocks (Dense, the cross-entropy gradient, the GEMMs),
    so that they can be differentiated again."""
    grad_inputs = []
    grad_weight = torch.zeros_like(weight)
    grad_bias = torch.zeros_like(weight[:, 0]) if bias is not None else None
    for start in range(0, input.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        x, y = input[chunk], target[chunk]
        logits = DenseFunction.apply(x, weight, bias, False)
        lse = _log_sum_exp(logits.detach().to(accumulation_dtype(logits.dtype)))
        grad_logits = CrossEntropyBackwardFunction.apply(
            logits, y, None, lse, row_scale[chunk], ignore_index, label_smoothing)
        grad_inputs.append(MatmulFunction.apply(grad_logits, weight))
        grad_weight = grad_weight + MatmulFunction.apply(grad_logits.t(), x)
        if bias is not None:
            grad_bias = grad_bias + grad_logits.sum(dim=0)
    grad_input = torch.cat(grad_inputs) if grad_inputs else torch.zeros_like(input)
    return grad_input, grad_weight, grad_bias
