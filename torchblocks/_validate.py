"""Argument checks shared by the public functions. Each raises before any
kernel runs, naming the function, the argument, what was expected and what
was given."""

from typing import Callable, Dict, Tuple

import torch

REDUCTIONS = ("none", "mean", "sum")
IGNORE_INDEX = -100  # the losses' default ignore_index, F.cross_entropy's


def require_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")


# The dtypes that are neither floating point nor reduced-precision floating point:
# the ones native's acceptance of moves between torch releases.
NON_FLOATING_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                       torch.complex64, torch.complex128)


def native_refusals(native: Callable[[torch.dtype], object]) -> Dict[torch.dtype, Tuple[type, str]]:
    """What the installed torch's ``native(dtype)`` (a call on an empty CPU
    tensor of that dtype) raises, by dtype: ``{dtype: (exception type, message)}``
    for each of ``NON_FLOATING_DTYPES`` it refuses. Asked once, at import:
    torch 2.13 refuses a bool ReLU with RuntimeError, 2.14 with
    NotImplementedError, and torchblocks follows the torch it runs on.

    Example::

        >>> native_refusals(lambda dtype: torch.relu(torch.empty(0, dtype=dtype)))[torch.bool]
        (<class 'RuntimeError'>, 'Boolean inputs not supported for relu')
    """
    refusals = {}
    for dtype in NON_FLOATING_DTYPES:
        try:
            native(dtype)
        except Exception as error:  # noqa: BLE001 (native's own type is the point)
            refusals[dtype] = (type(error), str(error).splitlines()[0] if str(error) else type(error).__name__)
    return refusals


def require_dtype_native_takes(fn: str, name: str, tensor: torch.Tensor, native: str,
                               refusals: Dict[torch.dtype, Tuple[type, str]]) -> None:
    """Refuse ``tensor``'s dtype where ``native`` (named in the message)
    refuses it, with native's exception type (``refusals`` from ``native_refusals``)."""
    if tensor.dtype in refusals:
        error, reason = refusals[tensor.dtype]
        raise error(f"{fn}: {name} of dtype {tensor.dtype} is not supported, as in {native} ({reason})")


def require_no_internal_overlap(fn: str, name: str, tensor: torch.Tensor) -> None:
    """A tensor written in place must not hold one memory location at several
    indices (a dimension of stride 0, e.g. from ``expand``), as native requires."""
    if any(size > 1 and stride == 0 for size, stride in zip(tensor.shape, tensor.stride())):
        raise RuntimeError(
            f"{fn}: {name} is written in place, so no two of its elements may share a memory location; got shape "
            f"{tuple(tensor.shape)} with strides {tensor.stride()} (expanded). Please clone() it first"
        )


def require_bool(fn: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def require_floating(fn: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {tensor.dtype}")


def require_like(fn: str, name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """``tensor`` has the dtype and device of ``reference`` (RuntimeError, as native)."""
    if tensor.dtype != reference.dtype:
        raise RuntimeError(
            f"{fn}: {name} must have the dtype of {reference_name} ({reference.dtype}), got {tensor.dtype}"
        )
    require_same_device(fn, name, tensor, reference_name, reference)


def require_same_device(fn: str, name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor):
    if tensor.device != reference.device:
        raise RuntimeError(
            f"{fn}: {name} must be on the device of {reference_name} ({reference.device}), got {tensor.device}"
        )


def require_choice(fn: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def autocast_like_native(*tensors):
    """Cast like autocast casts a native matmul's arguments: where autocast is
    on for their device, floating tensors other than float64 go to its dtype."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def autocast_to_float32(*tensors):
    """Cast like autocast casts the arguments of a native loss (its float32
    list): where autocast is on, lower-precision floating tensors go to float32."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    return tuple(
        t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors
    )


def label_smoothing_value(fn: str, value) -> float:
    """The smoothing eps that native applies: any number (or one-element
    tensor) up to 1, where a negative one means none. Above 1: RuntimeError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: label_smoothing must be a float, got {type(value).__name__}")
    if not value <= 1.0:
        raise RuntimeError(f"{fn}: label_smoothing must be between 0.0 and 1.0, got {value!r}")
    return max(float(value), 0.0)


def require_int(fn: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")


def require_class_indices(fn: str, target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """On the CPU, raise IndexError (as native does) for a class index outside
    [0, classes) that is not ignore_index. Elsewhere this would cost a host
    sync: the kernels give such rows a NaN loss instead. Called inside the
    custom ops, which run eagerly under torch.compile too (the check depends
    on the data), before any kernel launches."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    low, high = (int(bound) for bound in torch.aminmax(target))
    if 0 <= low and high < classes:  # every target a class: one pass
        return
    bad = target[(target != ignore_index) & ((target < 0) | (target >= classes))]
    if bad.numel():
        raise IndexError(
            f"{fn}: Target {bad[0].item()} is out of bounds: class indices must be in [0, {classes}) "
            f"or equal ignore_index ({ignore_index})"
        )


def check_loss_options(fn: str, ignore_index, reduction, label_smoothing) -> float:
    """Checks shared by the losses; returns the label smoothing to apply."""
    require_int(fn, "ignore_index", ignore_index)
    require_choice(fn, "reduction", reduction, REDUCTIONS)
    return label_smoothing_value(fn, label_smoothing)


def check_linear(fn, input, weight, bias, outputs_name):
    """Checks shared by the layers that compute input @ weight^T + bias, whose
    weight is (``outputs_name``, in_features); returns that shape. What native
    rejects raises RuntimeError, as native's does.

    Example::

        >>> check_linear("dense", torch.randn(4, 3), torch.randn(5, 3), None, "out_features")
        (5, 3)
    """
    require_floating(fn, "input", input)
    require_like(fn, "weight", weight, "input", input)
    if weight.dim() != 2:
        raise RuntimeError(f"{fn}: weight must be 2-D ({outputs_name}, in_features), got shape {tuple(weight.shape)}")
    outputs, in_features = weight.shape
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise RuntimeError(
            f"{fn}: input's last dimension must be in_features = weight.shape[1] = {in_features}, "
            f"got input of shape {tuple(input.shape)}"
        )
    if bias is not None:
        require_like(fn, "bias", bias, "input", input)
        if bias.shape != (outputs,):
            raise RuntimeError(f"{fn}: bias must have shape ({outputs_name},) = ({outputs},), got {tuple(bias.shape)}")
    return outputs, in_features
