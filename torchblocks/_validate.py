"""Argument checks shared by the public functions. Each raises before any
kernel runs, naming the function, the argument, what was expected and what
was given."""

import torch


def require_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")


def require_real(fn: str, name: str, tensor: torch.Tensor) -> None:
    """A real number dtype: floating point or integer, not bool or complex."""
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{fn}: {name} must be a floating-point or integer tensor, got dtype {tensor.dtype}")


def require_bool(fn: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def require_floating(fn: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {tensor.dtype}")


def require_like(fn: str, name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    """``tensor`` has the dtype and device of ``reference``."""
    if tensor.dtype != reference.dtype:
        raise TypeError(
            f"{fn}: {name} must have the dtype of {reference_name} ({reference.dtype}), got {tensor.dtype}"
        )
    if tensor.device != reference.device:
        raise ValueError(
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


def require_probability(fn: str, name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name} must be a number in [0, 1], got {value!r}")


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
    bad = target[(target != ignore_index) & ((target < 0) | (target >= classes))]
    if bad.numel():
        raise IndexError(
            f"{fn}: Target {bad[0].item()} is out of bounds: class indices must be in [0, {classes}) "
            f"or equal ignore_index ({ignore_index})"
        )
