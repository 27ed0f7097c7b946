"""Optimizer steps over many tensors in one launch each.

One launch updates every tensor of a list that shares a device and dtype.
The tensors are cut into chunks of BLOCK elements; program i updates chunk i,
which belongs to tensor ``chunk_tensor[i]``. The host passes one table per
launch, made of
    pointers   (ROLES, T) int64: the data pointer of each role (parameter,
               gradient, each state tensor) of each of the T tensors;
    scalars    float64: per-tensor rows (S, T), then the group's constants.
Each element of every tensor is read once and written once; the math runs in
float32 (float64 for float64 tensors) and is stored back in the tensors' dtype.
The learning rate and every other hyperparameter are data in the table, never
compile-time constants: a scheduler changing them costs no recompilation.

The update rules are those of torchblocks.optim (each written out in its
optimizer's docstring); the order of operations follows torch.optim's.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import ELEMENTWISE_BLOCK, TRITON_DTYPES, accumulation_dtype, device_guard, elementwise_warps


@triton.jit
def _chunk(chunk_tensor_ptr, first_chunk_ptr, numel_ptr, BLOCK: tl.constexpr):
    """(tensor index t, element offsets, in-bounds mask, whether all BLOCK
    elements are in bounds) of this program's chunk."""
    chunk = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + chunk)
    start = (chunk - tl.load(first_chunk_ptr + t)).to(tl.int64) * BLOCK
    numel = tl.load(numel_ptr + t)
    offsets = start + tl.arange(0, BLOCK)
    return t, offsets, offsets < numel, start + BLOCK <= numel


@triton.jit
def _pointer(pointers_ptr, role, t, T, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The data pointer of tensor t in role ``role``, typed as DTYPE; under
    ALIGNED the compiler is told it is 16-byte aligned (a pointer loaded from
    a table carries no such hint), so that unmasked chunks load 128 bits at a time."""
    pointer = tl.load(pointers_ptr + role * T + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load_param_and_grad(pointers_ptr, t, T, offsets, mask, DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """A chunk of parameter p and its gradient g (negated under MAXIMIZE), in
    ACC_DTYPE: (p pointer, p, g). ``mask`` is None for a full chunk."""
    param_ptr = _pointer(pointers_ptr, 0, t, T, DTYPE, ALIGNED)
    param = tl.load(param_ptr + offsets, mask=mask).to(ACC_DTYPE)
    grad = tl.load(_pointer(pointers_ptr, 1, t, T, DTYPE, ALIGNED) + offsets, mask=mask).to(ACC_DTYPE)
    if MAXIMIZE:
        grad = -grad
    return param_ptr, param, grad


@triton.jit
def _sqrt(x):
    """Correctly rounded square root (tl.sqrt is approximate in float32)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def _div(a, b):
    """Correctly rounded division (``/`` is approximate in float32)."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def _sgd_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask,
               DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """One chunk of the update; ``mask`` is None for a full chunk."""
    param_ptr, param, grad = _load_param_and_grad(
        pointers_ptr, t, T, offsets, mask, DTYPE, ACC_DTYPE, MAXIMIZE, ALIGNED)
    lr = tl.load(scalars_ptr + T).to(ACC_DTYPE)
    if WEIGHT_DECAY:
        grad += tl.load(scalars_ptr + T + 1).to(ACC_DTYPE) * param
    if MOMENTUM:
        buffer_ptr = _pointer(pointers_ptr, 2, t, T, DTYPE, ALIGNED)
        momentum = tl.load(scalars_ptr + T + 2).to(ACC_DTYPE)
        if tl.load(scalars_ptr + t) != 0:
            buffer = grad
        else:
            buffer = tl.load(buffer_ptr + offsets, mask=mask).to(ACC_DTYPE)
            buffer = momentum * buffer + tl.load(scalars_ptr + T + 3).to(ACC_DTYPE) * grad
        tl.store(buffer_ptr + offsets, buffer.to(DTYPE), mask=mask)
        if NESTEROV:
            grad += momentum * buffer
        else:
            grad = buffer
    tl.store(param_ptr + offsets, (param - lr * grad).to(DTYPE), mask=mask)


@triton.jit
def sgd_kernel(
    pointers_ptr,  # (3, T): param, grad, momentum_buffer (unused without MOMENTUM)
    scalars_ptr,  # (T,) 1.0 where the momentum buffer is new this step, then lr, weight_decay, momentum, 1 - dampening
    numel_ptr, first_chunk_ptr, chunk_tensor_ptr, T,
    DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every pointer 16-byte aligned
    BLOCK: tl.constexpr,
):
    t, offsets, mask, full = _chunk(chunk_tensor_ptr, first_chunk_ptr, numel_ptr, BLOCK)
    if full:  # no mask: 128-bit accesses where the pointers are aligned
        _sgd_chunk(pointers_ptr, scalars_ptr, t, T, offsets, None,
                   DTYPE, ACC_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE, ALIGNED)
    else:
        _sgd_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask,
                   DTYPE, ACC_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE, ALIGNED)


@triton.jit
def _rmsprop_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask,
                   DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                   CENTERED: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """One chunk of the update; ``mask`` is None for a full chunk."""
    param_ptr, param, grad = _load_param_and_grad(
        pointers_ptr, t, T, offsets, mask, DTYPE, ACC_DTYPE, MAXIMIZE, ALIGNED)
    square_avg_ptr = _pointer(pointers_ptr, 2, t, T, DTYPE, ALIGNED)
    lr = tl.load(scalars_ptr).to(ACC_DTYPE)
    alpha = tl.load(scalars_ptr + 1).to(ACC_DTYPE)
    one_minus_alpha = tl.load(scalars_ptr + 2).to(ACC_DTYPE)
    eps = tl.load(scalars_ptr + 3).to(ACC_DTYPE)
    if WEIGHT_DECAY:
        grad += tl.load(scalars_ptr + 4).to(ACC_DTYPE) * param
    square_avg = tl.load(square_avg_ptr + offsets, mask=mask).to(ACC_DTYPE)
    square_avg = alpha * square_avg + one_minus_alpha * grad * grad
    tl.store(square_avg_ptr + offsets, square_avg.to(DTYPE), mask=mask)
    if CENTERED:
        grad_avg_ptr = _pointer(pointers_ptr, 3, t, T, DTYPE, ALIGNED)
        grad_avg = tl.load(grad_avg_ptr + offsets, mask=mask).to(ACC_DTYPE)
        grad_avg += one_minus_alpha * (grad - grad_avg)
        tl.store(grad_avg_ptr + offsets, grad_avg.to(DTYPE), mask=mask)
        denom = _sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        denom = _sqrt(square_avg) + eps
    if MOMENTUM:
        buffer_ptr = _pointer(pointers_ptr, 4, t, T, DTYPE, ALIGNED)
        buffer = tl.load(buffer_ptr + offsets, mask=mask).to(ACC_DTYPE)
        buffer = tl.load(scalars_ptr + 5).to(ACC_DTYPE) * buffer + _div(grad, denom)
        tl.store(buffer_ptr + offsets, buffer.to(DTYPE), mask=mask)
        param -= lr * buffer
    else:
        param -= lr * _div(grad, denom)
    tl.store(param_ptr + offsets, param.to(DTYPE), mask=mask)


@triton.jit
def rmsprop_kernel(
    pointers_ptr,  # (5, T): param, grad, square_avg, grad_avg (CENTERED), momentum_buffer (MOMENTUM)
    scalars_ptr,  # lr, alpha, 1 - alpha, eps, weight_decay, momentum
    numel_ptr, first_chunk_ptr, chunk_tensor_ptr, T,
    DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every pointer 16-byte aligned
    BLOCK: tl.constexpr,
):
    t, offsets, mask, full = _chunk(chunk_tensor_ptr, first_chunk_ptr, numel_ptr, BLOCK)
    if full:  # no mask: 128-bit accesses where the pointers are aligned
        _rmsprop_chunk(pointers_ptr, scalars_ptr, t, T, offsets, None,
                       DTYPE, ACC_DTYPE, WEIGHT_DECAY, MOMENTUM, CENTERED, MAXIMIZE, ALIGNED)
    else:
        _rmsprop_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask,
                       DTYPE, ACC_DTYPE, WEIGHT_DECAY, MOMENTUM, CENTERED, MAXIMIZE, ALIGNED)


@triton.jit
def _adam_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask,
                DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, CAPTURABLE: tl.constexpr, STEP_DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr):
    """One chunk of the update; ``mask`` is None for a full chunk."""
    param_ptr, param, grad = _load_param_and_grad(
        pointers_ptr, t, T, offsets, mask, DTYPE, ACC_DTYPE, MAXIMIZE, ALIGNED)
    exp_avg_ptr = _pointer(pointers_ptr, 2, t, T, DTYPE, ALIGNED)
    exp_avg_sq_ptr = _pointer(pointers_ptr, 3, t, T, DTYPE, ALIGNED)
    if CAPTURABLE:
        # the bias corrections from tensor t's step count, read on the device:
        # lr / (1 - beta1^t) and sqrt(1 - beta2^t), with beta^t = 2^(t * log2(beta))
        group_ptr = scalars_ptr
        step = tl.load(_pointer(pointers_ptr, 5, t, T, STEP_DTYPE, False)).to(ACC_DTYPE)
        lr = tl.load(group_ptr + 6).to(ACC_DTYPE)
        step_size = _div(lr, 1 - tl.exp2(step * tl.load(group_ptr + 7).to(ACC_DTYPE)))
        bias_correction2_sqrt = _sqrt(1 - tl.exp2(step * tl.load(group_ptr + 8).to(ACC_DTYPE)))
    else:
        group_ptr = scalars_ptr + 2 * T
        step_size = tl.load(scalars_ptr + t).to(ACC_DTYPE)
        bias_correction2_sqrt = tl.load(scalars_ptr + T + t).to(ACC_DTYPE)
    one_minus_beta1 = tl.load(group_ptr + 2).to(ACC_DTYPE)
    beta2 = tl.load(group_ptr + 3).to(ACC_DTYPE)
    one_minus_beta2 = tl.load(group_ptr + 4).to(ACC_DTYPE)
    eps = tl.load(group_ptr + 5).to(ACC_DTYPE)
    if WEIGHT_DECAY:
        if DECOUPLED:
            param *= tl.load(group_ptr).to(ACC_DTYPE)
        else:
            grad += tl.load(group_ptr + 1).to(ACC_DTYPE) * param
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(ACC_DTYPE)
    exp_avg += one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(ACC_DTYPE)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    tl.store(exp_avg_ptr + offsets, exp_avg.to(DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(DTYPE), mask=mask)
    if AMSGRAD:
        max_exp_avg_sq_ptr = _pointer(pointers_ptr, 4, t, T, DTYPE, ALIGNED)
        exp_avg_sq = tl.maximum(tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(ACC_DTYPE), exp_avg_sq)
        tl.store(max_exp_avg_sq_ptr + offsets, exp_avg_sq.to(DTYPE), mask=mask)
    denom = _div(_sqrt(exp_avg_sq), bias_correction2_sqrt) + eps
    tl.store(param_ptr + offsets, (param - step_size * _div(exp_avg, denom)).to(DTYPE), mask=mask)


@triton.jit
def adam_kernel(
    pointers_ptr,  # (5, T): param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (AMSGRAD); (6, T) + step (CAPTURABLE)
    scalars_ptr,  # (2, T) lr / (1 - beta1^t) and sqrt(1 - beta2^t) (not CAPTURABLE), then
                  # 1 - lr * wd, wd, 1 - beta1, beta2, 1 - beta2, eps, and (CAPTURABLE) lr, log2(beta1), log2(beta2)
    numel_ptr, first_chunk_ptr, chunk_tensor_ptr, T,
    DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    CAPTURABLE: tl.constexpr,  # step counts are device tensors, read here
    STEP_DTYPE: tl.constexpr,  # their dtype
    ALIGNED: tl.constexpr,  # every pointer 16-byte aligned
    BLOCK: tl.constexpr,
):
    t, offsets, mask, full = _chunk(chunk_tensor_ptr, first_chunk_ptr, numel_ptr, BLOCK)
    if full:  # no mask: 128-bit accesses where the pointers are aligned
        _adam_chunk(pointers_ptr, scalars_ptr, t, T, offsets, None, DTYPE, ACC_DTYPE, WEIGHT_DECAY, DECOUPLED,
                    AMSGRAD, MAXIMIZE, CAPTURABLE, STEP_DTYPE, ALIGNED)
    else:
        _adam_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask, DTYPE, ACC_DTYPE, WEIGHT_DECAY, DECOUPLED,
                    AMSGRAD, MAXIMIZE, CAPTURABLE, STEP_DTYPE, ALIGNED)


def _upload(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``: on a GPU copied from pinned host
    memory without waiting (the caching host allocator keeps the buffer
    until the copy is done), not from pageable memory, which synchronises."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


# The tables are cached by content, so a hit is always the right table: the
# pointer table of a parameter group is rebuilt only when a data pointer
# changes, and the scalars only when a hyperparameter or step count does.
@functools.lru_cache(maxsize=256)
def _pointer_table(pointers: tuple, device: torch.device) -> torch.Tensor:
    """The (ROLES, T) int64 table of data pointers, on ``device``."""
    return _upload(pointers, torch.int64, device)


@functools.lru_cache(maxsize=256)
def _scalar_table(scalars: tuple, device: torch.device) -> torch.Tensor:
    """The float64 scalars of a launch, on ``device``."""
    return _upload(scalars, torch.float64, device)


@functools.lru_cache(maxsize=64)
def _chunk_table(numels: tuple, device: torch.device):
    """(numel, first chunk) per tensor as int64 (2, T), and the tensor of each
    chunk as int32, on ``device``. Cached: a model's sizes do not change
    between steps, only its pointers may."""
    numel = torch.tensor(numels, dtype=torch.int64)
    chunks = (numel + ELEMENTWISE_BLOCK - 1) // ELEMENTWISE_BLOCK
    first_chunk = torch.cumsum(chunks, 0) - chunks
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), chunks)
    return torch.stack([numel, first_chunk]).to(device), chunk_tensor.to(device)


def multi_tensor_launch(kernel, roles, per_tensor_scalars, group_scalars, scalar_roles=(), **meta):
    """Launch ``kernel`` once over T tensors.

    Args:
        roles: lists of T tensors each (parameters, gradients, state), all on
            one device with one dtype; the i-th tensor of every list dense and
            laid out like the i-th parameter, so one flat offset serves all.
            An empty list stands for a role the kernel's flags leave unread.
        per_tensor_scalars: lists of T floats each, the kernel's per-tensor rows.
        group_scalars: floats shared by every tensor (lr, betas, ...).
        scalar_roles: lists of T one-element tensors each (capturable step
            counts), whose pointers follow the roles' in the table.
        meta: the kernel's constexpr flags.

    In a training loop the step uploads nothing: the pointer, scalar and
    chunk tables are found in their caches (Adam's per-tensor bias
    corrections change every step and are uploaded without a host sync).
    """
    params = roles[0]
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    (numel, first_chunk), chunk_tensor = _chunk_table(tuple(p.numel() for p in params), device)
    if chunk_tensor.numel() == 0:
        return
    pointers = _pointer_table(tuple(tensor.data_ptr() for role in (*roles, *scalar_roles)
                                    for tensor in (role or params)), device)
    scalars = _scalar_table(tuple(x for row in per_tensor_scalars for x in row) + tuple(group_scalars), device)
    aligned = all(tensor.data_ptr() % 16 == 0 for role in roles for tensor in role)
    with device_guard(params[0]):
        kernel[(chunk_tensor.numel(),)](
            pointers, scalars, numel, first_chunk, chunk_tensor, len(params),
            DTYPE=TRITON_DTYPES[dtype], ACC_DTYPE=TRITON_DTYPES[accumulation_dtype(dtype)], ALIGNED=aligned,
            BLOCK=ELEMENTWISE_BLOCK, num_warps=elementwise_warps(dtype), **meta,
        )


def sgd_step(params, grads, momentum_buffers, new_buffer, *, lr, weight_decay, momentum, dampening, nesterov,
             maximize):
    """SGD on lists of same-device, same-dtype tensors, in one launch.
    ``new_buffer[i]`` is True where momentum_buffers[i] is uninitialised this step."""
    multi_tensor_launch(
        sgd_kernel, [params, grads, momentum_buffers], [[float(new) for new in new_buffer]],
        [lr, weight_decay, momentum, 1 - dampening],
        WEIGHT_DECAY=weight_decay != 0, MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize,
    )


def rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha, eps, weight_decay, momentum,
                 centered, maximize):
    """RMSprop on lists of same-device, same-dtype tensors, in one launch."""
    multi_tensor_launch(
        rmsprop_kernel, [params, grads, square_avgs, grad_avgs, momentum_buffers], [],
        [lr, alpha, 1 - alpha, eps, weight_decay, momentum],
        WEIGHT_DECAY=weight_decay != 0, MOMENTUM=momentum > 0, CENTERED=centered, MAXIMIZE=maximize,
    )


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
              decoupled_weight_decay, amsgrad, maximize, capturable=False):
    """Adam (AdamW with ``decoupled_weight_decay``) on lists of same-device,
    same-dtype tensors, in one launch. ``steps[i]``: tensor i's step count t,
    already advanced: a float, whose bias corrections are computed here in
    float64; or, with ``capturable``, its step tensor, read by the kernel."""
    group = [1 - lr * weight_decay, weight_decay, 1 - beta1, beta2, 1 - beta2, eps]
    flags = dict(WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled_weight_decay, AMSGRAD=amsgrad,
                 MAXIMIZE=maximize, CAPTURABLE=capturable)
    roles = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
    if capturable:
        log2_betas = [math.log2(beta) if beta > 0 else -math.inf for beta in (beta1, beta2)]
        multi_tensor_launch(adam_kernel, roles, [], group + [lr, *log2_betas], scalar_roles=[steps],
                            STEP_DTYPE=TRITON_DTYPES[steps[0].dtype] if steps else tl.float32, **flags)
        return
    step_sizes = [lr / (1 - beta1**step) for step in steps]
    bias_corrections2_sqrt = [(1 - beta2**step) ** 0.5 for step in steps]
    multi_tensor_launch(adam_kernel, roles, [step_sizes, bias_corrections2_sqrt], group, STEP_DTYPE=tl.float32,
                        **flags)
