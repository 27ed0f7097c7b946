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
