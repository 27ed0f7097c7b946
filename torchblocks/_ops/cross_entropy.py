"""Softmax cross-entropy over rows of logits x (R, C).

Class-index targets y, class weights w (1 without), W = sum_c w_c, smoothing eps:
    loss_i = (1 - eps) * w_y * (lse_i - x_y) - (eps / C) * sum_c w_c * log p_c
Backward (p = softmax(x), s_i = dL/dloss_i):
    dL/dx_c = s_i * (p_c * ((1 - eps) * w_y + (eps / C) * W) - (eps / C) * w_c - (1 - eps) * w_y * 1[c = y])

Class-probability targets t, smoothed t' = (1 - eps) * t + eps / C:
    loss_i = -sum_c w_c * t'_c * log p_c
Backward:
    dL/dx_c = s_i * (p_c * sum_c' w_c' * t'_c' - w_c * t'_c),   dL/dt_c = -s_i * (1 - eps) * w_c * log p_c
    dL/dw_c = -sum_i s_i * t'_ic * log p_ic

Forward mode (jvp), the same gradients against the tangents dx, dt, dw:
    index targets:          dloss_i = sum_c dloss_i/dx_c * dx_c     (the backward's dL/dx at s_i = 1)
    probability targets:    dloss_i = sum_c (p_c * sum_c' w_c' * t'_c' - w_c * t'_c) * dx_c
                                      - (1 - eps) * sum_c w_c * log p_c * dt_c - sum_c t'_c * log p_c * dw_c

Reductions: "none" keeps loss_i; "sum" adds them; "mean" divides the sum by
sum_i w_y over rows not ignored (index targets) or by R (probability targets).

Index targets are one dispatcher op, ``torchblocks::cross_entropy`` (rows,
weights, reduction: aten::cross_entropy_loss's arguments), defined at the end
of this file with its fake, a vmap rule, its kernel for every device and its
autograd (CrossEntropyFunction over the rows, then the reduction). The
compiled eager CPU path (eager_cpu.cpp) registers C++ kernels of the same op
while it serves, which take the common case and hand the rest to these.
"""

import math
from typing import Optional

import torch

from torchblocks import backend
from torchblocks._ops._dispatch import (
    LIBRARY, Function, apply_in_dispatcher, call, custom_op, define, forward_ad_open, kernels, pick, plain_eager,
    register_autograd, saved_tensors_hooked,
)
from torchblocks._ops._vmap import batched, by_loop, fold_rows
from torchblocks._validate import REDUCTIONS, require_class_indices
from torchblocks.kernels._common import accumulation_dtype

LOG2E = 1.4426950408889634


def _exp_of_difference(x, shift, out=None):
    """exp(x - shift) as exp2((x - shift) * log2 e), as the kernels compute it:
    on the CPU torch.exp takes 2.5x as long as torch.exp2 and a multiply
    (1M floats: 460 us against 150 + 40)."""
    return torch.sub(x, shift, out=out).mul_(LOG2E).exp2_()


def _log_sum_exp(x):
    """max + log sum exp(x - max) over dim 1, spelled out: torch.logsumexp
    returns inf for a row holding +inf, where native log_softmax gives NaN
    (inf - inf), and the kernels do as native does."""
    row_max = x.amax(dim=1, keepdim=True)
    return (row_max + _exp_of_difference(x, row_max).sum(dim=1, keepdim=True).log()).squeeze(1)


def _target_weight(target, weight, classes, acc):
    """(index, w_y): targets clamped to a valid class for gathering, and the
    weight of each row's target class, NaN where the target is out of range."""
    in_range = (target >= 0) & (target < classes)
    index = torch.where(in_range, target, 0).long()
    w_y = weight.to(acc)[index] if weight is not None else torch.ones(index.shape, dtype=acc, device=index.device)
    return index, torch.where(in_range, w_y, float("nan"))


def _plain_rows(target, classes, weight, ignore_index, label_smoothing) -> bool:
    """True for the common case on the CPU: no class weights, no smoothing,
    every target a class, none ignored. Then loss_i = lse_i - x_y and
    dloss_i/dx = p - onehot(y), in the fewest passes. (Elsewhere reading
    the targets' range would cost a host sync.)"""
    if weight is not None or label_smoothing != 0 or target.device.type != "cpu" or target.numel() == 0:
        return False
    low, high = (int(bound) for bound in torch.aminmax(target))
    return 0 <= low and high < classes and not (low <= ignore_index <= high and bool((target == ignore_index).any()))


def _reference_forward(logits, target, weight, ignore_index, label_smoothing):
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    classes = x.shape[1]
    if _plain_rows(target, classes, weight, ignore_index, label_smoothing):
        return _plain_forward_and_gradient(x, target, gradient=False)[:3]
    lse = _log_sum_exp(x)
    index, w_y = _target_weight(target, weight, classes, acc)
    loss = (1 - label_smoothing) * w_y * (lse - x.gather(1, index[:, None]).squeeze(1))
    if label_smoothing > 0:
        w = weight.to(acc) if weight is not None else 1.0
        loss = loss - label_smoothing / classes * ((x - lse[:, None]) * w).sum(dim=1)
    valid = target != ignore_index
    return torch.where(valid, loss, 0.0), lse, torch.where(valid, w_y, 0.0)


def _reference_gradient(logits, target, weight, lse, row_scale, ignore_index, label_smoothing, out=None):
    """The backward formula at the top, in place on one (R, C) buffer: ``out``
    (it may be ``logits``) when it has the accumulation dtype, else a new one.
    Ignored rows get the row factor 0 (so a NaN row stays NaN, as native's
    0 - p * 0)."""
    acc = accumulation_dtype(logits.dtype)
    classes = logits.shape[1]
    in_out = out is not None and out.dtype == acc
    scaled = torch.mul if batched(row_scale) else torch.Tensor.mul_  # a batched factor makes a new buffer
    if _plain_rows(target, classes, weight, ignore_index, label_smoothing):
        scale = row_scale.to(acc)[:, None]
        grad = scaled(_exp_of_difference(logits.to(acc), lse[:, None], out=out if in_out else None), scale)
        return grad.scatter_add_(1, target.long()[:, None], -scale).to(logits.dtype)
    valid = target != ignore_index
    index, w_y = _target_weight(target, weight, classes, acc)
    w_y = torch.where(valid, w_y, 0.0)
    factor = torch.where(valid, row_scale.to(acc), 0.0)
    weight_total = weight.to(acc).sum() if weight is not None else classes
    grad = _exp_of_difference(logits.to(acc), lse[:, None], out=out if in_out else None)
    grad = scaled(grad, (((1 - label_smoothing) * w_y + label_smoothing / classes * weight_total) * factor)[:, None])
    if label_smoothing > 0:
        if weight is not None:
            grad.addr_(factor, weight.to(acc), alpha=-label_smoothing / classes)
        else:
            grad.sub_(factor[:, None] * (label_smoothing / classes))
    grad.scatter_add_(1, index[:, None], (-(1 - label_smoothing) * w_y * factor)[:, None])
    return grad.to(logits.dtype)


def _cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, grad=None):
    """``kernels.cross_entropy.cross_entropy_forward`` in plain PyTorch:
    (loss_i, lse_i, w_y), and with ``grad`` (the logits themselves)
    dloss_i/dx written over it."""
    if grad is not None and logits.dtype == accumulation_dtype(logits.dtype) and _plain_rows(
            target, logits.shape[1], weight, ignore_index, label_smoothing):
        return _plain_forward_and_gradient(logits, target, out=grad)[:3]
    loss, lse, row_weight = _reference_forward(logits, target, weight, ignore_index, label_smoothing)
    if grad is not None:
        ones = torch.ones_like(lse)
        computed = _reference_gradient(logits, target, weight, lse, ones, ignore_index, label_smoothing, out=grad)
        if computed is not grad:  # half logits: the gradient was computed in float32
            grad.copy_(computed)
    return loss, lse, row_weight


def forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad):
    """The forward ops' body, on targets already checked: (loss_i, lse_i, w_y),
    and with ``write_grad`` dloss_i/dx written over ``logits``."""
    forward = pick(logits, kernels.cross_entropy.cross_entropy_forward, _cross_entropy_forward)
    return forward(logits, target, weight, ignore_index, label_smoothing, grad=logits if write_grad else None)


def backward_rows(logits, target, weight, lse, row_scale, ignore_index, label_smoothing, out=None):
    """The backward op's body: dL/dx given lse_i and s_i = ``row_scale``,
    written into ``out`` (it may be ``logits``) where its dtype allows."""
    backward = pick(logits, kernels.cross_entropy.cross_entropy_backward, _reference_gradient)
    return backward(logits, target, weight, lse, row_scale, ignore_index, label_smoothing, out=out)


RowStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (loss_i, lse_i, w_y or 0 where ignored), each (R,)


def _checked_forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad):
    require_class_indices("softmax_cross_entropy", target, logits.shape[1], ignore_index)
    return forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad)


@custom_op("torchblocks::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                          ignore_index: int, label_smoothing: float) -> RowStats:
    """(loss_i, lse_i, w_y or 0 where ignored), each (R,)."""
    return _checked_forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad=False)


@custom_op("torchblocks::cross_entropy_forward_grad_", mutates_args=("logits",))
def cross_entropy_forward_grad_(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                                ignore_index: int, label_smoothing: float) -> RowStats:
    """As cross_entropy_forward, and overwrites ``logits`` with dloss_i/dx."""
    return _checked_forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad=True)


@cross_entropy_forward.register_fake
@cross_entropy_forward_grad_.register_fake
def _(logits, target, weight, ignore_index, label_smoothing):
    acc = accumulation_dtype(logits.dtype)
    return tuple(logits.new_empty(logits.shape[0], dtype=acc) for _ in range(3))


@custom_op("torchblocks::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], lse: torch.Tensor,
    row_scale: torch.Tensor, ignore_index: int, label_smoothing: float,
) -> torch.Tensor:
    """dL/dx (R, C) given s_i = ``row_scale``."""
    return backward_rows(logits, target, weight, lse, row_scale, ignore_index, label_smoothing)


@cross_entropy_backward.register_fake
def _(logits, target, weight, lse, row_scale, ignore_index, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def reduce_rows(loss, divisor, reduction, dtype):
    """The reduction of the per-row losses, in ``dtype``, in differentiable
    ops: autograd hands each row its s_i = dL/dloss_i. No ``.to`` where the
    dtype is already right: inside an autograd Function's forward, that
    alias of an intermediate loses its gradient under torch 2.11's compile."""
    if reduction != "none":
        loss = loss.sum() / divisor if reduction == "mean" else loss.sum()
    return loss if loss.dtype == dtype else loss.to(dtype)


def _plain_forward_and_gradient(logits, target, out=None, gradient=True):
    """The CPU's common case (``_plain_rows``), forward and gradient in one
    go: the forward's exp(x - max) is the backward's p, so the costliest pass,
    the exp, runs once instead of twice. The gradient goes to ``out`` (it may
    be ``logits``) or a new buffer.
    Returns (loss_i, lse_i, ones, dloss_i/dx = p - onehot(y), or None without
    ``gradient``) in the accumulation dtype."""
    x = logits.to(accumulation_dtype(logits.dtype))
    index = target.long()[:, None]
    row_max = x.amax(dim=1, keepdim=True)
    target_logit = x.gather(1, index).squeeze(1)  # read before ``out`` may overwrite x
    exp_shifted = _exp_of_difference(x, row_max, out=out)
    sum_exp = exp_shifted.sum(dim=1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    grad_rows = None
    if gradient:
        grad_rows = exp_shifted.div_(sum_exp).scatter_add_(1, index, torch.full_like(lse, -1.0)[:, None])
    return lse - target_logit, lse, torch.ones_like(lse), grad_rows


class CrossEntropyFunction(Function):
    """Index targets, per row: ``(loss_i, w_y or 0 where ignored, lse_i,
    the held dloss_i/dx or None)``; only loss_i is differentiable. With
    ``inplace_backward`` the forward writes dloss_i/dx into the logits'
    storage (autograd's version counter sees the write) and the backward only
    scales it. With ``grads_now``, on
    the CPU's common case in eager mode, the forward computes dloss_i/dx into
    a buffer of its own that the first backward scales in place and lets go
    (as the fused head does); a differentiated backward (create_graph)
    recomputes it in differentiable ops."""

    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, inplace_backward, grads_now):
        if not inplace_backward and weight is None and not backend.use_triton(logits) \
                and plain_eager((logits, target)) \
                and _plain_rows(target, logits.shape[1], weight, ignore_index, label_smoothing):
            # the CPU's common case in eager mode: the body of cross_entropy_forward's
            # plain path, its class-index check included, with the gradient if it will be needed
            loss, lse, row_weight, grad_rows = _plain_forward_and_gradient(logits, target, gradient=grads_now)
            return loss, row_weight, lse, grad_rows
        forward = (torch.ops.torchblocks.cross_entropy_forward_grad_ if inplace_backward
                   else torch.ops.torchblocks.cross_entropy_forward)
        loss, lse, row_weight = call(forward, logits, target, weight, ignore_index, label_smoothing)
        return loss, row_weight, lse, None

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, inplace_backward, _ = inputs
        _, row_weight, lse, grad_rows = output
        ctx.mark_non_differentiable(row_weight, lse, *([grad_rows] if grad_rows is not None else []))
        ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable outputs
        ctx.options = (ignore_index, label_smoothing, inplace_backward)
        ctx.save_for_backward(logits, target, weight, lse)
        if forward_ad_open():
            ctx.save_for_forward(logits, target, weight, lse)
        ctx.plain_rows = grad_rows is not None
        ctx.grad_rows = grad_rows  # held, not saved: the first backward scales it in place

    @staticmethod
    def backward(ctx, grad_loss, grad_row_weight, grad_lse, grad_grad_rows):
        if grad_loss is None:
            return (None,) * 7
        logits, target, weight, lse = ctx.saved_tensors
        ignore_index, label_smoothing, inplace_backward = ctx.options
        if ctx.plain_rows and not torch.is_grad_enabled():
            # the forward's buffer, scaled in place and let go; a retained graph's next
            # backward recomputes it with the same code, so to the same bits (gradcheck checks)
            grad_rows, ctx.grad_rows = ctx.grad_rows, None
            if grad_rows is None:
                grad_rows = _plain_forward_and_gradient(logits, target)[3]
            row_scale = grad_loss.to(grad_rows.dtype)[:, None]
            in_place = not batched(grad_loss)
            grad_logits = (grad_rows.mul_(row_scale) if in_place else grad_rows * row_scale).to(logits.dtype)
        elif not inplace_backward:
            grad_logits = CrossEntropyBackwardFunction.apply(
                logits, target, weight, lse, grad_loss, ignore_index, label_smoothing)
        elif torch.is_grad_enabled():
            raise RuntimeError(
                "softmax_cross_entropy: inplace_backward=True overwrote the logits with the gradient, so no "
                "gradient of the gradient exists (create_graph=True); use inplace_backward=False")
        else:  # the logits hold dloss_i/dx; ignored rows stay 0 even if the mean is 0/0
            scale = torch.where(target != ignore_index, grad_loss, 0.0)
            grad_logits = logits.mul_(scale.to(logits.dtype)[:, None])
        return grad_logits, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tangent_logits, *_):
        """dloss_i = sum_c dloss_i/dx_c * dx_c, from the gradient at s_i = 1:
        the one the forward wrote over the logits (``inplace_backward``), else
        CrossEntropyBackwardFunction's, so that the tangent can be
        differentiated in turn. The other outputs have none."""
        logits, target, weight, lse = ctx.saved_tensors
        ignore_index, label_smoothing, inplace_backward = ctx.options
        if inplace_backward:
            grad_rows = logits
        else:
            grad_rows = CrossEntropyBackwardFunction.apply(
                logits, target, weight, lse, torch.ones_like(lse), ignore_index, label_smoothing)
        tangent_loss = (grad_rows.to(lse.dtype) * tangent_logits.to(lse.dtype)).sum(dim=1)
        return tangent_loss, None, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, ignore_index, label_smoothing, inplace_backward, grads_now):
        args = (logits, target, weight, ignore_index, label_smoothing, inplace_backward, False)
        if inplace_backward:  # folding could copy the logits; a loop writes into views of them
            return by_loop(CrossEntropyFunction.apply, info, in_dims, *args)
        return fold_rows(CrossEntropyFunction.apply, info, in_dims, args, row_args=(0, 1))


class CrossEntropyBackwardFunction(Function):
    """dL/dx = s_i * g_i(x) (the backward formula at the top) as a Function of
    its own, for a gradient of the gradient. With a_i = (1 - eps) * w_y +
    (eps / C) * W, f_i = s_i (0 where ignored) and upstream H = d(.)/d(dL/dx):
        d(.)/ds_i  = sum_c H_ic * g_ic                        (0 where ignored)
        d(.)/dx_ic = f_i * a_i * p_ic * (H_ic - sum_c' H_ic' * p_ic')
    computed in differentiable ops from x (p recomputed, not saved), so
    higher derivatives follow too; its jvp is the same two products, forward."""

    @staticmethod
    def forward(logits, target, weight, lse, row_scale, ignore_index, label_smoothing):
        return call(torch.ops.torchblocks.cross_entropy_backward,
                    logits, target, weight, lse, row_scale, ignore_index, label_smoothing)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, _, row_scale, ignore_index, label_smoothing = inputs
        ctx.options = (ignore_index, label_smoothing)
        ctx.save_for_backward(logits, target, weight, row_scale)
        if forward_ad_open():
            ctx.save_for_forward(logits, target, weight, row_scale)

    @staticmethod
    def backward(ctx, upstream):
        logits, target, weight, row_scale = ctx.saved_tensors
        valid, p, row_coef, grad_rows = _unit_gradient(logits, target, weight, *ctx.options)
        upstream = upstream.to(p.dtype)
        grad_row_scale = grad_logits = None
        if ctx.needs_input_grad[4]:
            grad_row_scale = torch.where(valid, (upstream * grad_rows).sum(dim=1), 0.0).to(row_scale.dtype)
        if ctx.needs_input_grad[0]:
            factor = torch.where(valid, row_scale.to(p.dtype), 0.0) * row_coef
            grad_logits = factor[:, None] * p * (upstream - (upstream * p).sum(dim=1, keepdim=True))
            grad_logits = grad_logits.to(logits.dtype)
        return grad_logits, None, None, None, grad_row_scale, None, None

    @staticmethod
    def jvp(ctx, tangent_logits, _target, _weight, _lse, tangent_row_scale, _ignore_index, _label_smoothing):
        """The backward's two products, forward: with dx, ds (lse a constant,
        as in the backward; the class weights not differentiated)
            d(dL/dx_ic) = ds_i * g_ic + f_i * a_i * p_ic * (dx_ic - sum_c' p_ic' * dx_ic')"""
        logits, target, weight, row_scale = ctx.saved_tensors
        valid, p, row_coef, grad_rows = _unit_gradient(logits, target, weight, *ctx.options)
        tangent = torch.zeros_like(p)
        if tangent_row_scale is not None:
            tangent = tangent + torch.where(valid, tangent_row_scale.to(p.dtype), 0.0)[:, None] * grad_rows
        if tangent_logits is not None:
            factor = torch.where(valid, row_scale.to(p.dtype), 0.0) * row_coef
            tangent_x = tangent_logits.to(p.dtype)
            tangent = tangent + factor[:, None] * p * (tangent_x - (tangent_x * p).sum(dim=1, keepdim=True))
        return tangent.to(logits.dtype)

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, lse, row_scale, ignore_index, label_smoothing):
        args = (logits, target, weight, lse, row_scale, ignore_index, label_smoothing)
        return fold_rows(CrossEntropyBackwardFunction.apply, info, in_dims, args, row_args=(0, 1, 3, 4))


def _unit_gradient(logits, target, weight, ignore_index, label_smoothing):
    """(valid_i, p, a_i = (1 - eps) * w_y + (eps / C) * W, g = dloss_i/dx at
    s_i = 1) in differentiable ops from x, in the accumulation dtype: what
    CrossEntropyBackwardFunction's backward and jvp differentiate."""
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    classes = x.shape[1]
    valid = target != ignore_index
    index, w_y = _target_weight(target, weight, classes, acc)
    w_y = torch.where(valid, w_y, 0.0)
    weight_total = weight.to(acc).sum() if weight is not None else classes
    row_coef = (1 - label_smoothing) * w_y + label_smoothing / classes * weight_total
    p = (x - _log_sum_exp(x)[:, None]).exp()
    grad_rows = p * row_coef[:, None] - label_smoothing / classes * (weight.to(acc) if weight is not None else 1.0)
    grad_rows = grad_rows - torch.zeros_like(p).scatter_(1, index[:, None], ((1 - label_smoothing) * w_y)[:, None])
    return valid, p, row_coef, grad_rows


class ProbabilityCrossEntropyFunction(Function):
    """Class-probability targets, per row, in plain PyTorch ops on every
    backend. The backward is written in differentiable ops from the saved
    inputs (log p recomputed, not saved), so it can be differentiated again."""

    @staticmethod
    def forward(logits, target, weight, label_smoothing):
        log_p, smoothed = _log_probabilities(logits), _smoothed(target, label_smoothing)
        return -(log_p * _weighted(smoothed, weight)).sum(dim=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, label_smoothing = inputs
        ctx.label_smoothing = label_smoothing
        ctx.save_for_backward(logits, target, weight)
        if forward_ad_open():
            ctx.save_for_forward(logits, target, weight)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, weight = ctx.saved_tensors
        log_p, smoothed = _log_probabilities(logits), _smoothed(target, ctx.label_smoothing)
        weighted = _weighted(smoothed, weight)
        scale = grad_loss.to(log_p.dtype)[:, None]
        grad_logits = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_logits = (scale * (log_p.exp() * weighted.sum(dim=1, keepdim=True) - weighted)).to(logits.dtype)
        if ctx.needs_input_grad[1]:
            w = weight.to(log_p.dtype) if weight is not None else 1.0
            grad_target = (-scale * (1 - ctx.label_smoothing) * w * log_p).to(target.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = (-scale * smoothed * log_p).sum(dim=0).to(weight.dtype)
        return grad_logits, grad_target, grad_weight, None

    @staticmethod
    def jvp(ctx, tangent_logits, tangent_target, tangent_weight, _):
        """The backward's three gradients, each against its tangent, summed
        over the classes; a missing (None) tangent counts as zero."""
        logits, target, weight = ctx.saved_tensors
        log_p, smoothed = _log_probabilities(logits), _smoothed(target, ctx.label_smoothing)
        weighted = _weighted(smoothed, weight)
        tangent_loss = torch.zeros_like(weighted[:, 0] * log_p[:, 0])  # (R,), the loss's dtype
        if tangent_logits is not None:
            grad_logits = log_p.exp() * weighted.sum(dim=1, keepdim=True) - weighted
            tangent_loss = tangent_loss + (grad_logits * tangent_logits.to(log_p.dtype)).sum(dim=1)
        if tangent_target is not None:
            w = weight.to(log_p.dtype) if weight is not None else 1.0
            tangent_loss = tangent_loss - (1 - ctx.label_smoothing) * (
                w * log_p * tangent_target.to(smoothed.dtype)).sum(dim=1)
        if tangent_weight is not None:
            tangent_loss = tangent_loss - (smoothed * log_p * tangent_weight.to(log_p.dtype)).sum(dim=1)
        return tangent_loss

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, label_smoothing):
        args = (logits, target, weight, label_smoothing)
        return fold_rows(ProbabilityCrossEntropyFunction.apply, info, in_dims, args, row_args=(0, 1))


def _log_probabilities(logits):
    """log p = x - lse(x), in the accumulation dtype."""
    x = logits.to(accumulation_dtype(logits.dtype))
    return x - _log_sum_exp(x)[:, None]


def _smoothed(target, label_smoothing):
    """t' = (1 - eps) * t + eps / C, in the accumulation dtype."""
    return target.to(accumulation_dtype(target.dtype)) * (1 - label_smoothing) + label_smoothing / target.shape[1]


def _weighted(smoothed, weight):
    """w_c * t'_c."""
    return smoothed * weight.to(smoothed.dtype) if weight is not None else smoothed


def class_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(C) -> (1, C); (N, C, d1, ...) -> (N * d1 * ..., C): the class dim last,
    the rows the ops take. (N, C) stays itself: no view for autograd to record
    and undo.

    Example::

        >>> class_rows(torch.randn(8, 10, 4, 4)).shape
        torch.Size([128, 10])
    """
    if tensor.dim() == 1:
        return tensor.unsqueeze(0)
    if tensor.dim() == 2:
        return tensor
    moved = tensor.movedim(1, -1)
    return moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])


def probability_loss(apply, logits, target, weight, reduction, label_smoothing, dtype):
    """The loss of rows ``logits`` (R, C) against class probabilities
    ``target`` (R, C), recorded by autograd: ``apply``
    (ProbabilityCrossEntropyFunction's, or a twin's) over the rows, then
    ``reduction`` (a name; "mean" over the R rows) in ``dtype``."""
    loss = apply(logits, target, weight, label_smoothing)
    return reduce_rows(loss, loss.new_tensor(float(loss.shape[0])), reduction, dtype)


def reduced_loss(apply, logits, target, weight, reduction, ignore_index, label_smoothing, inplace_backward=False):
    """The loss of rows ``logits`` (R, C) against class indices ``target``
    (R,), recorded by autograd: ``apply`` (CrossEntropyFunction's, or a twin's)
    over the rows, then ``reduction`` (an index of REDUCTIONS) in
    differentiable ops, in the logits' dtype."""
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    in_place = inplace_backward and needs_grad
    grads_now = needs_grad and not in_place and logits.device.type == "cpu" and not saved_tensors_hooked()
    loss, row_weight, *_ = apply(logits, target, weight, ignore_index, label_smoothing, in_place, grads_now)
    return reduce_rows(loss, row_weight.sum(), REDUCTIONS[reduction], logits.dtype)


def _cross_entropy(logits, target, weight, reduction: int, ignore_index: int, label_smoothing: float):
    loss, _, row_weight = _checked_forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad=False)
    return reduce_rows(loss, row_weight.sum(), REDUCTIONS[reduction], logits.dtype)


def _cross_entropy_fake(logits, target, weight, reduction, ignore_index, label_smoothing):
    return logits.new_empty((logits.shape[0],) if REDUCTIONS[reduction] == "none" else ())


def _cross_entropy_recorded(logits, target, weight, reduction, ignore_index, label_smoothing):
    """The op's autograd where no compiled kernel records it."""
    return reduced_loss(lambda *args: apply_in_dispatcher(CrossEntropyFunction, *args),
                        logits, target, weight, reduction, ignore_index, label_smoothing)


def _cross_entropy_vmap(info, in_dims, *args):
    return by_loop(torch.ops.torchblocks.cross_entropy.default, info, in_dims, *args)


# One op, whatever runs it: the loss of rows against class indices, with
# aten::cross_entropy_loss's arguments (reduction 0 none, 1 mean, 2 sum).
define("cross_entropy(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, "
       "float label_smoothing) -> Tensor", _cross_entropy, _cross_entropy_fake)
torch.library.register_vmap("torchblocks::cross_entropy", _cross_entropy_vmap, lib=LIBRARY)
register_autograd("cross_entropy", _cross_entropy_recorded)
