"""Softmax cross-entropy over rows of logits x (R, C), class-index targets y.

Per row i, with lse = log sum_c exp(x_c), log p_c = x_c - lse, class weights w
(all 1 without weights), W = sum_c w_c and smoothing eps:
    loss_i = (1 - eps) * w_y * (lse - x_y) - (eps / C) * sum_c w_c * log p_c
    dloss_i/dx_c = p_c * ((1 - eps) * w_y + (eps / C) * W) - (eps / C) * w_c - (1 - eps) * w_y * 1[c = y]
Rows whose target is ignore_index have loss 0 and gradient 0 (NaN where the
row holds NaN, as native). A target out of
[0, C) reads nothing out of bounds: its loss and gradient are NaN.

A program takes BLOCK_R rows (several only when rows are short). The
log-sum-exp is online (running max and running sum, one read of the row) in
chunks of BLOCK_C classes, so rows of any length work; everything is
accumulated in float32 (float64 for float64 logits).
"""

import torch
import triton
import triton.language as tl

from ._launch import accumulation_dtype, device_guard, readable, triton_accumulation_dtype

# Widest chunk of a row one program holds at once.
MAX_BLOCK_C = 4096
# Short rows (up to SHORT_ROW classes) are handled several to a program, a
# tile of ROW_TILE elements: one row of C = 10 classes would leave most lanes
# idle. Longer rows fill a program alone (wider tiles of several rows spill
# registers in some variants on sm_80 and sm_90).
ROW_TILE = 1024
SHORT_ROW = 32


@triton.jit
def _as_accumulation(value, ACC_DTYPE: tl.constexpr):
    """A float64 scalar argument in ACC_DTYPE (the interpreter passes a Python float)."""
    return (value + tl.zeros((), ACC_DTYPE)).to(ACC_DTYPE)


@triton.jit
def _class_weights(weight_ptr, stride_weight, cols, mask,
                   HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """w_c for a chunk of classes (int64 ``cols``): the class weights, or 1 without them."""
    if HAS_WEIGHT:
        return tl.load(weight_ptr + cols * stride_weight, mask=mask, other=0.0).to(ACC_DTYPE)
    return tl.full((BLOCK_C,), 1.0, ACC_DTYPE)


@triton.jit
def _target_weight(weight_ptr, stride_weight, y, C, row_mask, HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """w_y for a block of rows, NaN where y is out of [0, C): nothing is read out of bounds."""
    in_range = (y >= 0) & (y < C)
    if HAS_WEIGHT:
        return tl.load(weight_ptr + y * stride_weight, mask=row_mask & in_range, other=float("nan")).to(ACC_DTYPE)
    return tl.where(in_range, 1.0, float("nan")).to(ACC_DTYPE)


@triton.jit
def _weight_total(weight_total_ptr, C, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
                  ACC_DTYPE: tl.constexpr):
    """W = sum_c w_c: read (computed on the device) with weights and smoothing,
    C without weights; unused (0) otherwise."""
    if SMOOTHING and HAS_WEIGHT:
        return tl.load(weight_total_ptr).to(ACC_DTYPE)
    return (C + tl.zeros((), ACC_DTYPE)).to(ACC_DTYPE)


@triton.jit
def _block_gradient(
    row_ptrs, grad_row_ptrs, weight_ptr,
    stride_col, grad_stride_col, stride_weight, C, y, lse, w_y, weight_total, scale, valid, row_mask,
    label_smoothing,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Write scale * dloss_i/dx for a block of rows (the formula at the top of
    the file). An ignored row gets the factor 0 and w_y = 0, not a select: a
    NaN row stays NaN (native's 0 - p * 0) and a 0/0 mean scale never reaches it."""
    factor = tl.where(valid, scale, 0.0)
    w_y = tl.where(valid, w_y, 0.0)
    coef = (1 - label_smoothing) * w_y + label_smoothing / C * weight_total
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(row_ptrs[:, None] + cols[None, :] * stride_col, mask=mask, other=0.0).to(ACC_DTYPE)
        grad = tl.exp(x - lse[:, None]) * coef[:, None]
        if SMOOTHING:
            w = _class_weights(weight_ptr, stride_weight, cols, col_mask, HAS_WEIGHT, ACC_DTYPE, BLOCK_C)
            grad -= label_smoothing / C * w[None, :]
        grad -= tl.where(cols[None, :] == y[:, None], ((1 - label_smoothing) * w_y)[:, None], 0.0)
        grad *= factor[:, None]
        tl.store(grad_row_ptrs[:, None] + cols[None, :] * grad_stride_col,
                 grad.to(grad_row_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_forward_kernel(
    # pointers
    logits_ptr,  # *T, x (R, C)
    target_ptr,  # *int64 or *uint8, y (R,)
    weight_ptr,  # *T, w (C,) class weights; read only if HAS_WEIGHT
    weight_total_ptr,  # *ACC, () W = sum_c w_c; read only if HAS_WEIGHT and SMOOTHING
    loss_ptr,  # *ACC, (R,) loss_i, written
    lse_ptr,  # *ACC, (R,) log-sum-exp of each row, written
    row_weight_ptr,  # *ACC, (R,) w_y, 0 where ignored: the weighted mean's divisor, written
    grad_ptr,  # *T, (R, C) dloss_i/dx, written only if WRITE_GRAD; may be logits_ptr itself
    # dimensions
    R, C,  # rows, classes per row
    stride_row, stride_col,  # x[i, c] at logits_ptr + i * stride_row + c * stride_col
    grad_stride_row, grad_stride_col,  # the same for the gradient
    stride_target,  # y[i] at target_ptr + i * stride_target
    stride_weight,  # w[c] at weight_ptr + c * stride_weight
    ignore_index,  # target value whose row is skipped
    label_smoothing: tl.float64,  # eps, as data: float64, for float64 logits' precision
    # meta-parameters
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,  # eps > 0
    WRITE_GRAD: tl.constexpr,  # also write the unscaled gradient (in place when grad_ptr is logits_ptr)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per chunk
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    row_ptrs = logits_ptr + rows * stride_row
    y = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < C)
    # x_y before any reduction's barrier: with WRITE_GRAD in place, warps past
    # the last barrier store gradients over these very rows
    x_y = tl.load(row_ptrs + y * stride_col, mask=row_mask & in_range, other=float("nan")).to(ACC_DTYPE)

    # online log-sum-exp: running max m, running sum d of exp(x - m), per row
    m = tl.full((BLOCK_R,), -float("inf"), ACC_DTYPE)
    d = tl.zeros((BLOCK_R,), ACC_DTYPE)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = row_mask[:, None] & (cols < C)[None, :]
        x = tl.load(row_ptrs[:, None] + cols[None, :] * stride_col, mask=mask, other=-float("inf")).to(ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # a chunk (or a row so far) of only -inf adds nothing, rather than exp(-inf + inf) = NaN
        d = d * tl.where(m == m_new, 1.0, tl.exp(m - m_new)) + tl.sum(
            tl.where(x == -float("inf"), 0.0, tl.exp(x - m_new[:, None])), axis=1)
        m = m_new
    lse = m + tl.log(d)

    eps = _as_accumulation(label_smoothing, ACC_DTYPE)
    w_y = _target_weight(weight_ptr, stride_weight, y, C, row_mask, HAS_WEIGHT, ACC_DTYPE)
    loss = (1 - eps) * w_y * (lse - x_y)
    if SMOOTHING:
        # -(eps / C) * sum_c w_c * (x_c - lse), summed in that order as native does
        smooth = tl.zeros((BLOCK_R,), ACC_DTYPE)
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
            col_mask = cols < C
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(row_ptrs[:, None] + cols[None, :] * stride_col, mask=mask, other=0.0).to(ACC_DTYPE)
            w = _class_weights(weight_ptr, stride_weight, cols, col_mask, HAS_WEIGHT, ACC_DTYPE, BLOCK_C)
            smooth += tl.sum(tl.where(mask, w[None, :] * (x - lse[:, None]), 0.0), axis=1)
        loss -= eps / C * smooth
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(row_weight_ptr + rows, tl.where(valid, w_y, 0.0), mask=row_mask)
    if WRITE_GRAD:
        weight_total = _weight_total(weight_total_ptr, C, HAS_WEIGHT, SMOOTHING, ACC_DTYPE)
        _block_gradient(row_ptrs, grad_ptr + rows * grad_stride_row, weight_ptr, stride_col, grad_stride_col,
                        stride_weight, C, y, lse, w_y, weight_total, tl.full((BLOCK_R,), 1.0, ACC_DTYPE), valid,
                        row_mask, eps, HAS_WEIGHT=HAS_WEIGHT, SMOOTHING=SMOOTHING, ACC_DTYPE=ACC_DTYPE,
                        BLOCK_C=BLOCK_C)


@triton.jit
def cross_entropy_backward_kernel(
    # pointers
    logits_ptr,  # *T, x (R, C)
    target_ptr,  # *int64 or *uint8, y (R,)
    weight_ptr,  # *T, w (C,); read only if HAS_WEIGHT
    weight_total_ptr,  # *ACC, () W, as in the forward kernel
    lse_ptr,  # *ACC, (R,) saved by the forward kernel
    scale_ptr,  # *ACC, (R,) dL/dloss_i: the reduction's factor times the incoming gradient
    grad_ptr,  # *T, (R, C) dL/dx, written
    # dimensions
    R, C,
    stride_row, stride_col,
    grad_stride_row, grad_stride_col,
    stride_target, stride_weight,
    stride_lse,  # lse_i at lse_ptr + i * stride_lse
    stride_scale,  # s_i at scale_ptr + i * stride_scale: 0 for the one scale of a reduced loss
    ignore_index,
    label_smoothing: tl.float64,
    # meta-parameters
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    y = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    w_y = _target_weight(weight_ptr, stride_weight, y, C, row_mask, HAS_WEIGHT, ACC_DTYPE)
    lse = tl.load(lse_ptr + rows * stride_lse, mask=row_mask, other=0.0)
    row_scale = tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0).to(ACC_DTYPE)
    _block_gradient(logits_ptr + rows * stride_row, grad_ptr + rows * grad_stride_row, weight_ptr, stride_col,
                    grad_stride_col, stride_weight, C, y, lse, w_y,
                    _weight_total(weight_total_ptr, C, HAS_WEIGHT, SMOOTHING, ACC_DTYPE), row_scale,
                    y != ignore_index, row_mask, _as_accumulation(label_smoothing, ACC_DTYPE),
                    HAS_WEIGHT=HAS_WEIGHT, SMOOTHING=SMOOTHING, ACC_DTYPE=ACC_DTYPE, BLOCK_C=BLOCK_C)


def launch_meta(classes: int, dtype: torch.dtype) -> dict:
    """The tile of a launch: a chunk of BLOCK_C classes of BLOCK_R rows per
    program (several rows only for rows of up to SHORT_ROW classes), a warp
    per 128 elements of the tile (1 to 8): more warps than a short row fills
    only add idle lanes (and, in float64, register spills)."""
    block_c = min(triton.next_power_of_2(max(classes, 1)), MAX_BLOCK_C)
    block_r = ROW_TILE // block_c if block_c <= SHORT_ROW else 1
    return {
        "ACC_DTYPE": triton_accumulation_dtype(dtype),
        "BLOCK_R": block_r,
        "BLOCK_C": block_c,
        "num_warps": min(max(block_r * block_c // 128, 1), 8),
    }


def _scalars(logits, weight, label_smoothing) -> dict:
    """The launch's class-weight and smoothing arguments. W = sum_c w_c is
    only needed with both (a device reduction, no host sync); without
    weights the kernel uses C."""
    smoothing = label_smoothing > 0
    acc = accumulation_dtype(logits.dtype)
    weight_total = weight.sum(dtype=acc) if weight is not None and smoothing else logits
    return dict(weight=weight if weight is not None else logits, weight_total=weight_total,
                label_smoothing=float(label_smoothing), SMOOTHING=smoothing, HAS_WEIGHT=weight is not None,
                stride_weight=weight.stride(0) if weight is not None else 0)


def cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, grad=None):
    """Per-row loss, log-sum-exp and target weight of ``logits`` (R, C) against
    class indices ``target`` (R,), with class weights ``weight`` (C,) or None.
    When ``grad`` (R, C) is given (it may be ``logits`` itself), the unscaled
    dloss_i/dx is written into it too. Every argument is read (and ``grad``
    written) through its strides; none is copied but a lazily negated one
    (``readable``).
    Returns ``(loss, lse, row_weight)``, each (R,), in the accumulation dtype."""
    if grad is not None and grad.is_neg():  # written through a lazy negation: computed apart, then copied in
        gradient = torch.empty_like(grad, memory_format=torch.contiguous_format)
        results = cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, gradient)
        grad.copy_(gradient)
        return results
    logits, target, weight = readable(logits, target, weight)
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    loss, lse, row_weight = (torch.empty(rows, dtype=acc, device=logits.device) for _ in range(3))
    if rows == 0:
        return loss, lse, row_weight
    meta = launch_meta(classes, logits.dtype)
    scalars = _scalars(logits, weight, label_smoothing)
    with device_guard(logits):
        cross_entropy_forward_kernel[(triton.cdiv(rows, meta["BLOCK_R"]),)](
            logits, target, scalars["weight"], scalars["weight_total"],
            loss, lse, row_weight, grad if grad is not None else logits,
            rows, classes, logits.stride(0), logits.stride(1),
            *(grad.stride() if grad is not None else (0, 0)),
            target.stride(0), scalars["stride_weight"], ignore_index, scalars["label_smoothing"],
            HAS_WEIGHT=scalars["HAS_WEIGHT"], SMOOTHING=scalars["SMOOTHING"], WRITE_GRAD=grad is not None,
            **meta,
        )
    return loss, lse, row_weight


def cross_entropy_backward(logits, target, weight, lse, row_scale, ignore_index, label_smoothing, out=None):
    """dL/dx (R, C) from the saved ``logits``, ``lse`` (R,) and the per-row
    ``row_scale`` (R,) = dL/dloss_i. Every argument is read through its
    strides (the one scale of a reduced loss arrives expanded, stride 0, and
    is read so, not copied); the gradient is written into ``out`` (R, C) (it
    may be ``logits`` itself) or a new contiguous tensor, and returned."""
    if out is not None and out.is_neg():  # written through a lazy negation: computed apart, then copied in
        return out.copy_(cross_entropy_backward(logits, target, weight, lse, row_scale, ignore_index, label_smoothing))
    logits, target, weight, lse, row_scale = readable(logits, target, weight, lse, row_scale)
    rows, classes = logits.shape
    grad = out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows == 0:
        return grad
    meta = launch_meta(classes, logits.dtype)
    scalars = _scalars(logits, weight, label_smoothing)
    with device_guard(logits):
        cross_entropy_backward_kernel[(triton.cdiv(rows, meta["BLOCK_R"]),)](
            logits, target, scalars["weight"], scalars["weight_total"], lse, row_scale, grad,
            rows, classes, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
            target.stride(0), scalars["stride_weight"], lse.stride(0), row_scale.stride(0),
            ignore_index, scalars["label_smoothing"],
            HAS_WEIGHT=scalars["HAS_WEIGHT"], SMOOTHING=scalars["SMOOTHING"], **meta,
        )
    return grad
