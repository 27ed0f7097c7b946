"""Optimizer steps over many tensors in one launch each.

One launch of ``multi_tensor_kernel`` updates every tensor of a list that
shares a device and dtype. The tensors are cut into chunks of BLOCK elements;
program i updates chunk i, which belongs to tensor ``chunk_tensor[i]``, with
the optimizer's chunk update (``_sgd_chunk``, ``_rmsprop_chunk``,
``_adam_chunk``), a constexpr argument, as are its switches
(``<Optimizer>Flags``: a new combination compiles a new kernel). The host passes two tables per
launch, each laid out by named records below, in their fields' order:
    pointers   (ROLES, T) int64: the data pointer of each role of each of the
               T tensors (``<Optimizer>Tensors``: params, grads, state);
    scalars    float64: the constants shared by all T tensors
               (``<Optimizer>Scalars``: lr, betas, ...), then, where an
               optimizer has them, the per-tensor rows (ROWS, T) (``<Optimizer>Rows``).
A kernel finds field f at the offset ``<OPTIMIZER>_AT.value.f`` (``_ROLE``,
``_ROW``): the record with each field's position as its value. Reordering a
record's fields moves both the packing (``tuple(record)``) and the offsets.
Each element of every tensor is read once and written once; the math runs in
float32 (float64 for float64 tensors) and is stored back in the tensors' dtype.
The learning rate and every other hyperparameter are data in the table, never
compile-time constants: a scheduler changing them costs no recompilation.

The update rules are those of torchblocks.optim (each written out in its
optimizer's docstring); the order of operations follows torch.optim's.
"""

import functools
import math
import struct
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._launch import ELEMENTWISE_BLOCK, TRITON_DTYPES, accumulation_dtype, device_guard, elementwise_warps


def _offsets(record: type, first_fields=()) -> tl.constexpr:
    """``record`` with each field's position as its value: where a kernel
    finds that field in the table the record packs into, as
    ``<OFFSETS>.value.<field>`` (a global a kernel reads must be a constexpr;
    Triton 3.6 resolves its attributes only through ``.value``)."""
    assert record._fields[:len(first_fields)] == first_fields, record._fields
    return tl.constexpr(record(*range(len(record._fields))))


class SGDTensors(NamedTuple):
    """The tensors of an SGD launch: lists of T, or None where unread."""
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    momentum_buffers: Optional[List[torch.Tensor]]  # MOMENTUM


class SGDScalars(NamedTuple):
    """SGD's scalars shared by every tensor of a launch."""
    lr: float
    weight_decay: float
    momentum: float
    one_minus_dampening: float


class SGDFlags(NamedTuple):
    """SGD's compile-time switches."""
    WEIGHT_DECAY: bool
    MOMENTUM: bool
    NESTEROV: bool
    MAXIMIZE: bool


class SGDRows(NamedTuple):
    """SGD's per-tensor scalars: lists of T."""
    new_buffer: List[float]  # 1.0 where the momentum buffer starts this step


class RMSpropTensors(NamedTuple):
    """The tensors of an RMSprop launch: lists of T, or None where unread."""
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    square_avgs: List[torch.Tensor]
    grad_avgs: Optional[List[torch.Tensor]]  # CENTERED
    momentum_buffers: Optional[List[torch.Tensor]]  # MOMENTUM


class RMSpropScalars(NamedTuple):
    """RMSprop's scalars shared by every tensor of a launch."""
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    weight_decay: float
    momentum: float


class RMSpropFlags(NamedTuple):
    """RMSprop's compile-time switches."""
    WEIGHT_DECAY: bool
    MOMENTUM: bool
    CENTERED: bool
    MAXIMIZE: bool


class AdamTensors(NamedTuple):
    """The tensors of an Adam launch: lists of T, or None where unread."""
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    exp_avgs: List[torch.Tensor]
    exp_avg_sqs: List[torch.Tensor]
    max_exp_avg_sqs: Optional[List[torch.Tensor]]  # AMSGRAD
    steps: Optional[List[torch.Tensor]]  # CAPTURABLE: each tensor's step count, read by the kernel


class AdamScalars(NamedTuple):
    """Adam's scalars shared by every tensor of a launch."""
    decay_factor: float  # 1 - lr * weight_decay
    weight_decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    lr: float  # CAPTURABLE: the bias corrections are computed in the kernel
    log2_beta1: float  # CAPTURABLE: of beta1 rounded to the step counts' dtype
    log2_beta2: float


class AdamFlags(NamedTuple):
    """Adam's compile-time switches."""
    WEIGHT_DECAY: bool
    DECOUPLED: bool
    AMSGRAD: bool
    MAXIMIZE: bool
    CAPTURABLE: bool  # step counts are device tensors, read in the kernel
    STEP_DTYPE: tl.dtype  # their dtype


class AdamRows(NamedTuple):
    """Adam's per-tensor scalars: lists of T."""
    step_sizes: List[float]  # lr / (1 - beta1^t), not CAPTURABLE
    bias_corrections2_sqrt: List[float]  # sqrt(1 - beta2^t), not CAPTURABLE


# Every launch's tensors start with (params, grads): _load_param_and_grad reads roles 0 and 1.
SGD_ROLE = _offsets(SGDTensors, first_fields=("params", "grads"))
SGD_AT = _offsets(SGDScalars)
SGD_ROW = _offsets(SGDRows)
RMSPROP_ROLE = _offsets(RMSpropTensors, first_fields=("params", "grads"))
RMSPROP_AT = _offsets(RMSpropScalars)
ADAM_ROLE = _offsets(AdamTensors, first_fields=("params", "grads"))
ADAM_AT = _offsets(AdamScalars)
ADAM_ROW = _offsets(AdamRows)
# The rows follow the shared scalars: row r of tensor t at scalars_ptr + <OPTIMIZER>_ROWS_START + r * T + t.
SGD_ROWS_START = tl.constexpr(len(SGDScalars._fields))
ADAM_ROWS_START = tl.constexpr(len(AdamScalars._fields))


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
    param_ptr = _pointer(pointers_ptr, 0, t, T, DTYPE, ALIGNED)  # roles 0 and 1: params, grads (_offsets)
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
def _sgd_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask, param, grad,
               DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, FLAGS: tl.constexpr, ALIGNED: tl.constexpr):
    """SGD's new p from p and g (g already negated under MAXIMIZE) on one
    chunk, its state updated in place (FLAGS: SGDFlags)."""
    lr = tl.load(scalars_ptr + SGD_AT.value.lr).to(ACC_DTYPE)
    if FLAGS.WEIGHT_DECAY:
        grad += tl.load(scalars_ptr + SGD_AT.value.weight_decay).to(ACC_DTYPE) * param
    if FLAGS.MOMENTUM:
        buffer_ptr = _pointer(pointers_ptr, SGD_ROLE.value.momentum_buffers, t, T, DTYPE, ALIGNED)
        momentum = tl.load(scalars_ptr + SGD_AT.value.momentum).to(ACC_DTYPE)
        if tl.load(scalars_ptr + SGD_ROWS_START + SGD_ROW.value.new_buffer * T + t) != 0:
            buffer = grad
        else:
            buffer = tl.load(buffer_ptr + offsets, mask=mask).to(ACC_DTYPE)
            buffer = momentum * buffer + tl.load(scalars_ptr + SGD_AT.value.one_minus_dampening).to(ACC_DTYPE) * grad
        tl.store(buffer_ptr + offsets, buffer.to(DTYPE), mask=mask)
        if FLAGS.NESTEROV:
            grad += momentum * buffer
        else:
            grad = buffer
    return param - lr * grad


@triton.jit
def _rmsprop_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask, param, grad,
                   DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, FLAGS: tl.constexpr, ALIGNED: tl.constexpr):
    """RMSprop's new p from p and g (g already negated under MAXIMIZE) on one
    chunk, its state updated in place (FLAGS: RMSpropFlags)."""
    square_avg_ptr = _pointer(pointers_ptr, RMSPROP_ROLE.value.square_avgs, t, T, DTYPE, ALIGNED)
    lr = tl.load(scalars_ptr + RMSPROP_AT.value.lr).to(ACC_DTYPE)
    alpha = tl.load(scalars_ptr + RMSPROP_AT.value.alpha).to(ACC_DTYPE)
    one_minus_alpha = tl.load(scalars_ptr + RMSPROP_AT.value.one_minus_alpha).to(ACC_DTYPE)
    eps = tl.load(scalars_ptr + RMSPROP_AT.value.eps).to(ACC_DTYPE)
    if FLAGS.WEIGHT_DECAY:
        grad += tl.load(scalars_ptr + RMSPROP_AT.value.weight_decay).to(ACC_DTYPE) * param
    square_avg = tl.load(square_avg_ptr + offsets, mask=mask).to(ACC_DTYPE)
    square_avg = alpha * square_avg + one_minus_alpha * grad * grad
    tl.store(square_avg_ptr + offsets, square_avg.to(DTYPE), mask=mask)
    if FLAGS.CENTERED:
        grad_avg_ptr = _pointer(pointers_ptr, RMSPROP_ROLE.value.grad_avgs, t, T, DTYPE, ALIGNED)
        grad_avg = tl.load(grad_avg_ptr + offsets, mask=mask).to(ACC_DTYPE)
        grad_avg += one_minus_alpha * (grad - grad_avg)
        tl.store(grad_avg_ptr + offsets, grad_avg.to(DTYPE), mask=mask)
        denom = _sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        denom = _sqrt(square_avg) + eps
    if FLAGS.MOMENTUM:
        buffer_ptr = _pointer(pointers_ptr, RMSPROP_ROLE.value.momentum_buffers, t, T, DTYPE, ALIGNED)
        buffer = tl.load(buffer_ptr + offsets, mask=mask).to(ACC_DTYPE)
        buffer = tl.load(scalars_ptr + RMSPROP_AT.value.momentum).to(ACC_DTYPE) * buffer + _div(grad, denom)
        tl.store(buffer_ptr + offsets, buffer.to(DTYPE), mask=mask)
        param -= lr * buffer
    else:
        param -= lr * _div(grad, denom)
    return param


@triton.jit
def _adam_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask, param, grad,
                DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, FLAGS: tl.constexpr, ALIGNED: tl.constexpr):
    """Adam's new p from p and g (g already negated under MAXIMIZE) on one
    chunk, its state updated in place (FLAGS: AdamFlags)."""
    exp_avg_ptr = _pointer(pointers_ptr, ADAM_ROLE.value.exp_avgs, t, T, DTYPE, ALIGNED)
    exp_avg_sq_ptr = _pointer(pointers_ptr, ADAM_ROLE.value.exp_avg_sqs, t, T, DTYPE, ALIGNED)
    if FLAGS.CAPTURABLE:
        # the bias corrections from tensor t's step count, read on the device and computed in its dtype
        # (STEP_DTYPE, float32 by default whatever the parameters' dtype), as torch.optim computes them:
        # beta^t = 2^(t * log2(beta)) in float64, rounded once; step_size = lr * (1 / (1 - beta1^t)), as
        # torch's `lr / tensor` computes it (the reciprocal in float64, rounded once: a float32 division
        # here makes the float64 kernel spill on sm_90); sqrt(1 - beta2^t)
        step = tl.load(_pointer(pointers_ptr, ADAM_ROLE.value.steps, t, T, FLAGS.STEP_DTYPE, False)).to(tl.float64)
        beta1_t = tl.exp2(step * tl.load(scalars_ptr + ADAM_AT.value.log2_beta1)).to(FLAGS.STEP_DTYPE)
        beta2_t = tl.exp2(step * tl.load(scalars_ptr + ADAM_AT.value.log2_beta2)).to(FLAGS.STEP_DTYPE)
        lr = tl.load(scalars_ptr + ADAM_AT.value.lr).to(FLAGS.STEP_DTYPE)
        step_size = (lr * (1 / (1 - beta1_t).to(tl.float64)).to(FLAGS.STEP_DTYPE)).to(ACC_DTYPE)
        bias_correction2_sqrt = _sqrt(1 - beta2_t).to(ACC_DTYPE)
    else:
        rows_ptr = scalars_ptr + ADAM_ROWS_START + t
        step_size = tl.load(rows_ptr + ADAM_ROW.value.step_sizes * T).to(ACC_DTYPE)
        bias_correction2_sqrt = tl.load(rows_ptr + ADAM_ROW.value.bias_corrections2_sqrt * T).to(ACC_DTYPE)
    one_minus_beta1 = tl.load(scalars_ptr + ADAM_AT.value.one_minus_beta1).to(ACC_DTYPE)
    beta2 = tl.load(scalars_ptr + ADAM_AT.value.beta2).to(ACC_DTYPE)
    one_minus_beta2 = tl.load(scalars_ptr + ADAM_AT.value.one_minus_beta2).to(ACC_DTYPE)
    eps = tl.load(scalars_ptr + ADAM_AT.value.eps).to(ACC_DTYPE)
    if FLAGS.WEIGHT_DECAY:
        if FLAGS.DECOUPLED:
            param *= tl.load(scalars_ptr + ADAM_AT.value.decay_factor).to(ACC_DTYPE)
        else:
            grad += tl.load(scalars_ptr + ADAM_AT.value.weight_decay).to(ACC_DTYPE) * param
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(ACC_DTYPE)
    exp_avg += one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(ACC_DTYPE)
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    tl.store(exp_avg_ptr + offsets, exp_avg.to(DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq.to(DTYPE), mask=mask)
    if FLAGS.AMSGRAD:
        max_exp_avg_sq_ptr = _pointer(pointers_ptr, ADAM_ROLE.value.max_exp_avg_sqs, t, T, DTYPE, ALIGNED)
        exp_avg_sq = tl.maximum(tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(ACC_DTYPE), exp_avg_sq)
        tl.store(max_exp_avg_sq_ptr + offsets, exp_avg_sq.to(DTYPE), mask=mask)
    denom = _div(_sqrt(exp_avg_sq), bias_correction2_sqrt) + eps
    return param - step_size * _div(exp_avg, denom)


@triton.jit
def _step_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """p <- UPDATE(p, g) on one chunk; ``mask`` is None for a full chunk."""
    param_ptr, param, grad = _load_param_and_grad(
        pointers_ptr, t, T, offsets, mask, DTYPE, ACC_DTYPE, FLAGS.MAXIMIZE, ALIGNED)
    param = UPDATE(pointers_ptr, scalars_ptr, t, T, offsets, mask, param, grad, DTYPE, ACC_DTYPE, FLAGS, ALIGNED)
    tl.store(param_ptr + offsets, param.to(DTYPE), mask=mask)


@triton.jit
def multi_tensor_kernel(
    pointers_ptr,  # (ROLES, T) int64: <Optimizer>Tensors
    scalars_ptr,  # float64: <Optimizer>Scalars, then <Optimizer>Rows
    numel_ptr, first_chunk_ptr, chunk_tensor_ptr, T,
    UPDATE: tl.constexpr,  # the update of one chunk: _sgd_chunk, _rmsprop_chunk or _adam_chunk
    FLAGS: tl.constexpr,  # its switches: SGDFlags, RMSpropFlags or AdamFlags
    DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every pointer 16-byte aligned
    BLOCK: tl.constexpr,
):
    t, offsets, mask, full = _chunk(chunk_tensor_ptr, first_chunk_ptr, numel_ptr, BLOCK)
    if full:  # no mask: 128-bit accesses where the pointers are aligned
        _step_chunk(pointers_ptr, scalars_ptr, t, T, offsets, None, UPDATE, FLAGS, DTYPE, ACC_DTYPE, ALIGNED)
    else:
        _step_chunk(pointers_ptr, scalars_ptr, t, T, offsets, mask, UPDATE, FLAGS, DTYPE, ACC_DTYPE, ALIGNED)


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
    chunk as int32, built on ``device`` from the host's ints (nothing read
    back, nothing moved). Cached: a model's sizes do not change between
    steps, only its pointers may."""
    chunks_per_tensor = [(n + ELEMENTWISE_BLOCK - 1) // ELEMENTWISE_BLOCK for n in numels]
    chunks = torch.tensor(chunks_per_tensor, dtype=torch.int64, device=device)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32, device=device), chunks,
                                           output_size=sum(chunks_per_tensor))
    return torch.stack([torch.tensor(numels, dtype=torch.int64, device=device), first_chunk]), chunk_tensor


def multi_tensor_launch(update, tensors: NamedTuple, scalars: NamedTuple, rows: Optional[NamedTuple] = None, *,
                        flags: NamedTuple) -> None:
    """Run ``update`` (``_sgd_chunk``, ...) over T tensors in one launch of
    ``multi_tensor_kernel``.

    Args:
        tensors: its ``<Optimizer>Tensors``: lists of T tensors each
            (parameters, gradients, state), all on one device, the i-th of
            each dense and laid out like the i-th parameter, so that one flat
            offset serves all (Adam's step counts: one element each, of their
            own dtype). None for a role the flags leave unread.
        scalars: its ``<Optimizer>Scalars``, shared by every tensor.
        rows: its ``<Optimizer>Rows``: lists of T floats each, or None.
        flags: its ``<Optimizer>Flags``, compile-time switches.

    In a training loop the step uploads nothing: the pointer, scalar and
    chunk tables are found in their caches (Adam's per-tensor bias
    corrections change every step and are uploaded without a host sync).
    """
    params = tensors.params
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    (numel, first_chunk), chunk_tensor = _chunk_table(tuple(p.numel() for p in params), device)
    if chunk_tensor.numel() == 0:
        return
    roles = [role if role is not None else params for role in tensors]
    pointers = _pointer_table(tuple(tensor.data_ptr() for role in roles for tensor in role), device)
    scalar_table = _scalar_table(tuple(scalars) + tuple(x for row in (rows or ()) for x in row), device)
    aligned = all(tensor.data_ptr() % 16 == 0 for role in roles for tensor in role)
    with device_guard(params[0]):
        multi_tensor_kernel[(chunk_tensor.numel(),)](
            pointers, scalar_table, numel, first_chunk, chunk_tensor, len(params), UPDATE=update, FLAGS=flags,
            DTYPE=TRITON_DTYPES[dtype], ACC_DTYPE=TRITON_DTYPES[accumulation_dtype(dtype)], ALIGNED=aligned,
            BLOCK=ELEMENTWISE_BLOCK, num_warps=elementwise_warps(dtype),
        )


def sgd_step(params, grads, momentum_buffers, new_buffer, *, lr, weight_decay, momentum, dampening, nesterov,
             maximize):
    """SGD on lists of same-device, same-dtype tensors, in one launch.
    ``new_buffer[i]`` is True where momentum_buffers[i] is uninitialised this
    step; ``momentum_buffers`` is None without momentum."""
    multi_tensor_launch(
        _sgd_chunk, SGDTensors(params, grads, momentum_buffers),
        SGDScalars(lr=lr, weight_decay=weight_decay, momentum=momentum, one_minus_dampening=1 - dampening),
        SGDRows(new_buffer=[float(new) for new in new_buffer]),
        flags=SGDFlags(WEIGHT_DECAY=weight_decay != 0, MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize),
    )


def rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, *, lr, alpha, eps, weight_decay, momentum,
                 centered, maximize):
    """RMSprop on lists of same-device, same-dtype tensors, in one launch;
    ``grad_avgs`` is None unless centered, ``momentum_buffers`` without momentum."""
    multi_tensor_launch(
        _rmsprop_chunk, RMSpropTensors(params, grads, square_avgs, grad_avgs, momentum_buffers),
        RMSpropScalars(lr=lr, alpha=alpha, one_minus_alpha=1 - alpha, eps=eps, weight_decay=weight_decay,
                       momentum=momentum),
        flags=RMSpropFlags(WEIGHT_DECAY=weight_decay != 0, MOMENTUM=momentum > 0, CENTERED=centered,
                           MAXIMIZE=maximize),
    )


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
              decoupled_weight_decay, amsgrad, maximize, capturable=False):
    """Adam (AdamW with ``decoupled_weight_decay``) on lists of same-device,
    same-dtype tensors, in one launch. ``steps[i]``: tensor i's step count t,
    already advanced: a float, whose bias corrections are computed here in
    float64; or, with ``capturable``, its step tensor, read by the kernel,
    which computes them in the step tensors' dtype from the betas rounded to
    it, as torch.optim's ``beta ** step`` does. ``max_exp_avg_sqs`` is None
    without amsgrad."""
    step_dtype = steps[0].dtype if capturable and steps else torch.float64
    bases = (beta1, beta2)
    if step_dtype == torch.float32:  # rounded with struct: a capturable step reads no tensor on the host
        bases = tuple(struct.unpack("f", struct.pack("f", beta))[0] for beta in bases)
    log2_beta1, log2_beta2 = (math.log2(base) if base > 0 else -math.inf for base in bases)
    scalars = AdamScalars(decay_factor=1 - lr * weight_decay, weight_decay=weight_decay, one_minus_beta1=1 - beta1,
                          beta2=beta2, one_minus_beta2=1 - beta2, eps=eps, lr=lr, log2_beta1=log2_beta1,
                          log2_beta2=log2_beta2)
    flags = AdamFlags(WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled_weight_decay, AMSGRAD=amsgrad,
                      MAXIMIZE=maximize, CAPTURABLE=capturable,
                      STEP_DTYPE=TRITON_DTYPES[step_dtype] if capturable else tl.float32)
    if capturable:
        multi_tensor_launch(_adam_chunk, AdamTensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps),
                            scalars, flags=flags)
        return
    rows = AdamRows(step_sizes=[lr / (1 - beta1**step) for step in steps],
                    bias_corrections2_sqrt=[(1 - beta2**step) ** 0.5 for step in steps])
    multi_tensor_launch(_adam_chunk, AdamTensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, None),
                        scalars, rows, flags=flags)
