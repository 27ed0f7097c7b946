"""Softmax cross-entropy over rows of logits x (R, C).

Class-index targets y, class weights w (1 without), W = sum_c w_c, smoothing eps:
    loss_i = (1 - eps) * w_y * (lse_i - x_y) - (eps / C) * sum_c w_c * log p_c
Backward (p = softmax(x), s_i = dL/dloss_i):
    dL/dx_c = s_i * (p_c * ((1 - eps) * w_y + (eps / C) * W) - (eps / C) * w_c - (1 - eps) * w_y * 1[c = y])

Class-probability targets t, smoothed t' = (1 - eps) * t + eps / C:
    loss_i = -sum_c w_c * t'_c * log p_c
Backward:
    dL/dx_c = s_i * (p_c * sum_c' w_c' * t'_c' - w_c * t'_c),   dL/dt_c = -s_i * (1 - eps) * w_c * log p_c

Reductions: "none" keeps loss_i; "sum" adds them; "mean" divides the sum by
sum_i w_y over rows not ignored (index targets) or by R (probability targets).
"""

from typing import Optional

import torch

from torchblocks import backend
from torchblocks._validate import require_class_indices

REDUCTIONS = ("none", "mean", "sum")


def accumulation_dtype(dtype):
    """float32 sums for float16/bfloat16/float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_sum_exp(x):
    """max + log sum exp(x - max) over dim 1, spelled out: torch.logsumexp
    returns inf for a row holding +inf, where native log_softmax gives NaN
    (inf - inf), and the kernels do as native does."""
    row_max = x.amax(dim=1, keepdim=True)
    return (row_max + torch.sub(x, row_max).exp_().sum(dim=1, keepdim=True).log()).squeeze(1)


def _target_weight(target, weight, classes, acc):
    """(index, w_y): targets clamped to a valid class for gathering, and the
    weight of each row's target class, NaN where the target is out of range."""
    in_range = (target >= 0) & (target < classes)
    index = torch.where(in_range, target, 0).long()
    w_y = weight.to(acc)[index] if weight is not None else torch.ones(index.shape, dtype=acc, device=index.device)
    return index, torch.where(in_range, w_y, float("nan"))


def _reference_forward(logits, target, weight, ignore_index, label_smoothing):
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    classes = x.shape[1]
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
    valid = target != ignore_index
    index, w_y = _target_weight(target, weight, classes, acc)
    w_y = torch.where(valid, w_y, 0.0)
    factor = torch.where(valid, row_scale.to(acc), 0.0)
    weight_total = weight.to(acc).sum() if weight is not None else classes
    in_out = out is not None and out.dtype == acc
    grad = torch.sub(logits.to(acc), lse[:, None], out=out if in_out else None).exp_()
    grad.mul_((((1 - label_smoothing) * w_y + label_smoothing / classes * weight_total) * factor)[:, None])
    if label_smoothing > 0:
        if weight is not None:
            grad.addr_(factor, weight.to(acc), alpha=-label_smoothing / classes)
        else:
            grad.sub_(factor[:, None] * (label_smoothing / classes))
    grad.scatter_add_(1, index[:, None], (-(1 - label_smoothing) * w_y * factor)[:, None])
    return grad.to(logits.dtype)


def forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad):
    """The forward ops' body, on targets already checked: (loss_i, lse_i, w_y),
    and with ``write_grad`` dloss_i/dx written over ``logits``."""
    if backend.use_triton(logits):
        from torchblocks.kernels import cross_entropy as kernels

        grad = logits if write_grad else None
        return kernels.cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, grad=grad)
    loss, lse, row_weight = _reference_forward(logits, target, weight, ignore_index, label_smoothing)
    if write_grad:
        ones = torch.ones_like(lse)
        grad = _reference_gradient(logits, target, weight, lse, ones, ignore_index, label_smoothing, out=logits)
        if grad is not logits:  # half logits: the gradient was computed in float32
            logits.copy_(grad)
    return loss, lse, row_weight


@torch.library.custom_op("torchblocks::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_i, lse_i, w_y or 0 where ignored), each (R,)."""
    require_class_indices("softmax_cross_entropy", target, logits.shape[1], ignore_index)
    return forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad=False)


@torch.library.custom_op("torchblocks::cross_entropy_forward_grad_", mutates_args=("logits",))
def cross_entropy_forward_grad_(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As cross_entropy_forward, and overwrites ``logits`` with dloss_i/dx."""
    require_class_indices("softmax_cross_entropy", target, logits.shape[1], ignore_index)
    return forward_rows(logits, target, weight, ignore_index, label_smoothing, write_grad=True)


@cross_entropy_forward.register_fake
@cross_entropy_forward_grad_.register_fake
def _(logits, target, weight, ignore_index, label_smoothing):
    acc = accumulation_dtype(logits.dtype)
    return tuple(logits.new_empty(logits.shape[0], dtype=acc) for _ in range(3))


@torch.library.custom_op("torchblocks::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], lse: torch.Tensor,
    row_scale: torch.Tensor, ignore_index: int, label_smoothing: float,
) -> torch.Tensor:
    """dL/dx (R, C) given s_i = ``row_scale``."""
    if backend.use_triton(logits):
        from torchblocks.kernels import cross_entropy as kernels

        return kernels.cross_entropy_backward(logits, target, weight, lse, row_scale, ignore_index, label_smoothing)
    return _reference_gradient(logits, target, weight, lse, row_scale, ignore_index, label_smoothing)


@cross_entropy_backward.register_fake
def _(logits, target, weight, lse, row_scale, ignore_index, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def reduce_rows(loss, divisor, reduction, dtype):
    """The reduction of the per-row losses, in ``dtype``."""
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    return (total / divisor if reduction == "mean" else total).to(dtype)


def row_scale(grad_output, divisor, reduction, rows):
    """s_i = dL/dloss_i for every row, from the incoming gradient."""
    if reduction == "none":
        return grad_output
    scale = grad_output / divisor if reduction == "mean" else grad_output
    return scale.expand(rows)


class CrossEntropyFunction(torch.autograd.Function):
    """Index targets. With ``inplace_backward`` the forward writes dloss_i/dx
    into the logits' storage (autograd's version counter sees the write) and
    the backward only scales it."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, inplace_backward):
        in_place = inplace_backward and ctx.needs_input_grad[0]
        forward = torch.ops.torchblocks.cross_entropy_forward_grad_ if in_place else torch.ops.torchblocks.cross_entropy_forward
        loss, lse, row_weight = forward(logits, target, weight, ignore_index, label_smoothing)
        divisor = row_weight.sum()
        ctx.options = (ignore_index, reduction, label_smoothing, in_place)
        ctx.save_for_backward(logits, target, weight, lse, divisor)
        return reduce_rows(loss, divisor, reduction, logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        logits, target, weight, lse, divisor = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, in_place = ctx.options
        scale = row_scale(grad_output, divisor, reduction, logits.shape[0])
        if in_place:  # logits now hold dloss_i/dx; ignored rows stay 0 even if the mean is 0/0
            scale = torch.where(target != ignore_index, scale, 0.0)
            grad_logits = logits.mul_(scale.to(logits.dtype)[:, None])
        else:
            grad_logits = torch.ops.torchblocks.cross_entropy_backward(
                logits, target, weight, lse, scale, ignore_index, label_smoothing
            )
        return grad_logits, None, None, None, None, None, None


class ProbabilityCrossEntropyFunction(torch.autograd.Function):
    """Class-probability targets, in plain PyTorch ops on every backend."""

    @staticmethod
    def forward(ctx, logits, target, weight, reduction, label_smoothing):
        acc = accumulation_dtype(logits.dtype)
        classes = logits.shape[1]
        log_p = logits.to(acc) - _log_sum_exp(logits.to(acc))[:, None]
        weighted_target = target.to(acc) * (1 - label_smoothing) + label_smoothing / classes
        if weight is not None:
            weighted_target = weighted_target * weight.to(acc)
        loss = -(log_p * weighted_target).sum(dim=1)
        ctx.options = (reduction, label_smoothing)
        ctx.save_for_backward(log_p, weighted_target, weight)
        return reduce_rows(loss, loss.new_tensor(float(logits.shape[0])), reduction, logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        log_p, weighted_target, weight = ctx.saved_tensors
        reduction, label_smoothing = ctx.options
        rows = log_p.shape[0]
        scale = row_scale(grad_output.to(log_p.dtype), float(rows), reduction, rows)[:, None]
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = (scale * (log_p.exp() * weighted_target.sum(dim=1, keepdim=True) - weighted_target))
            grad_logits = grad_logits.to(grad_output.dtype)
        if ctx.needs_input_grad[1]:
            w = weight.to(log_p.dtype) if weight is not None else 1.0
            grad_target = (-scale * (1 - label_smoothing) * w * log_p).to(grad_output.dtype)
        return grad_logits, grad_target, None, None, None
