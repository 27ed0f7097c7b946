"""Which implementation runs: the Triton kernels or the plain-PyTorch reference.

The choice is made per call, from the backend in force and the device of the
tensors, by ``use_triton``; the ops in ``torchblocks._ops`` ask it before they
launch anything.
"""

import contextlib
import importlib.util

import torch

from torchblocks.kernels._common import INTERPRETER

BACKENDS = ("auto", "triton", "reference")


def _triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken install, or sys.modules["triton"] = None
        return False


TRITON_AVAILABLE = _triton_importable()

_backend = "auto"
_listeners = []


def get_backend() -> str:
    """The name of the backend in force: ``"auto"``, ``"triton"`` or ``"reference"``.

    Example::

        >>> torchblocks.get_backend()
        'auto'
    """
    return _backend


def set_backend(name: str) -> None:
    """Choose the implementation every torchblocks op uses from now on.

    Args:
        name: ``"auto"`` (Triton for CUDA tensors when triton is importable,
            the reference otherwise), ``"triton"`` (always the Triton
            kernels; CPU tensors only under ``TRITON_INTERPRET=1`` set before
            import) or ``"reference"`` (plain PyTorch everywhere).

    Example::

        >>> torchblocks.set_backend("reference")
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    _backend = name
    for listener in _listeners:
        listener(name)


def on_change(listener) -> None:
    """Calls ``listener(name)`` after each ``set_backend(name)``: the ops whose
    kernels are registered per backend re-register them (``_ops._eager_cpu``).

    Example::

        >>> on_change(lambda name: print("backend:", name))
    """
    _listeners.append(listener)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the block under backend ``name``, then restore the
    previous backend, also when the block raises.

    Example::

        >>> with torchblocks.use_backend("reference"):
        ...     y = torchblocks.functional.relu(torch.randn(4))
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels should handle ``tensor`` under the backend
    in force; raises when ``"triton"`` is forced where it cannot run."""
    if _backend == "reference":
        return False
    if _backend == "auto":
        return tensor.is_cuda and TRITON_AVAILABLE
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend 'triton' needs the triton package, which is not installed: pip install triton")
    if tensor.is_cuda or (tensor.device.type == "cpu" and INTERPRETER):
        return True
    if tensor.device.type == "cpu":
        raise RuntimeError(
            "backend 'triton' got a CPU tensor, but Triton kernels run on CUDA tensors; to run them on the CPU "
            "through the Triton interpreter, set the environment variable TRITON_INTERPRET=1 before importing "
            "torchblocks, or use the 'auto' or 'reference' backend"
        )
    raise RuntimeError(f"backend 'triton' cannot run on device {tensor.device}: expected a CUDA tensor")
