"""The compiled eager CPU path: eager_cpu.cpp and optim_cpu.cpp, built once
per environment.

On the CPU the reference backend's blocks are a few ATen ops each, and a
small call costs more in autograd's handling of a Python Function (about
20 us) than in arithmetic. eager_cpu.cpp holds ReLU, Dense and the common
cases of softmax cross-entropy and of the fused head in C++ with autograd
nodes of the same arithmetic, so that a plain eager call costs about what a
native one does. optim_cpu.cpp holds the optimizers' steps, each in one pass
over memory where the reference makes one per op.
Each block's C++ is kernels of its dispatcher ops (``serving`` registers
them), so every mode and transform sees the one op; the losses' hand the
calls outside their common case to the op's Python kernels. The optimizers'
steps choose per call (``runs``): a watched step (a compiling trace, compiled
autograd, a dispatch mode, the profiler, torch.func) takes the reference.

The first call that could use it compiles it with
``torch.utils.cpp_extension`` (a C++ compiler and ninja; about 20 s on two
cores) into ``build_directory()``, once per machine, torch version and
sources: the outcome is recorded there (``_build.py``), so later processes
load the built module directly (no ninja needed) or, after a failure with
the same compiler, do not try again. Without a compiler it warns once per
process, saying where the record is, and the Python path runs.
``TORCHBLOCKS_EAGER_CPU=0`` turns it off; ``TORCHBLOCKS_EAGER_CPU=retry``
tries a build that failed before again.
"""

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from torchblocks import backend
from torchblocks._ops._build import binary_key, configured_root, fallback_root, load_or_build
from torchblocks._ops._dispatch import PLAIN_TYPES, python_kernels

SOURCES = [Path(__file__).with_name("eager_cpu.cpp"), Path(__file__).with_name("optim_cpu.cpp")]
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # what the sources include, hashed with them
NAME = "torchblocks_eager_cpu"

_setting = os.environ.get("TORCHBLOCKS_EAGER_CPU", "1")
_enabled = _setting != "0"
_module = None
_build_error: Optional[str] = None


def build_directory(root: Optional[Path] = None) -> Path:
    """Where the module is built under ``root`` (default: ``$TORCH_EXTENSIONS_DIR``,
    else ``~/.cache/torch_extensions``): one folder per Python and torch
    version and hash of the sources and flags, shared by the environments
    that have them alike and never rebuilt by one that has other sources.

    Example::

        >>> build_directory()
        PosixPath('/root/.cache/torch_extensions/torchblocks-py311-torch2.13.0+cpu-3f2a9c1e0b7d4a65')
    """
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    return (root or configured_root()) / f"torchblocks-{version}-{binary_key([*SOURCES, *HEADERS], compile_flags())}"


def _announce(folder: Path):
    print(f"torchblocks: compiling the eager CPU path once for this machine and torch version (about 20 s) in "
          f"{folder}", file=sys.stderr, flush=True)


def _build():
    """The module: loaded from a recorded build, else compiled (and the
    outcome recorded); raises, saying why, when there is none."""
    folders = [build_directory(), build_directory(fallback_root())]
    return load_or_build(NAME, folders, SOURCES, HEADERS, compile_flags(), retry=_setting == "retry",
                         announce=_announce)


def compile_flags() -> list:
    """-O3; no errno from the math functions, so that loops calling sqrt
    vectorise (their results are unchanged); and where torch's threads are
    OpenMP's (Linux), -fopenmp, so that at::parallel_for splits the
    optimizers' loops over them. The module is not linked with an OpenMP
    library of its own: it calls the one torch has loaded.

    Example::

        >>> compile_flags()
        ['-O3', '-fno-math-errno', '-fopenmp']
    """
    flags = ["-O3", "-fno-math-errno"]
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        flags.append("-fopenmp")
    return flags


def module():
    """The compiled module, built on the first call; None when it is turned
    off or cannot be built (then ``build_error()`` says why).

    Example::

        >>> module().dense(torch.randn(2, 3), torch.randn(4, 3), None, None)
    """
    global _module, _build_error
    if _module is None and _build_error is None and _enabled:
        try:
            _module = _build()
        except Exception as error:  # no compiler, no ninja, a failed build, no folder to build in
            _build_error = f"{type(error).__name__}: {error}"
            warnings.warn(f"torchblocks: the compiled eager CPU path could not be built, so the Python one runs "
                          f"(set TORCHBLOCKS_EAGER_CPU=0 to skip trying): {_build_error}", RuntimeWarning)
    return _module if _enabled else None


def build_error() -> Optional[str]:
    """Why ``module()`` is None after a failed build, else None."""
    return _build_error


def runs(*tensors: Optional[torch.Tensor]):
    """The compiled module when an optimizer step on ``tensors`` (the first
    one decides the device and backend) may go to it, else None: plain CPU
    tensors, the reference backend for them, no compiling trace, no compiled
    autograd. The rest of ``nothing_watching()`` (a dispatch mode, the
    profiler, a torch.func transform) the module's steps ask themselves
    (watched.h) and leave a watched step to the reference: nanoseconds in
    C++, where the Python calls cost 0.35 us on a small tensor and about 2 us
    after a 1 MiB one has pushed the interpreter out of the cache.

    Example::

        >>> compiled = runs(*params, *grads)
        >>> left = compiled.sgd_step(params, grads, ...) if compiled else None  # None: the reference steps
    """
    for tensor in tensors:
        if tensor is not None and type(tensor) not in PLAIN_TYPES:
            return None
    first = tensors[0]
    if _enabled and first is not None and first.is_cpu and backend.get_backend() != "triton" \
            and not torch.compiler.is_compiling() and not _compiled_autograd_enabled():
        return _module or module()
    return None


_serving = False  # whether the module's kernels are registered on the blocks' ops


def serving(*tensors: Optional[torch.Tensor]):
    """The compiled module when its kernels serve the ops of an eager call on
    ``tensors`` (plain tensors, the first on the CPU; None stands for an
    absent bias; the reference backend, the module on), else None. Its CPU
    and AutogradCPU kernels are registered on the ops here (a first call
    builds or loads the module), and removed when the backend or
    ``set_enabled`` turns them off: the ops then run their Python kernels
    (Triton under ``set_backend("triton")``). Tracing, dispatch modes,
    torch.func, compiled autograd and the profiler need no exception: they
    see the op, whose kernels these are. Not for a compiling trace, which
    calls the op through ``torch.ops``.

    Example::

        >>> compiled = serving(input)
        >>> output = compiled.relu(input) if compiled else ReLUFunction.apply(input, False)
    """
    for tensor in tensors:
        if tensor is not None and type(tensor) not in PLAIN_TYPES:
            return None
    if not tensors[0].is_cpu:
        return None
    wanted = _enabled and backend.get_backend() != "triton"
    if wanted != _serving:
        _register(wanted)
    return _module if _serving else None


def serves_plainly(tensor) -> bool:
    """Whether the module's kernels serve the ops now (a call has registered
    them, and nothing turned them off since) and ``tensor`` is a plain CPU
    tensor outside a compiling trace: then a call on it may go straight to
    the module, with no step of ``serving`` repeated (each costs a block's
    call about a microsecond).

    Example::

        >>> output = module().relu(input) if serves_plainly(input) else ReLUFunction.apply(input, False)
    """
    return (_serving and _enabled and type(tensor) in PLAIN_TYPES and tensor.is_cpu
            and not torch.compiler.is_compiling())


def _register(serve: bool) -> None:
    """Registers the module's kernels on the ops (building it first) or removes them."""
    global _serving
    compiled = _module or (module() if serve else None)
    if compiled is not None and serve != _serving:
        compiled.register_kernels(serve, python_kernels)
        _serving = serve


def set_enabled(enabled: bool) -> None:
    """Turns the compiled path on or off for this process (the Python one runs
    while it is off), as ``TORCHBLOCKS_EAGER_CPU=0`` does from the start.

    Example::

        >>> set_enabled(False)  # the Python Functions and kernels from here on
    """
    global _enabled
    _enabled = enabled
    if not enabled:
        _register(False)


backend.on_change(lambda name: name == "triton" and _register(False))


def _compiled_autograd_enabled() -> bool:
    """Whether compiled autograd (``torch._dynamo.compiled_autograd``) is on:
    it captures the Python Functions' backward, not the module's nodes (they
    lack ``compiled_args``), so a forward under it takes the Python path.
    Read only once torch._dynamo is imported: importing it costs seconds."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    return compiled_autograd is not None and compiled_autograd.compiled_autograd_enabled
