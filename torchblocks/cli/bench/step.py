"""What one training step of the book's network costs, counted rather than
timed: Triton launches, other tensor ops, new allocations and tensors built
from host data (each a host-to-device copy on a GPU). Counts need no GPU: on
the CPU the Triton kernels run under the interpreter, and the counts are the
ones a GPU would see.

The step: Dense 784 -> 512 with ReLU, Dense 512 -> 10, softmax cross-entropy
(mean), ``zero_grad``, backward, RMSprop, on a batch of 128.

Example::

    >>> with torchblocks.use_backend("triton"):  # on CUDA, or under TRITON_INTERPRET=1
    ...     counts = count_training_step("cpu")
    >>> counts.triton_launches
    9
"""

import contextlib
import dataclasses
from typing import Dict, List

import torch
from torch.utils._python_dispatch import _disable_current_modes

from torchblocks import backend
from torchblocks._ops import _eager_cpu
from torchblocks.testing import InsideBlocksMode, around_triton_launches, tensors

BATCH = 128
IN_FEATURES = 784


@dataclasses.dataclass
class StepCounts:
    """Counts of one training step.

    Attributes:
        triton_launches: Triton kernel launches.
        tensor_ops: other ops that run on tensor data (views, which move no
            data, are not counted; neither are the Triton launches).
        allocations: ops whose output is a new tensor storage.
        host_uploads: tensors built from host data (``torch.tensor``) or
            copied from the CPU onto another device.
        ops: each counted tensor op's name and how often it ran.
        path: what was counted, where it is not the Triton kernels.
    """
    triton_launches: int
    tensor_ops: int
    allocations: int
    host_uploads: int
    ops: Dict[str, int]
    path: str = ""


def describe(counts: StepCounts) -> str:
    """One line for the bench header.

    Example::

        >>> describe(StepCounts(9, 5, 17, 0, {}))
        'one training step of the book network (...): 9 Triton launches, 5 other tensor ops, 17 allocations, ...'
    """
    path = f"; {counts.path}" if counts.path else ""
    return (f"one training step of the book network (784-512-10, batch {BATCH}, RMSprop{path}): "
            f"{counts.triton_launches} Triton launches, {counts.tensor_ops} other tensor ops, "
            f"{counts.allocations} allocations, {counts.host_uploads} host-to-device uploads")


class _OpCounter(InsideBlocksMode):
    """Counts the aten ops that reach the dispatcher (inside torchblocks'
    custom ops too), and the new storages they allocate. Ops on host-only
    tensors (``host_storages``: the optimizer's CPU step counters) are not
    counted: on a GPU they never touch the device."""

    # ops that describe a tensor without moving data, or only allocate
    # (counted as allocations, not as tensor ops)
    METADATA = {"aten::detach", "aten::alias", "aten::lift_fresh"}
    ALLOCATING = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                  "aten::new_empty_strided"}

    def __init__(self, host_storages=()):
        super().__init__()
        self.host_storages = set(host_storages)
        self.ops: Dict[str, int] = {}
        self.allocations = 0
        self.host_uploads = 0

    def record(self, func, args, kwargs, output) -> None:
        name = func._schema.name
        inputs = tensors((args, kwargs))
        if name.startswith("profiler::") or (inputs and {_storage(t) for t in inputs} <= self.host_storages):
            return
        outputs = tensors(output)
        input_storages = {_storage(t) for t in inputs}
        self.allocations += sum(1 for t in outputs if t.numel() and _storage(t) not in input_storages)
        if name == "aten::lift_fresh" or (name in ("aten::_to_copy", "aten::copy_") and _crosses_from_host(
                inputs, outputs)):
            self.host_uploads += 1
        if not func.is_view and name not in self.METADATA and name not in self.ALLOCATING:
            self.ops[name] = self.ops.get(name, 0) + 1


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _crosses_from_host(inputs: List[torch.Tensor], outputs: List[torch.Tensor]) -> bool:
    return bool(inputs and outputs) and inputs[-1].device.type == "cpu" and outputs[0].device.type != "cpu"


@contextlib.contextmanager
def count_triton_launches():
    """Count the Triton kernel launches in the block (a launch through an
    autotuner counts once): yields a one-element list that holds the count.
    The launches' own work (the interpreter's copies of their arguments) is
    hidden from any dispatch mode that counts ops."""
    count = [0]

    @contextlib.contextmanager
    def counted():
        count[0] += 1
        with _disable_current_modes():
            yield

    with around_triton_launches(counted):
        yield count


def count_training_step(device: str, dtype: torch.dtype = torch.float32, batch: int = BATCH) -> StepCounts:
    """Build the book's network with torchblocks' blocks and RMSprop on
    ``device``, run two warm-up steps (state, autotuning, caches), then count
    the third.

    Args:
        device: ``"cpu"`` or ``"cuda"``; on the CPU the Triton backend needs
            ``TRITON_INTERPRET=1``, and the counts follow the backend in force.
        dtype: the parameters' and inputs' dtype.
        batch: images per step; the counts do not depend on it (a small
            batch keeps the interpreter quick).
    """
    from torchblocks.cli import book

    model, loss_fn = book.build_network(IN_FEATURES, device=torch.device(device))
    model.to(dtype)
    optimizer = book.build_optimizer(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, IN_FEATURES, generator=generator).to(device, dtype)
    labels = torch.randint(book.NUM_CLASSES, (batch,), generator=generator).to(device)

    def step():
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()

    for _ in range(2):
        step()
    counter = _OpCounter(_storage(state["step"]) for state in optimizer.state.values())
    with count_triton_launches() as launches, counter:
        step()
    if backend.use_triton(images):
        path = ""
    elif images.is_cpu and _eager_cpu.serving(images):
        path = "the reference: the C++ kernels of the Dense and cross-entropy ops"
    else:
        path = "the reference's Python Functions" + (" (the compiled eager CPU path off)" if images.is_cpu else "")
    return StepCounts(launches[0], sum(counter.ops.values()), counter.allocations, counter.host_uploads,
                      dict(sorted(counter.ops.items())), path)
