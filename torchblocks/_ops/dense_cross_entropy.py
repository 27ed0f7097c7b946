"""Dense + softmax cross-entropy head: the loss of z = x @ W^T + b against class
indices y, computed over chunks of rows so the (R, C) logits z are never all
in memory at once.

Per chunk of rows, with g = s_i * dloss_i/dz (s_i = dL/dloss_i) written over
the chunk's logits by the cross-entropy kernels:
    dL/dx = g @ W,    dL/dW += g^T @ x,    dL/db += sum over rows of g
dL/dx is written straight into the chunk's rows; dL/dW and dL/db are summed
in float32 (float64) by the GEMM's epilogue. Three ops:
    dense_cross_entropy_forward                 loss_i, lse_i, w_y
    dense_cross_entropy_gradients               the gradients, given lse_i and s_i
    dense_cross_entropy_forward_and_gradients   loss_i, w_y and the gradients at
                                                s_i = 1, from one GEMM per chunk
For "mean" and "sum" every s_i is one scalar, so the forward computes the
gradients at s_i = 1 and the backward only scales them, in place (dL/dW and
dL/db of a 16-bit head are held in their float32 sums and rounded once,
after the scale: native rounds them once too); for "none"
the forward saves lse_i and the backward computes them with its s_i. A
backward that is itself differentiated recomputes them through the
differentiable blocks instead.

Forward mode (jvp), chunk by chunk as the forward, with the tangent of the
logits dz = dx @ W^T + x @ dW^T + db and g at s_i = 1:
    dloss_i = sum_c g_ic * dz_ic,    reduced as the loss

The head is one dispatcher op, ``torchblocks::dense_cross_entropy`` (its
reduction as aten's int), defined at the end of this file with its fake, a
vmap rule, its kernel for every device and DenseCrossEntropyFunction as its
autograd; the compiled eager CPU path (eager_cpu.cpp) registers C++ kernels
of the same op while it serves, which take the common case and hand the rest
to these.
"""

from typing import List, Optional

import torch

from torchblocks.kernels._common import accumulation_dtype
from torchblocks._ops._dispatch import (
    LIBRARY, Function, apply_in_dispatcher, call, custom_op, define, forward_ad_open, register_autograd,
    saved_tensors_hooked,
)
from torchblocks._ops._vmap import batched, by_loop
from torchblocks._ops.cross_entropy import (
    CrossEntropyBackwardFunction,
    RowStats,
    _log_sum_exp,
    backward_rows,
    forward_rows,
    reduce_rows,
)
from torchblocks._ops.dense import DenseFunction, MatmulFunction, dense_tangent, matmul_into
from torchblocks._validate import REDUCTIONS, require_class_indices


# Fewer rows per chunk make the GEMMs skinny and re-accumulate dW once per
# chunk: 512 rows of 256 features on two CPU threads, 1,000 / 8,000 / 32,000
# classes, ran at 0.85 / 1.03 / 1.22x native's speed in chunks of 128 rows and
# 0.92 / 1.14 / 1.32x in chunks of 256 (torchblocks bench --block dense_cross_entropy).
MIN_CHUNK_ROWS = 256


def default_chunk_rows(rows: int, in_features: int, classes: int) -> int:
    """Rows per chunk such that a chunk's logits hold about as many elements
    as the input, (R * K / C) rows of C classes, but at least MIN_CHUNK_ROWS;
    and at most half the rows, so that two rows or more never have all their
    logits in memory at once."""
    half = -(-rows // 2)
    return max(1, min(half, max(MIN_CHUNK_ROWS, -(-rows * max(in_features, 1) // max(classes, 1)))))


def _chunks(rows: int, chunk_rows: int):
    return (slice(start, start + chunk_rows) for start in range(0, rows, chunk_rows))


def _logits(input, weight, bias, chunk):
    """z for one chunk of rows, a new (chunk, C) tensor: the op's body, not the op."""
    return call(torch.ops.torchblocks.dense, input[chunk], weight, bias, False)


class _Gradients:
    """dL/dx, and dL/dW and dL/db in float32 (float64) accumulators: the first
    chunk writes them, the others add in the GEMM's epilogue, so no chunk's
    dW or db is rounded to a 16-bit dtype."""

    def __init__(self, input, weight, bias):
        acc = accumulation_dtype(input.dtype)
        self.weight = weight
        self.input = torch.empty_like(input)
        self.weight_sum = torch.empty(weight.shape, dtype=acc, device=weight.device)
        self.bias_sum = torch.empty(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
        if input.shape[0] == 0:
            self.weight_sum.zero_()
            if self.bias_sum is not None:
                self.bias_sum.zero_()

    def add(self, grad_logits, input, chunk) -> None:
        """The chunk's share, from its g = ``grad_logits``."""
        matmul_into(grad_logits, self.weight, self.input[chunk])
        matmul_into(grad_logits.t(), input[chunk], self.weight_sum, accumulate=chunk.start > 0,
                    row_sums=self.bias_sum)

    def result(self, rounded: bool = True) -> List[torch.Tensor]:
        """[dL/dx, dL/dW] and dL/db with a bias: dL/dW and dL/db in the
        parameters' dtype, or, not ``rounded``, still in their accumulators
        (for a scale to come before their one rounding)."""
        sums = [self.weight_sum] + ([self.bias_sum] if self.bias_sum is not None else [])
        return [self.input] + [total.to(self.weight.dtype) if rounded else total for total in sums]


def _fake_gradients(input, weight, bias, sums_dtype=None) -> List[torch.Tensor]:
    sums_dtype = sums_dtype or weight.dtype
    return [torch.empty_like(input), torch.empty_like(weight, dtype=sums_dtype)] + (
        [weight.new_empty(weight.shape[0], dtype=sums_dtype)] if bias is not None else [])


def _forward(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    ignore_index: int, label_smoothing: float, chunk_rows: int,
) -> RowStats:
    """(loss_i, lse_i, w_y or 0 where ignored), each (R,) in the accumulation dtype."""
    require_class_indices("dense_cross_entropy", target, weight.shape[0], ignore_index)
    loss, lse, row_weight = (input.new_empty(input.shape[0], dtype=accumulation_dtype(input.dtype))
                             for _ in range(3))
    for chunk in _chunks(input.shape[0], chunk_rows):
        logits = _logits(input, weight, bias, chunk)
        # targets were checked once above: the unchecked body, not the ops
        loss[chunk], lse[chunk], row_weight[chunk] = forward_rows(
            logits, target[chunk], None, ignore_index, label_smoothing, write_grad=False)
        del logits  # before the next chunk's are allocated: one chunk alive at a time
    return loss, lse, row_weight


dense_cross_entropy_forward = custom_op("torchblocks::dense_cross_entropy_forward")(_forward)


@dense_cross_entropy_forward.register_fake
def _(input, weight, bias, target, ignore_index, label_smoothing, chunk_rows):
    return tuple(input.new_empty(input.shape[0], dtype=accumulation_dtype(input.dtype)) for _ in range(3))


@custom_op("torchblocks::dense_cross_entropy_gradients", mutates_args=())
def dense_cross_entropy_gradients(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    lse: torch.Tensor, row_scale: torch.Tensor, ignore_index: int, label_smoothing: float, chunk_rows: int,
) -> List[torch.Tensor]:
    """[dL/dx, dL/dW] and dL/db with a bias, given the forward's lse_i and
    s_i = ``row_scale`` (R,), each chunk's logits recomputed."""
    gradients = _Gradients(input, weight, bias)
    for chunk in _chunks(input.shape[0], chunk_rows):
        logits = _logits(input, weight, bias, chunk)
        grad_logits = backward_rows(logits, target[chunk], None, lse[chunk], row_scale[chunk], ignore_index,
                                    label_smoothing, out=logits)
        gradients.add(grad_logits, input, chunk)
        del logits, grad_logits
    return gradients.result()


@dense_cross_entropy_gradients.register_fake
def _(input, weight, bias, target, lse, row_scale, ignore_index, label_smoothing, chunk_rows):
    return _fake_gradients(input, weight, bias)


@custom_op("torchblocks::dense_cross_entropy_forward_and_gradients", mutates_args=())
def dense_cross_entropy_forward_and_gradients(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    ignore_index: int, label_smoothing: float, chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """(loss_i, w_y or 0 where ignored, the gradients at s_i = 1: [dL/dx,
    dL/dW] and dL/db with a bias, the last two unrounded in the accumulation
    dtype), from one GEMM for each chunk's logits."""
    require_class_indices("dense_cross_entropy", target, weight.shape[0], ignore_index)
    loss, row_weight = (input.new_empty(input.shape[0], dtype=accumulation_dtype(input.dtype)) for _ in range(2))
    gradients = _Gradients(input, weight, bias)
    for chunk in _chunks(input.shape[0], chunk_rows):
        logits = _logits(input, weight, bias, chunk)
        # forward_rows writes dloss_i/dz over the logits
        loss[chunk], _, row_weight[chunk] = forward_rows(
            logits, target[chunk], None, ignore_index, label_smoothing, write_grad=True)
        gradients.add(logits, input, chunk)
        del logits
    return loss, row_weight, gradients.result(rounded=False)


@dense_cross_entropy_forward_and_gradients.register_fake
def _(input, weight, bias, target, ignore_index, label_smoothing, chunk_rows):
    acc = accumulation_dtype(input.dtype)
    rows = input.shape[0]
    return input.new_empty(rows, dtype=acc), input.new_empty(rows, dtype=acc), _fake_gradients(
        input, weight, bias, sums_dtype=acc)


class DenseCrossEntropyFunction(Function):
    """The fused head, reduced. Outputs ``(loss, divisor, *held)``, all but the
    loss not differentiable: with ``grads_now`` ("mean" and "sum" only) the
    forward computes the gradients at s_i = 1 (held: dL/dx, dL/dW and dL/db
    with a bias, the last two in float32 (float64)) and the backward scales
    them; otherwise it holds lse_i and the backward computes the gradients
    with its s_i. Those are constants: when the backward itself is
    differentiated (``create_graph=True``, ``torch.func``) it recomputes them
    chunk by chunk through the differentiable blocks instead."""

    @staticmethod
    def forward(input, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_rows, grads_now):
        ops = torch.ops.torchblocks
        if grads_now:
            loss, row_weight, held = call(ops.dense_cross_entropy_forward_and_gradients,
                                          input, weight, bias, target, ignore_index, label_smoothing, chunk_rows)
        else:
            loss, lse, row_weight = call(ops.dense_cross_entropy_forward,
                                         input, weight, bias, target, ignore_index, label_smoothing, chunk_rows)
            held = [lse]
        divisor = row_weight.sum()
        return (reduce_rows(loss, divisor, reduction, input.dtype), divisor, *held)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_rows, grads_now = inputs
        _, divisor, *held = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable outputs
        ctx.options = (ignore_index, reduction, label_smoothing, chunk_rows, grads_now)
        ctx.save_for_backward(input, weight, bias, target, divisor, None if grads_now else held[0])
        if forward_ad_open():
            ctx.save_for_forward(input, weight, bias, target, divisor)
            ctx.held_outputs = len(held)
        # held, not saved: the first backward scales them in place and lets them go
        ctx.gradients = held if grads_now else None

    @staticmethod
    def backward(ctx, grad_output, *_):
        if grad_output is None:
            return (None,) * 9
        input, weight, bias, target, divisor, lse = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, chunk_rows, grads_now = ctx.options
        if reduction == "none":
            row_scale = grad_output
        else:
            # the divisor counts the rows not ignored; when it is 0 every gradient
            # row is 0 and stays 0, as in native (not 0 * inf)
            scale = grad_output / divisor.clamp(min=1) if reduction == "mean" else grad_output
            row_scale = scale.expand(input.shape[0])
        options = (ignore_index, label_smoothing, chunk_rows)
        if torch.is_grad_enabled() or batched(grad_output):  # differentiated, or a vmap over the backward
            gradients = differentiable_gradients(input, weight, bias, target, row_scale, *options)
        elif grads_now:
            gradients, ctx.gradients = ctx.gradients, None
            if gradients is None:  # a retained graph's second backward: the very same gradients, recomputed
                gradients = call(torch.ops.torchblocks.dense_cross_entropy_forward_and_gradients,
                                 input, weight, bias, target, *options)[2]
            # dL/dW and dL/db scaled in their float32 (float64) sums, then rounded once
            gradients = [grad.mul_(scale).to(input.dtype) for grad in gradients]
        else:
            gradients = call(torch.ops.torchblocks.dense_cross_entropy_gradients,
                             input, weight, bias, target, lse, row_scale, *options)
        grad_input, grad_weight, *grad_bias = gradients
        grad_bias = grad_bias[0] if grad_bias else None
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        return (
            grad_input if needs_input else None, grad_weight if needs_weight else None,
            grad_bias if needs_bias else None, None, None, None, None, None, None,
        )

    @staticmethod
    def jvp(ctx, tangent_input, tangent_weight, tangent_bias, *_):
        """dloss_i = sum_c g_ic * dz_ic, chunk by chunk: a chunk's logits, g
        and dz are all of the (R, C) alive at a time. Through the
        differentiable blocks, as ``differentiable_gradients``, so that the
        tangent can be differentiated in turn. Reduced as the loss; the other
        outputs have none."""
        input, weight, bias, target, divisor = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, chunk_rows, _ = ctx.options
        acc = accumulation_dtype(input.dtype)
        tangent_rows = []
        for chunk in _chunks(input.shape[0], chunk_rows):
            tangent_logits = dense_tangent(input[chunk], weight, tangent_input[chunk] if tangent_input is not None
                                           else None, tangent_weight, tangent_bias)
            logits = DenseFunction.apply(input[chunk], weight, bias, False)
            lse = _log_sum_exp(logits.detach().to(acc))
            grad_logits = CrossEntropyBackwardFunction.apply(
                logits, target[chunk], None, lse, torch.ones_like(lse), ignore_index, label_smoothing)
            del logits  # before the next chunk's: one chunk alive at a time
            tangent_rows.append((grad_logits.to(acc) * tangent_logits.to(acc)).sum(dim=1))
            del grad_logits, tangent_logits
        tangent_loss = torch.cat(tangent_rows) if tangent_rows else input.new_zeros(0, dtype=acc)
        return (reduce_rows(tangent_loss, divisor, reduction, input.dtype),) + (None,) * (1 + ctx.held_outputs)

    @staticmethod
    def vmap(info, in_dims, *args):
        return by_loop(DenseCrossEntropyFunction.apply, info, in_dims, *args)


def differentiable_gradients(input, weight, bias, target, row_scale, ignore_index, label_smoothing, chunk_rows):
    """[dL/dx, dL/dW] and dL/db with a bias, given s_i = ``row_scale``, chunk by chunk through
    the differentiable blocks (Dense, the cross-entropy gradient, the GEMMs),
    so that they can be differentiated again."""
    grad_inputs = []
    grad_weight = torch.zeros_like(weight)
    grad_bias = torch.zeros_like(weight[:, 0]) if bias is not None else None
    for chunk in _chunks(input.shape[0], chunk_rows):
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
    return [grad_input, grad_weight] + ([grad_bias] if bias is not None else [])


def reduced_head_loss(apply, input, weight, bias, target, reduction, ignore_index, label_smoothing, chunk_rows):
    """The fused head's loss, recorded by autograd: ``apply``
    (DenseCrossEntropyFunction's, or a twin's) with ``reduction`` an index of
    REDUCTIONS; the gradients are computed in the forward pass when they will
    be needed (not under saved-tensor hooks, which must see what the backward reads)."""
    name = REDUCTIONS[reduction]
    grads_now = name != "none" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)) and not saved_tensors_hooked()
    return apply(input, weight, bias, target, ignore_index, name, label_smoothing, chunk_rows, grads_now)[0]


def _dense_cross_entropy(input, weight, bias, target, reduction: int, ignore_index: int, label_smoothing: float,
                         chunk_rows: int):
    loss, _, row_weight = _forward(input, weight, bias, target, ignore_index, label_smoothing, chunk_rows)
    return reduce_rows(loss, row_weight.sum(), REDUCTIONS[reduction], input.dtype)


def _dense_cross_entropy_fake(input, weight, bias, target, reduction, ignore_index, label_smoothing, chunk_rows):
    return input.new_empty((input.shape[0],) if REDUCTIONS[reduction] == "none" else ())


def _dense_cross_entropy_recorded(*args):
    """The op's autograd where no compiled kernel records it."""
    return reduced_head_loss(lambda *inputs: apply_in_dispatcher(DenseCrossEntropyFunction, *inputs), *args)


def _dense_cross_entropy_vmap(info, in_dims, *args):
    return by_loop(torch.ops.torchblocks.dense_cross_entropy.default, info, in_dims, *args)


# One op, whatever runs it: input (R, K) through weight (C, K) and bias (C,)
# into the loss against class indices (R,); reduction 0 none, 1 mean, 2 sum.
define("dense_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, int reduction, "
       "int ignore_index, float label_smoothing, int chunk_rows) -> Tensor",
       _dense_cross_entropy, _dense_cross_entropy_fake)
torch.library.register_vmap("torchblocks::dense_cross_entropy", _dense_cross_entropy_vmap, lib=LIBRARY)
register_autograd("dense_cross_entropy", _dense_cross_entropy_recorded)
