"""Softmax cross-entropy over rows of logits x (R, C), class-index targets y.

Per row i, with lse = log sum_c exp(x_c), log p_c = x_c - lse, class weights w
(all 1 without weights), W = sum_c w_c and smoothing eps:
    loss_i = (1 - eps) * w_y * (lse - x_y) - (eps / C) * sum_c w_c * log p_c
    dloss_i/dx_c = p_c * ((1 - eps) * w_y + (eps / C) * W) - (eps / C) * w_c - (1 - eps) * w_y * 1[c = y]
Rows whose target is ignore_index have loss 0 and gradient 0 (NaN where the
row holds NaN, as native). A target out of
[0, C) reads nothing out of bounds: its loss and gradient are NaN.

The log-sum-exp is online (running max and running sum, one read of the row)
in chunks of BLOCK_C classes, so rows of any length work; everything is
accumulated in float32 (float64 for float64 logits).
"""

import torch
import triton
import triton.language as tl

from ._launch import accumulation_dtype, device_guard, triton_accumulation_dtype

# Widest chunk of a row one program holds at once.
MAX_BLOCK_C = 4096


@triton.jit
def _class_weights(weight_ptr, stride_weight, cols, mask,
                   HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """w_c for a chunk of classes (int64 ``cols``): the class weights, or 1 without them."""
    if HAS_WEIGHT:
        return tl.load(weight_ptr + cols * stride_weight, mask=mask, other=0.0).to(ACC_DTYPE)
    return tl.full((BLOCK_C,), 1.0, ACC_DTYPE)


@triton.jit
def _target_weight(weight_ptr, stride_weight, y, C, HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """w_y, NaN when y is out of [0, C): nothing is read out of bounds."""
    in_range = (y >= 0) & (y < C)
    if HAS_WEIGHT:
        return tl.load(weight_ptr + y * stride_weight, mask=in_range, other=float("nan")).to(ACC_DTYPE)
    return tl.where(in_range, 1.0, float("nan")).to(ACC_DTYPE)


@triton.jit
def _row_gradient(
    logits_row_ptr, grad_row_ptr, weight_ptr,
    stride_col, grad_stride_col, stride_weight, C, y, lse, w_y, weight_total, scale, valid, label_smoothing,
    HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Write scale * dloss_i/dx for one row (the formula at the top of the
    file). An ignored row gets the factor 0 and w_y = 0, not a select: a NaN
    row stays NaN (native's 0 - p * 0) and a 0/0 mean scale never reaches it."""
    factor = tl.where(valid, scale, 0.0)
    w_y = tl.where(valid, w_y, 0.0)
    coef = (1 - label_smoothing) * w_y + label_smoothing / C * weight_total
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = cols < C
        x = tl.load(logits_row_ptr + cols * stride_col, mask=mask, other=0.0).to(ACC_DTYPE)
        w = _class_weights(weight_ptr, stride_weight, cols, mask, HAS_WEIGHT, ACC_DTYPE, BLOCK_C)
        p = tl.exp(x - lse)
        grad = (p * coef - label_smoothing / C * w - tl.where(cols == y, (1 - label_smoothing) * w_y, 0.0)) * factor
        tl.store(grad_row_ptr + cols * grad_stride_col, grad.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_forward_kernel(
    # pointers
    logits_ptr,  # *T, x (R, C)
    target_ptr,  # *int64 or *uint8, y (R,)
    weight_ptr,  # *T, w (C,) class weights; read only if HAS_WEIGHT
    constants_ptr,  # *ACC, (2,) label smoothing eps and W = sum_c w_c, in the accumulation dtype
    loss_ptr,  # *ACC, (R,) loss_i, written
    lse_ptr,  # *ACC, (R,) log-sum-exp of each row, written
    row_weight_ptr,  # *ACC, (R,) w_y, 0 where ignored: the weighted mean's divisor, written
    grad_ptr,  # *T, (R, C) dloss_i/dx, written only if WRITE_GRAD; may be logits_ptr itself
    # dimensions
    C,  # classes per row
    stride_row, stride_col,  # x[i, c] at logits_ptr + i * stride_row + c * stride_col
    grad_stride_row, grad_stride_col,  # the same for the gradient
    stride_target,  # y[i] at target_ptr + i * stride_target
    stride_weight,  # w[c] at weight_ptr + c * stride_weight
    ignore_index,  # target value whose row is skipped
    # meta-parameters
    HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,  # also write the unscaled gradient (in place when grad_ptr is logits_ptr)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    row = tl.program_id(0).to(tl.int64)
    logits_row_ptr = logits_ptr + row * stride_row
    y = tl.load(target_ptr + row * stride_target).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < C)
    # x_y before any reduction's barrier: with WRITE_GRAD in place, warps past
    # the last barrier store gradients over this very row
    x_y = tl.load(logits_row_ptr + y * stride_col, mask=in_range, other=float("nan")).to(ACC_DTYPE)

    # online log-sum-exp: running max m, running sum d of exp(x - m)
    m = tl.full((), -float("inf"), ACC_DTYPE)
    d = tl.zeros((), ACC_DTYPE)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        x = tl.load(logits_row_ptr + cols * stride_col, mask=cols < C, other=-float("inf")).to(ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # a chunk (or a row so far) of only -inf adds nothing, rather than exp(-inf + inf) = NaN
        d = d * tl.where(m == m_new, 1.0, tl.exp(m - m_new)) + tl.sum(tl.where(x == -float("inf"), 0.0, tl.exp(x - m_new)), axis=0)
        m = m_new
    lse = m + tl.log(d)

    label_smoothing = tl.load(constants_ptr)
    weight_total = tl.load(constants_ptr + 1)
    w_y = _target_weight(weight_ptr, stride_weight, y, C, HAS_WEIGHT, ACC_DTYPE)
    loss = (1 - label_smoothing) * w_y * (lse - x_y)
    if label_smoothing > 0:
        # -(eps / C) * sum_c w_c * (x_c - lse), summed in that order as native does
        smooth = tl.zeros((), ACC_DTYPE)
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = cols < C
            x = tl.load(logits_row_ptr + cols * stride_col, mask=mask, other=0.0).to(ACC_DTYPE)
            w = _class_weights(weight_ptr, stride_weight, cols, mask, HAS_WEIGHT, ACC_DTYPE, BLOCK_C)
            smooth += tl.sum(tl.where(mask, w * (x - lse), 0.0), axis=0)
        loss -= label_smoothing / C * smooth
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    tl.store(row_weight_ptr + row, tl.where(valid, w_y, 0.0))
    if WRITE_GRAD:
        _row_gradient(logits_row_ptr, grad_ptr + row * grad_stride_row, weight_ptr, stride_col, grad_stride_col,
                      stride_weight, C, y, lse, w_y, weight_total, 1.0, valid, label_smoothing,
                      HAS_WEIGHT=HAS_WEIGHT, ACC_DTYPE=ACC_DTYPE, BLOCK_C=BLOCK_C)


@triton.jit
def cross_entropy_backward_kernel(
    # pointers
    logits_ptr,  # *T, x (R, C)
    target_ptr,  # *int64 or *uint8, y (R,)
    weight_ptr,  # *T, w (C,); read only if HAS_WEIGHT
    constants_ptr,  # *ACC, (2,) eps and W, as in the forward kernel
    lse_ptr,  # *ACC, (R,) saved by the forward kernel
    scale_ptr,  # *ACC, (R,) dL/dloss_i: the reduction's factor times the incoming gradient
    grad_ptr,  # *T, (R, C) dL/dx, written
    # dimensions
    C,
    stride_row, stride_col,
    grad_stride_row, grad_stride_col,
    stride_target, stride_weight,
    stride_lse,  # lse_i at lse_ptr + i * stride_lse
    stride_scale,  # s_i at scale_ptr + i * stride_scale: 0 for the one scale of a reduced loss
    ignore_index,
    # meta-parameters
    HAS_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(target_ptr + row * stride_target).to(tl.int64)
    label_smoothing = tl.load(constants_ptr)
    weight_total = tl.load(constants_ptr + 1)
    w_y = _target_weight(weight_ptr, stride_weight, y, C, HAS_WEIGHT, ACC_DTYPE)
    lse = tl.load(lse_ptr + row * stride_lse)
    row_scale = tl.load(scale_ptr + row * stride_scale).to(ACC_DTYPE)
    _row_gradient(logits_ptr + row * stride_row, grad_ptr + row * grad_stride_row, weight_ptr, stride_col,
                  grad_stride_col, stride_weight, C, y, lse, w_y, weight_total, row_scale,
                  y != ignore_index, label_smoothing,
                  HAS_WEIGHT=HAS_WEIGHT, ACC_DTYPE=ACC_DTYPE, BLOCK_C=BLOCK_C)


def _launch_meta(logits: torch.Tensor) -> dict:
    """A chunk of a row per program, a warp per 128 classes of it (1 to 8):
    more warps than a short row fills only add idle lanes (and, in float64,
    register spills)."""
    block_c = min(triton.next_power_of_2(max(logits.shape[1], 1)), MAX_BLOCK_C)
    return {
        "ACC_DTYPE": triton_accumulation_dtype(logits.dtype),
        "BLOCK_C": block_c,
        "num_warps": min(max(block_c // 128, 1), 8),
    }


def _constants(logits, weight, label_smoothing):
    """(eps, W) in the accumulation dtype: Triton would pass a Python float
    as float32, short of float64 logits' precision. No host sync."""
    constants = torch.full((2,), label_smoothing, dtype=accumulation_dtype(logits.dtype), device=logits.device)
    if weight is not None:
        constants[1] = weight.sum(dtype=constants.dtype)
    else:
        constants[1] = logits.shape[1]
    return constants


def _strides(target, weight):
    """(stride of target, stride of weight): both are read through their strides."""
    return target.stride(0), weight.stride(0) if weight is not None else 0


def cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, grad=None):
    """Per-row loss, log-sum-exp and target weight of ``logits`` (R, C) against
    class indices ``target`` (R,), with class weights ``weight`` (C,) or None.
    When ``grad`` (R, C) is given (it may be ``logits`` itself), the unscaled
    dloss_i/dx is written into it too. Every argument is read (and ``grad``
    written) through its strides; none is copied.
    Returns ``(loss, lse, row_weight)``, each (R,), in the accumulation dtype."""
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    loss, lse, row_weight = (torch.empty(rows, dtype=acc, device=logits.device) for _ in range(3))
    if rows == 0:
        return loss, lse, row_weight
    with device_guard(logits):
        cross_entropy_forward_kernel[(rows,)](
            logits, target, weight if weight is not None else logits, _constants(logits, weight, label_smoothing),
            loss, lse, row_weight, grad if grad is not None else logits,
            classes, logits.stride(0), logits.stride(1),
            *(grad.stride() if grad is not None else (0, 0)),
            *_strides(target, weight),
            ignore_index,
            HAS_WEIGHT=weight is not None, WRITE_GRAD=grad is not None, **_launch_meta(logits),
        )
    return loss, lse, row_weight


def cross_entropy_backward(logits, target, weight, lse, row_scale, ignore_index, label_smoothing):
    """dL/dx (R, C) from the saved ``logits``, ``lse`` (R,) and the per-row
    ``row_scale`` (R,) = dL/dloss_i. Every argument is read through its
    strides (the one scale of a reduced loss arrives expanded, stride 0, and
    is read so, not copied); the gradient is a new contiguous tensor."""
    rows, classes = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows == 0:
        return grad
    with device_guard(logits):
        cross_entropy_backward_kernel[(rows,)](
            logits, target, weight if weight is not None else logits, _constants(logits, weight, label_smoothing),
            lse, row_scale, grad,
            classes, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
            *_strides(target, weight), lse.stride(0), row_scale.stride(0),
            ignore_index,
            HAS_WEIGHT=weight is not None, **_launch_meta(logits),
        )
    return grad
