"""The custom ops and autograd Functions, and the way eager calls reach them.

Each op is a ``torch.library.custom_op``, so that ``torch.compile`` and
``torch.export`` see one opaque op with a fake (shape-only) implementation.
A call through the dispatcher costs about 40 us on a CPU, more than the
whole computation of a small block; so in plain eager mode ``call`` runs the
op's own Python body directly. Anything that must see the op gets it: a
compiling or exporting trace, a fake or other tensor subclass, an active
dispatch mode (a profiler's counter, FakeTensorMode), a torch.func transform,
the torch profiler (which then lists ``torchblocks::<op>``).
``Function`` likewise spares plain eager calls the signature binding that
``torch.autograd.Function.apply`` redoes on every call, and with gradients
off (inference, a backward that builds no graph) runs the forward alone.
``pick`` chooses an op's implementation; where it chooses Triton, a call the
launcher cannot take (one that torch.jit.trace records, a batched tensor of
the legacy vmap or of torch.func) goes to the reference (``triton_declines``).
"""

import functools
import importlib
import inspect
from typing import Callable, Dict

import torch

from torchblocks import backend

if backend.TRITON_AVAILABLE:  # the one guard for "triton missing"
    from torchblocks import kernels

    for _module in ("cross_entropy", "dense", "optim", "relu"):  # each becomes kernels.<module>
        importlib.import_module(f"torchblocks.kernels.{_module}")
else:
    class _NoKernels:
        """Stands for ``torchblocks.kernels`` without triton; ``pick`` never
        returns one of its attributes (``backend.use_triton`` is False or raises)."""

        def __getattr__(self, name):
            return self

    kernels = _NoKernels()

_BODIES: Dict[str, Callable] = {}


def pick(tensor: torch.Tensor, triton: Callable, reference: Callable) -> Callable:
    """The implementation of an op for ``tensor`` under the backend in force:
    ``triton`` (a launcher of ``torchblocks.kernels``) or ``reference`` (the
    same call in plain PyTorch, with the same arguments and results). Where
    the backend chooses Triton, the launcher still leaves to the reference a
    call it cannot launch on (``triton_declines``).

    Example::

        >>> pick(x, kernels.relu.relu_forward, _relu_forward)(x)
    """
    if not backend.use_triton(tensor):
        return reference
    return functools.partial(_triton_unless_declined, triton, reference)


def triton_declines(*args) -> bool:
    """Whether a Triton launch must leave a call with ``args`` to the
    reference, which computes it as native ops would:

    - while ``torch.jit.trace`` records: sizes are traced values there, which
      a launcher's grid and offsets cannot take; the trace records the
      reference's ops inside the autograd Function's node (a ``PythonOp``),
      and replaying the trace runs the Function again, untraced, so Triton
      computes the replays;
    - for a batched tensor: the legacy vmap's (``jacobian(vectorize=True)``,
      gradcheck's batched gradients: it reaches a backward as the gradient)
      or one wrapped by a torch.func transform. It has no storage of its own
      for a kernel to point at; the reference's ops are batched by vmap.
    """
    if torch.jit.is_tracing():
        return True
    functorch = torch._C._functorch
    return any(isinstance(arg, torch.Tensor)
               and (functorch.is_legacy_batchedtensor(arg) or functorch.is_functorch_wrapped_tensor(arg))
               for arg in args)


def _triton_unless_declined(triton: Callable, reference: Callable, *args, **kwargs):
    chosen = reference if triton_declines(*args, *kwargs.values()) else triton
    return chosen(*args, **kwargs)


def custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op(name, mutates_args=...)`` that also keeps
    the body for ``call``.

    Example::

        >>> @custom_op("torchblocks::twice")
        ... def twice(x: torch.Tensor) -> torch.Tensor:
        ...     return x * 2
    """
    def register(body: Callable):
        _BODIES[name] = body
        return torch.library.custom_op(name, mutates_args=mutates_args)(body)

    return register


# The torchblocks namespace's schemas and Python kernels registered by name,
# for an op whose kernels come from several places (C++ and Python).
LIBRARY = torch.library.Library("torchblocks", "FRAGMENT")


def define(schema: str, body: Callable, fake: Callable) -> None:
    """Defines the op ``torchblocks::<schema>`` with ``body`` as its kernel on
    every device (``CompositeExplicitAutograd``: a backend kernel registered
    for one device, as the compiled module's CPU kernels, takes precedence
    there) and ``fake`` as its shape-only kernel; keeps ``body`` for ``call``.

    Example::

        >>> define("twice(Tensor x) -> Tensor", lambda x: x * 2, lambda x: torch.empty_like(x))
    """
    name = LIBRARY.define(schema)
    _BODIES[f"torchblocks::{name}"] = body
    LIBRARY.impl(name, body, "CompositeExplicitAutograd")
    torch.library.register_fake(f"torchblocks::{name}", fake, lib=LIBRARY)


def recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a call on ``tensors``: gradients on and one of
    them requiring grad, or a forward-mode AD level open (dual tensors)."""
    return ((torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)) or forward_ad_open())


def apply_in_dispatcher(function: type, *args):
    """``function.apply(*args)`` from an op's Python ``Autograd`` kernel: autograd's
    own apply, since torch's would send a torch.func transform's
    ``custom_function_call`` through the dispatcher from inside it. Under a
    torch.func transform no Python kernel there can record (torch 2.13: that
    call finds no kernel, a forced single-level apply records one level of a
    nested transform and silently zeros the rest), so it refuses: the blocks'
    public functions apply their Functions outside the dispatcher there."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"torchblocks: {function.__name__} reached through torch.ops under a torch.func transform needs the "
            f"compiled eager CPU path and a CPU tensor; call the torchblocks.functional function instead, which "
            f"applies the autograd Function outside the dispatcher")
    return super(torch.autograd.Function, function).apply(*args)


def redispatch_below_autograd(op, keys, *args):
    """``op``'s kernel below autograd, for a call that autograd does not record."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keys & torch._C._after_autograd_keyset, *args)


# The op's Python callable that records a call with autograd, by name: the
# Autograd kernel's, which the compiled module's kernels hand the calls they leave.
_RECORDERS: Dict[str, Callable] = {}


def register_autograd(name: str, function, *constants) -> None:
    """``function`` as the Python ``Autograd`` kernel of the op
    ``torchblocks::<name>``: what records a call where no compiled kernel of
    the op does. ``function`` is a ``Function`` taking the op's arguments,
    then ``constants``, or a plain callable of the op's arguments that records
    its call itself (Functions and differentiable ops). An op that returns
    nothing (in place) returns nothing here too.

    Example::

        >>> register_autograd("matmul", MatmulFunction)
        >>> register_autograd("relu_", ReLUFunction, True)  # ReLUFunction.apply(input, inplace=True)
    """
    op = getattr(torch.ops.torchblocks, name).default
    returns_nothing = not op._schema.returns
    if isinstance(function, type):
        record = functools.partial(apply_in_dispatcher, function)
    else:
        record = function
    _RECORDERS[f"torchblocks::{name}"] = record

    def kernel(keys, *args):
        if recording(*(arg for arg in args if isinstance(arg, torch.Tensor))):
            output = record(*args, *constants)
        else:
            output = redispatch_below_autograd(op, keys, *args)
        return None if returns_nothing else output

    LIBRARY.impl(name, kernel, "Autograd", with_keyset=True)


def python_kernels(name: str) -> tuple:
    """(body, recorder) of the op ``torchblocks::<name>``: its kernel and its
    recording autograd in Python, for the calls a compiled kernel leaves."""
    return _BODIES[f"torchblocks::{name}"], _RECORDERS[f"torchblocks::{name}"]


# Tensors whose ops dispatch as a plain tensor's (a Parameter is one).
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def nothing_watching() -> bool:
    """True when no compiling trace, dispatch mode, profiler or torch.func
    transform needs to see the ops of a call. The compiled eager CPU path asks
    all of it but the trace in C++ (watched.h)."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._autograd._profiler_enabled()
            and not torch._C._are_functorch_transforms_active())


def saved_tensors_hooked() -> bool:
    """Whether a ``saved_tensors_hooks`` context (``save_on_cpu``, non-reentrant
    checkpointing) packs what is saved now. Then the losses compute no gradient
    in the forward to hold beside their saved tensors, where the hooks could
    not offload or free it: the backward computes it from the saved inputs."""
    return not torch.compiler.is_compiling() and torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def forward_ad_open() -> bool:
    """Whether a forward-mode AD level is open (``forward_ad.dual_level``,
    which ``torch.func.jvp`` and ``jacfwd`` open too): then a call's inputs may
    carry tangents, which only an autograd Function's ``jvp`` propagates."""
    return torch.autograd.forward_ad._current_level >= 0


def plain_eager(args) -> bool:
    """True when nothing needs to see the ops of a call with ``args``:
    ``nothing_watching()``, and only plain tensors."""
    return nothing_watching() and all(type(arg) in PLAIN_TYPES for arg in args if isinstance(arg, torch.Tensor))


def call(op, *args):
    """``op(*args)`` for a custom op ``op`` (``torch.ops.torchblocks.<name>``):
    its body directly in plain eager mode, the dispatcher otherwise.

    Example::

        >>> call(torch.ops.torchblocks.relu, torch.randn(4))
    """
    if plain_eager(args):
        return _BODIES[op.default.name()](*args)
    return op(*args)


class Function(torch.autograd.Function):
    """``torch.autograd.Function`` for every block. For a Function with
    ``setup_context`` (which torch.func needs), torch's ``apply`` binds the
    call to ``forward``'s signature with ``inspect`` on every call, about
    10 us, to fill in defaults. Every call here passes all of ``forward``'s
    arguments positionally, so a plain eager call goes straight to autograd;
    a call with keywords or defaults left out is bound here first (torch
    2.11's ``apply`` takes no keywords), and a torch.func transform or a
    compiling trace takes torch's own ``apply``. (From torch 2.14 that
    ``apply`` is C++ and binds on every call itself: there only the forward
    alone with gradients off is spared.)"""

    _arity: Dict[type, int] = {}

    @classmethod
    def apply(cls, *args, **kwargs):
        arity = Function._arity.get(cls)
        if arity is None:
            arity = Function._arity[cls] = len(inspect.signature(cls.forward).parameters)
        if kwargs or len(args) != arity:
            bound = inspect.signature(cls.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return super().apply(*args)
        if not torch.is_grad_enabled() and not forward_ad_open():
            # nothing to record (a backward without create_graph): the forward alone
            return cls.forward(*args)
        return super(torch.autograd.Function, cls).apply(*args)



def without_jvp(function: type) -> type:
    """A twin of ``function`` (a ``Function`` subclass) without its jvp, for
    a compiling trace: Dynamo refuses to trace a Function that defines one
    where an input requires grad (and a trace carries no tangents). Bind it
    to a module global: Dynamo reads those at a call, not class attributes.

    Example::

        >>> ReLUTraced = without_jvp(ReLUFunction)
        >>> (ReLUTraced if torch.compiler.is_compiling() else ReLUFunction).apply(x, False)
    """
    return type(function.__name__, (function,), {
        "jvp": staticmethod(torch.autograd.Function.jvp), "__doc__": function.__doc__})
