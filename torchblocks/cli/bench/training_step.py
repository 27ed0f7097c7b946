"""One training step of the book's network (Dense 784->512 ReLU, Dense 512->10,
softmax cross-entropy, RMSprop, batch 128) against the same step in native
PyTorch: TFLOP/s of its six GEMMs against the GEMM peak. The step's small
ops, launches and dispatch all count here, as they do in training."""

import dataclasses
import itertools
from typing import Callable, List

import torch

from torchblocks.cli import book
from torchblocks.cli.bench.harness import Case, generator

BATCH = 128
# Distinct batches the step cycles through, as training on a dataset does.
# On one batch stepped over and over the loss fell below 1e-4 within 300
# steps, two thirds of RMSprop's square_avg became denormal floats, and
# native's foreach step slowed 6-11x on them: the case timed that, not a
# training step. Random labels over 64 batches are not fitted in the
# thousand or so steps a case runs (loss 2.7 at the first step, 1.8 at the 1,500th).
BATCHES = 64
LAYERS = ((784, book.HIDDEN_FEATURES), (book.HIDDEN_FEATURES, book.NUM_CLASSES))


@dataclasses.dataclass
class Trainer:
    """One input set: a network, its loss and optimizer, and a batch."""
    step: Callable[[], None]
    params: List[torch.Tensor]


def take_step(trainer: Trainer):
    trainer.step()
    return [param.detach() for param in trainer.params]


def bytes_moved(dtype: torch.dtype):
    """(minimum, ours): the batch and every parameter, gradient and RMSprop
    state read and written as each op of the step needs them, per the Dense,
    cross-entropy and optimizer models: the sum of the blocks' models."""
    from torchblocks.cli.bench import cross_entropy, dense

    size = dtype.itemsize
    minimum = ours = 0
    for k, n in LAYERS:
        dense_minimum, dense_ours = dense.bytes_moved(BATCH, n, k, size)
        minimum, ours = minimum + dense_minimum, ours + dense_ours
    ce_minimum = cross_entropy.LOGITS_MOVED * BATCH * book.NUM_CLASSES * size + 8 * BATCH
    params = sum(k * n + n for k, n in LAYERS)
    return minimum + ce_minimum + 5 * params * size, ours + cross_entropy.our_bytes(
        BATCH, book.NUM_CLASSES, dtype) + 5 * params * size


def cases(device: str, dtype: torch.dtype, quick: bool):
    """One case: the step as ``torchblocks mnist`` runs it, on BATCHES batches in turn.

    Example::

        >>> rows = harness.measure(next(cases("cpu", torch.float32, quick=True)), "cpu", torch.float32, peak=0.1)
    """
    def make_inputs(seed, provider):
        model, loss_fn = book.build_network(784, native=provider != "torchblocks", seed=seed,
                                            device=torch.device(device))
        model.to(dtype)
        optimizer = book.build_optimizer(model, native=provider != "torchblocks")
        random = generator(device, seed)
        images = torch.rand(BATCHES, BATCH, 784, generator=random, device=device, dtype=dtype)
        labels = torch.randint(book.NUM_CLASSES, (BATCHES, BATCH), generator=random, device=device)
        batches = itertools.cycle(zip(images, labels))
        forward = torch.compile(model) if provider == "compiled" else model

        def step():
            batch_images, batch_labels = next(batches)
            optimizer.zero_grad()
            loss_fn(forward(batch_images), batch_labels).backward()
            optimizer.step()

        return Trainer(step, list(model.parameters()))

    flops = sum(3 * 2 * BATCH * k * n for k, n in LAYERS)
    minimum, ours = bytes_moved(dtype)
    yield Case("training_step", f"book M={BATCH} 784-512-10", flops / 1e9, "GFLOP per step", flops, "TFLOP/s",
               make_inputs, {"torchblocks": take_step, "native": take_step, "compiled": take_step},
               min_bytes=minimum, our_bytes=ours, matmul=True, rotate=False)
