"""The functional forms of the torchblocks blocks: the public calls of SPEC.md.

Each checks its arguments first, then hands over to the autograd Function of
its block in ``torchblocks._ops``.
"""

import math
from typing import Optional

import torch

from torchblocks._ops import _eager_cpu
from torchblocks._ops._dispatch import PLAIN_TYPES, forward_ad_open, without_jvp
from torchblocks._ops.cross_entropy import (
    CrossEntropyFunction, ProbabilityCrossEntropyFunction, class_rows, probability_loss, reduced_loss,
)
from torchblocks._ops.dense import DenseFunction
from torchblocks._ops.dense_cross_entropy import DenseCrossEntropyFunction, default_chunk_rows, reduced_head_loss
from torchblocks._ops.relu import ReLUFunction, relu_in_place
from torchblocks._validate import (
    IGNORE_INDEX,
    REDUCTIONS,
    autocast_like_native,
    autocast_to_float32,
    check_linear,
    check_loss_options,
    require_bool,
    require_choice,
    require_like,
    native_refusals,
    require_dtype_native_takes,
    require_no_internal_overlap,
    require_same_device,
    require_tensor,
)

__all__ = ["dense", "dense_cross_entropy", "relu", "softmax_cross_entropy"]

# The Functions' twins without a jvp, which a compiling trace calls (see without_jvp)
_DenseTraced, _ReLUTraced, _CrossEntropyTraced, _ProbabilityCrossEntropyTraced, _DenseCrossEntropyTraced = (
    without_jvp(function) for function in (DenseFunction, ReLUFunction, CrossEntropyFunction,
                                           ProbabilityCrossEntropyFunction, DenseCrossEntropyFunction))


INDEX_DTYPES = (torch.int64, torch.uint8)

ACTIVATIONS = (None, "relu")

# The dtypes the installed torch's twins refuse, and how (see native_refusals).
RELU_REFUSALS = native_refusals(lambda dtype: torch.relu(torch.empty(0, dtype=dtype)))
CROSS_ENTROPY_REFUSALS = native_refusals(
    lambda dtype: torch.nn.functional.cross_entropy(torch.empty(0, 2, dtype=dtype), torch.empty(0, dtype=torch.long)))


def dense(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None
) -> torch.Tensor:
    """A dense layer, ``act(input @ weight^T + bias)``; twin of ``F.linear``
    (followed by ``F.relu`` when ``activation="relu"``, fused into the
    matmul's epilogue on the GPU).

    Args:
        input: ``(*, in_features)``, floating point; any leading dimensions
            (none included) are folded into the rows of one matmul.
        weight: ``(out_features, in_features)``, as ``nn.Linear`` stores it.
        bias: ``(out_features,)`` or None.
        activation: None or ``"relu"``.

    Returns:
        ``(*, out_features)``, the dtype of ``input`` (the autocast dtype
        under ``torch.autocast``, as native).

    Example::

        >>> x = torch.randn(128, 784)
        >>> w, b = torch.randn(512, 784) * 0.05, torch.zeros(512)
        >>> h = torchblocks.functional.dense(x, w, b, activation="relu")  # (128, 512)
    """
    require_tensor("dense", "input", input)
    require_tensor("dense", "weight", weight)
    if bias is not None:
        require_tensor("dense", "bias", bias)
    compiled = None if torch.compiler.is_compiling() else _eager_cpu.serving(input, weight, bias)
    if compiled and (activation is None or type(activation) is str):
        output = compiled.dense(input, weight, bias, activation)  # the op, for arguments it takes as they are
        if output is not None:
            return output
    require_choice("dense", "activation", activation, ACTIVATIONS)
    input, weight, bias = autocast_like_native(input, weight, bias)
    out_features, in_features = check_linear("dense", input, weight, bias, "out_features")
    rows = math.prod(input.shape[:-1])  # not -1: ambiguous when in_features is 0
    input_rows = input if input.dim() == 2 else input.reshape(rows, in_features)  # no view node for a 2-D one
    if compiled:  # the arguments, cast by autocast
        output = torch.ops.torchblocks.dense.default(input_rows, weight, bias, activation == "relu")
    else:
        function = _DenseTraced if torch.compiler.is_compiling() else DenseFunction
        output = function.apply(input_rows, weight, bias, activation == "relu")
    # A 2-D result is returned as is, not as a view of itself: native's is no
    # view, and FSDP2 warns that in-place ops on a view skip its backward hooks.
    return output if input.dim() == 2 else output.reshape(*input.shape[:-1], out_features)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Rectified linear unit, ``max(input, 0)`` elementwise; twin of ``F.relu``.

    Args:
        input: tensor of any shape ``(*)``, any strides, a floating-point or
            integer dtype.
        inplace: write the result into ``input`` and return it.

    Returns:
        Tensor of shape ``(*)``, the dtype of ``input``. NaN stays NaN.

    Example::

        >>> x = torch.randn(128, 512, requires_grad=True)
        >>> y = torchblocks.functional.relu(x)
        >>> y.sum().backward()  # x.grad == (y > 0)
    """
    if _eager_cpu.serves_plainly(input) and not inplace and input.dtype not in RELU_REFUSALS:
        return _eager_cpu._module.relu(input)  # the common call, checked in the fewest steps: the op
    require_tensor("relu", "input", input)
    inplace = bool(inplace)  # any truthy value, as F.relu takes it
    require_dtype_native_takes("relu", "input", input, "F.relu", RELU_REFUSALS)
    if inplace:
        require_no_internal_overlap("relu", "input", input)
    compiled = None if torch.compiler.is_compiling() else _eager_cpu.serving(input)
    if compiled:  # the ops, with the module's kernels: every mode and transform sees them
        return compiled.relu_(input) if inplace else compiled.relu(input)
    if inplace:
        if torch.jit.is_tracing():  # the tracer takes no in-place Python Function: the result, copied in
            return input.copy_(ReLUFunction.apply(input, False))
        if not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active() and not forward_ad_open():
            return relu_in_place(input)  # nothing to record: the write alone, one version bump as native's
    return (_ReLUTraced if torch.compiler.is_compiling() else ReLUFunction).apply(input, inplace)


def softmax_cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean", label_smoothing: float = 0.0, *, inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy of the softmax of ``input`` against ``target``; twin of
    ``F.cross_entropy``, with its exact semantics.

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)``, floating point.
        target: class indices (int64 or uint8) of shape ``()``, ``(N)`` or
            ``(N, d1, ...)``; or class probabilities of ``input``'s shape.
        weight: ``(C,)`` class weights, or None.
        ignore_index: a class index whose rows count for nothing (index targets).
        reduction: ``"none"`` (shape of target without the class dim),
            ``"mean"`` (weighted: divided by the sum of the target weights of
            the rows not ignored; NaN when all are) or ``"sum"``.
        label_smoothing: in [0, 1], mixing the target with the uniform one.
        inplace_backward: write the gradient into ``input``'s storage during
            the forward pass, so no second ``(N, C)`` buffer is ever held;
            ``input`` then no longer holds the logits. Only for logits that
            nothing else needs: another op that saved them for its backward
            makes that backward raise (autograd's version counter), never
            return a wrong gradient. ``input`` must be computed by another op
            (a leaf's storage is never overwritten), and the backward runs
            once: a second one through a retained graph raises.

    Returns:
        The loss: a scalar, or per element with ``reduction="none"``. On the
        CPU an out-of-range class index raises IndexError; on CUDA (no host
        sync) that element's loss and gradient are NaN.

    Example::

        >>> logits = torch.randn(128, 10, requires_grad=True)
        >>> labels = torch.randint(10, (128,))
        >>> loss = torchblocks.functional.softmax_cross_entropy(logits, labels)
        >>> loss.backward()  # logits.grad = (softmax(logits) - onehot(labels)) / 128
    """
    plain_options = weight is None and inplace_backward is False and type(label_smoothing) in (int, float) \
        and not label_smoothing and type(ignore_index) is int and type(reduction) is str \
        and -2**63 <= ignore_index < 2**63
    tried = plain_options and _eager_cpu.serves_plainly(input) and type(target) in PLAIN_TYPES
    if tried:  # the module's entry checks the common case in the fewest steps, and calls the op
        loss = _eager_cpu._module.cross_entropy(input, target, ignore_index, reduction)
        if loss is not None:
            return loss
    fn = "softmax_cross_entropy"
    require_tensor(fn, "input", input)
    require_tensor(fn, "target", target)
    compiled = None if torch.compiler.is_compiling() else _eager_cpu.serving(input, target)
    if compiled and plain_options and not tried:  # the kernels registered by this call
        loss = compiled.cross_entropy(input, target, ignore_index, reduction)
        if loss is not None:
            return loss
    if weight is not None:
        require_tensor(fn, "weight", weight)
    label_smoothing = check_loss_options(fn, ignore_index, reduction, label_smoothing)
    require_bool(fn, "inplace_backward", inplace_backward)
    input, weight = autocast_to_float32(input, weight)
    require_dtype_native_takes(fn, "input", input, "F.cross_entropy", CROSS_ENTROPY_REFUSALS)
    if input.dim() == 0:
        raise RuntimeError(f"{fn}: input must have a class dimension, (C), (N, C) or (N, C, d1, ...), got a scalar")
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if weight is not None:
        require_like(fn, "weight", weight, "input", input)
        if weight.shape != (classes,):
            raise RuntimeError(f"{fn}: weight must have shape (C,) = ({classes},), got {tuple(weight.shape)}")
    require_same_device(fn, "target", target, "input", input)
    rows_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    if target.is_floating_point() and target.shape == input.shape:
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        function = _ProbabilityCrossEntropyTraced if torch.compiler.is_compiling() else ProbabilityCrossEntropyFunction
        loss = probability_loss(function.apply, class_rows(input), class_rows(target), weight, reduction,
                                label_smoothing, out_dtype)
        return loss.reshape(rows_shape) if reduction == "none" else loss
    if target.is_floating_point():
        raise RuntimeError(
            f"{fn}: target of class probabilities must have the shape of input {tuple(input.shape)}, got "
            f"{tuple(target.shape)}; class indices must be integers (int64 or uint8: use target.long())"
        )
    if target.dtype not in INDEX_DTYPES:
        raise RuntimeError(
            f"{fn}: target must hold class indices (int64 or uint8) or class probabilities (floating point), "
            f"got dtype {target.dtype}"
        )
    if target.shape != rows_shape:
        batch_mismatch = input.dim() == 1 or target.dim() == 0 or target.shape[0] != input.shape[0]
        raise (ValueError if batch_mismatch else RuntimeError)(
            f"{fn}: target of class indices must have shape {tuple(rows_shape)} for input of shape "
            f"{tuple(input.shape)}, got {tuple(target.shape)}"
        )
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{fn}: weight is not differentiable with class-index targets (as in F.cross_entropy), so it must "
            "not require grad; detach() it"
        )
    if inplace_backward and input.requires_grad and input.grad_fn is None:
        raise ValueError(
            f"{fn}: inplace_backward=True overwrites input with its gradient, so input must be computed by "
            "another op; got a leaf tensor that requires grad"
        )
    rows, code = (class_rows(input), target.reshape(-1), weight), REDUCTIONS.index(reduction)
    if compiled and not inplace_backward and not torch._C._are_functorch_transforms_active() \
            and -2**63 <= ignore_index < 2**63:
        loss = torch.ops.torchblocks.cross_entropy.default(*rows, code, ignore_index, label_smoothing)
    else:  # the Functions: the in-place variant, a compiling trace, torch.func, another device or backend, an
        # ignore_index that no int64 (the op's int) holds
        function = _CrossEntropyTraced if torch.compiler.is_compiling() else CrossEntropyFunction
        loss = reduced_loss(function.apply, *rows, code, ignore_index, label_smoothing, inplace_backward)
    return loss.reshape(target.shape) if reduction == "none" and target.dim() != 1 else loss


def dense_cross_entropy(
    input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX, reduction: str = "mean", label_smoothing: float = 0.0, *,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)``, fused:
    computed over chunks of rows, so the ``(N, C)`` logits are never all in
    memory at once; the gradients of ``input``, ``weight`` and ``bias`` are
    accumulated chunk by chunk.

    Args:
        input: ``(*, in_features)``, floating point.
        weight: ``(C, in_features)``, the classifier as ``nn.Linear`` stores it.
        target: class indices (int64 or uint8) of shape ``(*)``.
        bias: ``(C,)`` or None.
        ignore_index, reduction, label_smoothing: as in ``softmax_cross_entropy``.
        chunk_rows: rows per chunk; by default about ``N * in_features / C``,
            so a chunk's logits are about the size of ``input``.

    Returns:
        The loss: a scalar, or ``(*)`` with ``reduction="none"``.

    Example::

        >>> hidden = torch.randn(8192, 4096, requires_grad=True)
        >>> classifier = torch.randn(128_000, 4096, requires_grad=True)
        >>> labels = torch.randint(128_000, (8192,))
        >>> loss = torchblocks.functional.dense_cross_entropy(hidden, classifier, labels)
    """
    fn = "dense_cross_entropy"
    require_tensor(fn, "input", input)
    require_tensor(fn, "weight", weight)
    require_tensor(fn, "target", target)
    if bias is not None:
        require_tensor(fn, "bias", bias)
    label_smoothing = check_loss_options(fn, ignore_index, reduction, label_smoothing)
    autocast = torch.is_autocast_enabled(input.device.type)
    input, weight, bias = autocast_like_native(input, weight, bias)
    classes, in_features = check_linear(fn, input, weight, bias, "C")
    if target.dtype not in INDEX_DTYPES:
        raise RuntimeError(f"{fn}: target must hold class indices (int64 or uint8), got dtype {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"{fn}: target must have shape {tuple(input.shape[:-1])} for input of shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    require_same_device(fn, "target", target, "input", input)
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"{fn}: chunk_rows must be a positive int or None, got {chunk_rows!r}")
    rows = math.prod(input.shape[:-1])
    input_rows, target_rows = input.reshape(rows, in_features), target.reshape(rows)
    chunk_rows = chunk_rows or default_chunk_rows(rows, in_features, classes)
    in_int64 = -2**63 <= ignore_index < 2**63  # what the op's int holds
    compiled = None if torch.compiler.is_compiling() else _eager_cpu.serving(input, weight, bias, target)
    if compiled and reduction != "none" and not label_smoothing and in_int64:
        loss = compiled.dense_cross_entropy(input_rows, weight, bias, target_rows, ignore_index, reduction,
                                            chunk_rows)  # the op; None unless the common case
        if loss is not None:
            return loss
    arguments = (input_rows, weight, bias, target_rows, REDUCTIONS.index(reduction), ignore_index, label_smoothing,
                 chunk_rows)
    if compiled and in_int64 and not torch._C._are_functorch_transforms_active():
        loss = torch.ops.torchblocks.dense_cross_entropy.default(*arguments)
    else:  # the Function: a compiling trace, torch.func, another device or backend, an ignore_index beyond int64
        function = _DenseCrossEntropyTraced if torch.compiler.is_compiling() else DenseCrossEntropyFunction
        loss = reduced_head_loss(function.apply, *arguments)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.float() if autocast else loss  # native computes the loss in float32 under autocast
