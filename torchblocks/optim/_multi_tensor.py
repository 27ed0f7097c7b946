"""What SGD, RMSprop and Adam share: one ``step`` over every param group.

For each group, the parameters that have a gradient are checked, split by
(device, dtype, their gradients' layout), and handed to the optimizer's
update as lists. The update has three implementations with one signature:
the Triton launcher in ``torchblocks.kernels.optim`` (one launch per list),
the plain-PyTorch ``torch._foreach_*`` reference in the optimizer's module,
and, for the reference backend on the CPU, the same update compiled in one
pass over memory (``torchblocks/_ops/optim_cpu.cpp``, built with the eager
CPU path; under a compiling trace, a dispatch mode or torch.func the
reference runs).
The backend setting chooses, as for the blocks; tensors the Triton or
compiled step cannot address with one flat offset (a parameter that is not
dense, a gradient laid out unlike its parameter, or one with
``torch._neg_view``'s lazy negation) take the reference. A group built with
differentiable=True takes the reference on every backend: its torch ops
are what autograd records through the step, as it records torch.optim's.

Two kinds of tensor are taken where the lists are gathered, so that each
update rule stays written once:

- Complex parameters are stepped as their real view, as torch.optim steps
  them: each complex tensor of an entry (parameter, gradient, state) is
  replaced by ``torch.view_as_real`` of it, shape ``(*shape, 2)`` holding the
  real and imaginary parts, so every moment is kept per part (Adam's
  ``exp_avg_sq`` holds re(g)^2 and im(g)^2, not |g|^2). The state itself
  stays complex, shaped like the parameter, as in torch.optim's state dict.
- Parameters with sparse gradients (SGD's, from ``nn.Embedding(sparse=True)``)
  come in lists of their own and take the reference, whose torch ops compute
  on them (and on the sparse momentum buffers they start) what
  torch.optim.SGD's do. An optimizer refuses a sparse gradient where its
  twin does, in its twin's words (``_sparse_gradient_error``), before
  anything of the group is written.

Which implementation stepped what is counted in ``entries_stepped``.

DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism) are updated
shard by shard: the update is elementwise, so each rank steps its local
shards of parameter, gradient and state with no communication. That holds
for ``Shard`` and ``Replicate`` placements; any other placement raises.
"""

import collections
from typing import Optional

import torch

if not torch.distributed.is_available():  # a torch built without distributed has no DTensors to meet
    DTensor = ()
else:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it private
        from torch.distributed._tensor import DTensor

from torch.optim.optimizer import _device_dtype_check_for_fused, _get_capturable_supported_devices
from torch.overrides import TorchFunctionMode

from torchblocks import backend
from torchblocks._ops import _eager_cpu
from torchblocks._ops._dispatch import kernels


# How many entries (a parameter with its gradient and state) each implementation
# has stepped in this process: "triton", "compiled-cpu" (optim_cpu.cpp) and
# "reference" (the foreach ops). Tests read it to know which one ran: clear it
# (or monkeypatch a fresh Counter), step, compare.
#
#     >>> entries_stepped.clear(); optimizer.step()
#     >>> entries_stepped
#     Counter({'compiled-cpu': 3, 'reference': 1})
entries_stepped = collections.Counter()


def scalar_dtype() -> torch.dtype:
    """The dtype of the ``step`` counters, as torch.optim keeps them."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# Validation: the checks, order, exception types and messages of torch.optim,
# so that a bad argument fails the same way on either.

def check_non_negative(value, what: str) -> None:
    """``ValueError("Invalid <what>: <value>")`` unless ``0 <= value``."""
    if not 0.0 <= value:
        raise ValueError(f"Invalid {what}: {value}")


def check_tensor_hyperparameter(name: str, value, foreach=None, capturable=None) -> None:
    """A tensor hyperparameter must hold one element; with ``foreach`` and
    ``capturable`` given (Adam's rule), it must not meet foreach=True without
    capturable=True."""
    if not isinstance(value, torch.Tensor):
        return
    if capturable is not None and foreach and not capturable:
        raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
    if value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element")


def check_beta_range(betas) -> None:
    """Adam's betas each in [0, 1)."""
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")


def check_beta_types(betas, foreach, capturable) -> None:
    """Adam's betas both floats or both one-element tensors (checked after
    every range, as torch.optim.Adam does)."""
    if not (all(isinstance(beta, float) for beta in betas) or all(isinstance(beta, torch.Tensor) for beta in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        check_tensor_hyperparameter(f"betas[{index}]", beta, foreach, capturable)


def check_fused_flags(fused, foreach, differentiable) -> None:
    """fused=True with differentiable=True or foreach=True: torch's RuntimeErrors."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_capturable_devices(params, steps, supports_xla: bool = True) -> None:
    """capturable=True: every parameter and its ``step`` on one device type
    that torch.optim can capture in a graph, as torch.optim checks it."""
    supported = _get_capturable_supported_devices(supports_xla)
    if not all(p.device.type == step.device.type and p.device.type in supported for p, step in zip(params, steps)):
        raise AssertionError(f"If capturable=True, params and state_steps must be on supported devices: {supported}.")


def _describe(group: dict, group_index: int, param_index: int, param: torch.Tensor) -> str:
    names = group.get("param_names")
    where = f"{param_index} of param group {group_index}, shape {tuple(param.shape)}"
    return f"parameter {names[param_index]!r} ({where})" if names else f"parameter {where}"


def _check_placements(optimizer: str, where: str, param: torch.Tensor, grad: torch.Tensor) -> None:
    """A DTensor parameter must be Shard or Replicate on every mesh dimension,
    with its gradient placed the same way; a plain parameter needs a plain gradient."""
    if not isinstance(param, DTensor):
        if isinstance(grad, DTensor):
            raise RuntimeError(f"{optimizer}: {where} is a plain tensor but its gradient is a DTensor "
                               f"placed {grad.placements}; expected a plain tensor")
        return
    for placement in param.placements:
        if not (placement.is_shard() or placement.is_replicate()):
            raise RuntimeError(f"{optimizer}: {where} is a DTensor with placement {placement!r} "
                               f"(placements {param.placements}); the step updates local shards and supports "
                               "only Shard and Replicate placements")
    if not isinstance(grad, DTensor) or grad.placements != param.placements:
        got = f"placed {grad.placements}" if isinstance(grad, DTensor) else "a plain tensor"
        raise RuntimeError(f"{optimizer}: the gradient of {where} is {got}; expected a DTensor placed like its "
                           f"parameter, {param.placements}")


def saved(tensors: list, differentiable: bool) -> list:
    """``tensors`` as read by an op that autograd keeps them for, to compute
    its backward: with ``differentiable`` copies, so that the in-place
    writes of this step or the next to the originals leave what the backward
    reads intact, as torch.optim's differentiable step copies them; otherwise
    the tensors themselves (nothing is recorded)."""
    return [tensor.clone() for tensor in tensors] if differentiable else tensors


class _OneTensorAtATime(TorchFunctionMode):
    """Runs each ``torch._foreach_*`` op as its per-tensor op over the lists
    (``torch._foreach_add_(xs, ys, alpha=a)`` as ``x.add_(y, alpha=a)`` for
    each pair), everything else as it is: a differentiable step records the
    ops torch.optim's differentiable step records (its single-tensor ops).
    The foreach ops' own derivatives keep every input of an out-of-place op,
    which the step's in-place writes then invalidate, and fail on a tensor
    hyperparameter shared by a list (torch 2.13)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not name.startswith("_foreach_"):
            return func(*args, **kwargs)
        op = name[len("_foreach_"):]
        count = len(next(arg for arg in args if isinstance(arg, (list, tuple))))
        results = [_one_tensor(op, *(_entry(arg, i) for arg in args),
                               **{key: _entry(value, i) for key, value in kwargs.items()}) for i in range(count)]
        return None if op.endswith("_") else results


def _entry(argument, i: int):
    """Entry ``i`` of a foreach op's list argument; any other argument as it is."""
    return argument[i] if isinstance(argument, (list, tuple)) else argument


def _one_tensor(op: str, *args, **kwargs):
    """``torch._foreach_<op>`` on one entry of its lists."""
    if op.startswith(("addcmul", "addcdiv")) and len(args) == 4:  # the foreach ops take the scale positionally
        *args, kwargs["value"] = args
    if op == "maximum_":  # no in-place maximum: the maximum with a copy, written back
        return args[0].copy_(torch.maximum(args[0].clone(), args[1]))
    if op.endswith("_"):
        return getattr(args[0], op)(*args[1:], **kwargs)
    return getattr(torch, op)(*args, **kwargs)


def _recorded(update):
    """``update`` (an optimizer's reference) as a differentiable step runs
    it: told so, and one tensor at a time (``_OneTensorAtATime``)."""
    def run(**arguments):
        with _OneTensorAtATime():
            update(**arguments, differentiable=True)
    return run


def _written_leaf(param: torch.Tensor) -> bool:
    """Whether ``param`` is a leaf that requires grad, or a view of one: an
    in-place write to it with autograd recording raises."""
    root = param._base if param._is_view() else param
    return root.is_leaf and root.requires_grad


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes land in the DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _by_device_dtype_and_layout(params):
    """``params`` split into lists sharing a device, a dtype and their
    gradients' layout (dense or sparse), in first-seen order."""
    buckets = {}
    for param in params:
        buckets.setdefault((param.device, param.dtype, param.grad.layout), []).append(param)
    return list(buckets.values())


# Elements per reference batch: each foreach op sweeps its whole list, so a
# batch this size keeps the working set of a step in cache between ops
# (RMSprop and Adam 1.7-2x faster at 10M parameters on a 2-core CPU than one
# batch), and a batch of several tensors makes one foreach call do the work
# of several: 1 << 16 put each 100K-element tensor in a batch of its own, and
# SGD (which batched then) at 1M parameters ran at 0.69x native's speed;
# 1 << 20: 1.07x (torchblocks bench --block optim). An optimizer whose passes
# do not reuse a batch sets its reference_batch_elements to None (SGD).
REFERENCE_BATCH_ELEMENTS = 1 << 20


class MultiTensorOptimizer(torch.optim.Optimizer):
    """Base class: ``step`` and the dispatch; subclasses define ``_update``.

    ``_update(group, params)`` gets the parameters of one group that share a
    device and dtype and have a gradient, creates any missing state, and
    calls ``self._apply(reference, launcher, compiled, tensors, per_tensor, **options)``.
    """

    # Elements per batch of the reference update; None: the whole list at once.
    reference_batch_elements: Optional[int] = REFERENCE_BATCH_ELEMENTS
    # Whether the twin refuses differentiable=True with foreach=True (its foreach step asserts that
    # foreach ops record no autograd): RMSprop's and Adam's do; SGD's steps through its foreach ops.
    foreach_refuses_differentiable = True

    def step(self, closure=None):
        """One update of every parameter that has a gradient. As in
        torch.optim, autograd records it when the optimizer was built with
        differentiable=True, and never otherwise (whatever the grad mode).

        Args:
            closure: optional callable that re-evaluates the model and returns
                the loss; run with gradients enabled before the update.

        Returns:
            The closure's loss, or None.
        """
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group_index, group in enumerate(self.param_groups):
                for params in _by_device_dtype_and_layout(self._params_with_grad(group, group_index)):
                    self._update(group, params)
        return loss

    def _params_with_grad(self, group: dict, group_index: int):
        params = []
        for param_index, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None:
                continue
            if group.get("fused"):  # complex (or other non-floating) parameters: torch's RuntimeError
                _device_dtype_check_for_fused(param)
            if grad.is_sparse and (error := self._sparse_gradient_error(group)) is not None:
                where = _describe(group, group_index, param_index, param)
                raise RuntimeError(f"{where} has a sparse gradient: {error}")
            if isinstance(param, DTensor) or isinstance(grad, DTensor):
                _check_placements(type(self).__name__, _describe(group, group_index, param_index, param), param, grad)
            if group["differentiable"] and torch.is_grad_enabled() and _written_leaf(param):
                raise RuntimeError(  # torch.optim's in-place op raises the same type, after writing the state
                    f"{type(self).__name__}: {_describe(group, group_index, param_index, param)} is a leaf that "
                    "requires grad (or a view of one), which differentiable=True cannot step in place with autograd "
                    "recording; expected a tensor computed from it (e.g. param.clone()), as in torch.optim")
            params.append(param)
        if params and group["differentiable"] and group["foreach"] and self.foreach_refuses_differentiable:
            raise AssertionError(f"{type(self).__name__}: foreach=True with differentiable=True, which "
                                 f"torch.optim.{type(self).__name__} refuses (its foreach step records no autograd); "
                                 "expected foreach=None or False")
        return params

    def _sparse_gradient_error(self, group: dict) -> Optional[str]:
        """Why ``group`` cannot take a sparse gradient, in the twin's words
        (torch.optim.RMSprop's here), or None where the twin steps it."""
        return f"{type(self).__name__} does not support sparse gradients"

    def _update(self, group: dict, params: list) -> None:
        raise NotImplementedError

    def _advance_steps(self, params, state_keys, capturable: bool = False) -> list:
        """Give each parameter without state a ``step`` of 0 and a zero tensor
        like it per name in ``state_keys``; then add 1 to every ``step``
        counter. Returns the step tensors: on the host, or when
        ``capturable`` on the parameters' device (see ``_read_steps``)."""
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=scalar_dtype(), device=param.device if capturable else None)
                for key in state_keys:
                    state[key] = torch.zeros_like(param)
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)
        return steps

    @staticmethod
    def _read_steps(steps: list) -> list:
        """The counts of ``steps`` (from ``_advance_steps``) as floats, read on the host."""
        return torch.stack([s.to("cpu") for s in steps]).tolist()

    def _apply(self, reference, launcher, compiled: Optional[str], tensors: dict, per_tensor: dict, *,
               differentiable: bool = False, **options) -> None:
        """Run the update on ``tensors`` (by argument name: lists of tensors
        laid out like the parameters, ``params`` first, or None for a state
        the options leave unused) and ``per_tensor`` (by argument name: one
        value per parameter, a float or a capturable step tensor) with the
        Triton ``launcher`` in one launch, or with the eager CPU module's
        function named ``compiled``, or with ``reference`` in batches of
        ``reference_batch_elements`` (on float32 copies of 16-bit tensors):
        the last for what the others leave, and for everything when they are
        None or the gradients are sparse. The three take the same arguments.
        DTensors are replaced by their local shards first, then complex
        tensors by their real views; ``entries_stepped`` counts what each ran.
        With ``differentiable`` (autograd records the step) the reference
        steps everything, called with differentiable=True (``_recorded``)."""
        if differentiable:
            launcher, compiled, reference = None, None, _recorded(reference)
        tensors = {name: None if role is None else [_local(tensor) for tensor in role]
                   for name, role in tensors.items()}
        if tensors["params"][0].is_complex():  # one dtype a list: every tensor in it is complex
            tensors = {name: None if role is None else [torch.view_as_real(tensor) for tensor in role]
                       for name, role in tensors.items()}
        params = tensors["params"]
        indices = range(len(params))
        strided = not tensors["grads"][0].is_sparse  # one layout a list: sparse ones take the reference
        # Under a compiling trace (torch.compile(optimizer.step)) the reference steps on every backend:
        # dynamo traces its foreach ops, as it traces torch.optim's, and cannot trace a launch's pointer tables.
        if strided and launcher is not None and not torch.compiler.is_compiling() and backend.use_triton(params[0]):
            roles = [role for role in tensors.values() if role is not None]
            flat = [i for i in indices if kernels._launch.shares_flat_layout(*(role[i] for role in roles))
                    and not any(role[i].is_neg() for role in roles)]  # a lazy negation no pointer carries
            _call(launcher, flat, tensors, per_tensor, options)
            _count_writes(tensors, flat)
            entries_stepped["triton"] += len(flat)
            flat_set = set(flat)
            indices = [i for i in indices if i not in flat_set]
        elif (strided and compiled is not None
              and (module := _eager_cpu.runs(*params, *tensors["grads"])) is not None):
            left = getattr(module, compiled)(**tensors, **per_tensor, **options)
            left_set = set(left)
            _count_writes(tensors, [i for i in indices if i not in left_set])
            entries_stepped["compiled-cpu"] += len(params) - len(left)
            indices = left
        entries_stepped["reference"] += len(indices)
        if params[0].dtype in (torch.float16, torch.bfloat16):
            reference = _in_float32(reference)
        for batch in _cache_sized_batches(params, indices, self.reference_batch_elements):
            _call(reference, batch, tensors, per_tensor, options)


def _in_float32(update):
    """``update`` on float32 copies of float16/bfloat16 tensors, each written
    back with one rounding: the math of the Triton kernels. torch's CPU
    foreach ops round a scalar to the tensors' dtype first (RMSprop's
    alpha = 0.99 would decay by 0.98828125 in bfloat16), where torch.optim's
    default step keeps it in float32."""
    def sixteen_bit(values) -> bool:
        return isinstance(values, list) and bool(values) and isinstance(values[0], torch.Tensor) and \
            values[0].dtype in (torch.float16, torch.bfloat16)

    def run(**arguments):
        wide = {name: [t.float() for t in values] if sixteen_bit(values) else values
                for name, values in arguments.items()}
        update(**wide)
        for name, values in arguments.items():
            if name != "grads" and sixteen_bit(values):
                for narrow, widened in zip(values, wide[name]):
                    narrow.copy_(widened)
    return run


def _count_writes(tensors: dict, indices) -> None:
    """Bump autograd's version counter of every tensor at ``indices`` that a
    Triton or compiled step wrote through its data pointer (all roles but
    the gradients), as an in-place op would: a graph that saved a parameter
    before the step then raises on backward, as with torch.optim, instead of
    computing with the new values. A compiling trace tracks the writes itself."""
    if not indices or torch.compiler.is_compiling():
        return
    written = [role[i] for name, role in tensors.items() if role is not None and name != "grads" for i in indices]
    try:
        torch.autograd.graph.increment_version(written)
    except TypeError:  # torch < 2.6 takes one tensor a call
        for tensor in written:
            torch.autograd.graph.increment_version(tensor)


def _cache_sized_batches(params, indices, limit: Optional[int]):
    if limit is None:
        yield list(indices)
        return
    batch, size = [], 0
    for i in indices:
        if batch and size + params[i].numel() > limit:
            yield batch
            batch, size = [], 0
        batch.append(i)
        size += params[i].numel()
    if batch:
        yield batch


def _call(update, indices, tensors, per_tensor, options) -> None:
    """``update`` on the entries at ``indices`` (ascending) of every list of ``tensors`` and ``per_tensor``."""
    if not indices:
        return
    arguments = {**tensors, **per_tensor}
    if len(indices) < len(tensors["params"]):
        arguments = {name: None if values is None else [values[i] for i in indices]
                     for name, values in arguments.items()}
    update(**arguments, **options)
