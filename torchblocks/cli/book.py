"""The book's first network, end to end: ``Dense(512, relu)`` then
``Dense(10)`` on flattened digit images, softmax cross-entropy, RMSprop as
Keras 2 configures it. Trained with torchblocks and, for comparison, with
native PyTorch from the same initial weights on the same batches.
``torchblocks mnist`` runs it; see ``main``.
"""

import dataclasses
import math
import statistics
import sys
import time
from typing import List, Optional, Sequence, TextIO, Tuple

import torch
from torch import nn

import torchblocks.nn
import torchblocks.optim
from torchblocks.cli import _plot, _table
from torchblocks.cli._progress import ProgressBar
from torchblocks.cli.data import Digits, load_mnist

__all__ = ["BOOK_TEST_ACCURACY", "Epoch", "Run", "build_network", "build_optimizer", "evaluate", "format_report",
           "plot", "train", "train_together"]

HIDDEN_FEATURES = 512
NUM_CLASSES = 10
# Keras 2's "rmsprop": learning_rate=1e-3, rho=0.9 (torch's alpha), epsilon=1e-7 outside the square root.
RMSPROP = {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7}
# Deep Learning with Python, 2nd edition, chapter 2: test accuracy after 5 epochs on real MNIST (Keras 2).
BOOK_TEST_ACCURACY = 0.9785
EVALUATION_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class Epoch:
    """One epoch's figures. ``train_*`` are means over the epoch's batches as
    they were trained on (Keras's running mean at the epoch's end); ``seconds``
    counts the training steps only, not the test pass."""
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float


@dataclasses.dataclass
class Run:
    """One training run: its name and its epochs."""
    name: str
    epochs: List[Epoch] = dataclasses.field(default_factory=list)

    def seconds_per_epoch(self) -> float:
        """The median epoch time: the first epoch's warm-up (kernel compilation) does not count."""
        return statistics.median(epoch.seconds for epoch in self.epochs)


def build_network(in_features: int, native: bool = False, seed: int = 0,
                  device: Optional[torch.device] = None) -> Tuple[nn.Module, nn.Module]:
    """The book's network and its loss, initialised as Keras does it.

    Weights Glorot-uniform (limit ``sqrt(6 / (fan_in + fan_out))``), biases
    zero, drawn from a generator seeded with ``seed``: the torchblocks and the
    native network built with one seed hold identical parameters.

    Args:
        in_features: pixels per image (784 for MNIST).
        native: build it from ``nn.Linear``, ``nn.ReLU`` and
            ``nn.CrossEntropyLoss`` instead of torchblocks' blocks.
        seed: seeds the initial weights.
        device: where the parameters live.

    Returns:
        ``(model, loss_fn)``: model maps ``(N, in_features)`` to ``(N, 10)``
        logits; ``loss_fn(logits, labels)`` is the mean cross-entropy.

    Example::

        >>> model, loss_fn = build_network(784)
        >>> loss_fn(model(torch.rand(128, 784)), torch.randint(10, (128,)))
        tensor(2.3..., grad_fn=...)
    """
    if native:
        layers = [nn.Linear(in_features, HIDDEN_FEATURES), nn.ReLU(), nn.Linear(HIDDEN_FEATURES, NUM_CLASSES)]
        loss_fn = nn.CrossEntropyLoss()
    else:
        layers = [torchblocks.nn.Dense(in_features, HIDDEN_FEATURES, activation="relu"),
                  torchblocks.nn.Dense(HIDDEN_FEATURES, NUM_CLASSES)]
        loss_fn = torchblocks.nn.SoftmaxCrossEntropy()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            if hasattr(layer, "weight"):
                fan_out, fan_in = layer.weight.shape
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * (2 * limit) - limit)
                layer.bias.zero_()
    return nn.Sequential(*layers).to(device), loss_fn


def build_optimizer(model: nn.Module, native: bool = False) -> torch.optim.Optimizer:
    """RMSprop with Keras 2's defaults (``lr=1e-3, alpha=0.9, eps=1e-7``):
    ``torchblocks.optim.RMSprop``, or ``torch.optim.RMSprop`` when ``native``.

    Example::

        >>> optimizer = build_optimizer(build_network(784)[0])
    """
    optimizer_class = torch.optim.RMSprop if native else torchblocks.optim.RMSprop
    return optimizer_class(model.parameters(), **RMSPROP)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``images (N, F)`` with ``labels (N,)``.

    Example::

        >>> test_loss, test_accuracy = evaluate(model, loss_fn, data.test_images, data.test_labels)
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for start in range(0, len(labels), EVALUATION_BATCH):
        batch_images, batch_labels = images[start:start + EVALUATION_BATCH], labels[start:start + EVALUATION_BATCH]
        logits = model(batch_images)
        loss_sum += loss_fn(logits, batch_labels).double() * len(batch_labels)
        correct += (logits.argmax(dim=1) == batch_labels).sum()
    return loss_sum.item() / len(labels), correct.item() / len(labels)


def train(name: str, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, data: Digits,
          epochs: int = 5, batch_size: int = 128, seed: int = 0, stream: Optional[TextIO] = None) -> Run:
    """Train ``model`` on ``data`` the book's way: ``train_together`` with one network.

    Example::

        >>> data = torchblocks.cli.data.load_mnist()
        >>> model, loss_fn = build_network(data.train_images.shape[1])
        >>> run = train("torchblocks", model, loss_fn, build_optimizer(model), data)
        >>> run.epochs[-1].test_accuracy
        0.98...
    """
    return train_together([(name, model, loss_fn, optimizer)], data, epochs, batch_size, seed, stream)[0]


def train_together(networks: Sequence[Tuple[str, nn.Module, nn.Module, torch.optim.Optimizer]], data: Digits,
                   epochs: int = 5, batch_size: int = 128, seed: int = 0,
                   stream: Optional[TextIO] = None) -> List[Run]:
    """Train several networks on ``data`` the book's way, a step of each in turn.

    Each epoch visits the training images in a fresh random order drawn from
    a generator seeded with ``seed`` (so every network, and every run with
    that seed, sees the same batches), in batches of ``batch_size``, the
    last partial batch kept. Each batch is one optimizer step of every
    network, one network after the other (in reverse order on every other
    batch, so that none is always first to meet the batch), so that the
    machine's slow and fast spells fall on all of them alike; a network's
    epoch time counts its own steps only. Then the test set is evaluated.
    One progress bar per epoch, then a line per network.

    Args:
        networks: ``(name, model, loss_fn, optimizer)`` each, from
            ``build_network`` and ``build_optimizer``, on one device.
        data: the images and labels; moved to the models' device.
        epochs, batch_size, seed: the schedule.
        stream: where the progress goes (default ``sys.stdout``, as Keras's).

    Returns:
        a ``Run`` per network, with one ``Epoch`` per epoch.

    Raises:
        ValueError: ``networks`` is empty.

    Example::

        >>> runs = train_together([("torchblocks", *build_network(784), optimizer),
        ...                        ("native torch", *build_network(784, native=True), native_optimizer)], data)
    """
    if not networks:
        raise ValueError("train_together: networks is empty; expected at least one (name, model, loss_fn, optimizer)")
    stream = stream or sys.stdout
    device = next(networks[0][1].parameters()).device
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
    order = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(labels) / batch_size)
    runs = [Run(name) for name, *_ in networks]
    width = max(len(run.name) for run in runs)
    for epoch in range(1, epochs + 1):
        for _, model, _, _ in networks:
            model.train()
        permutation = torch.randperm(len(labels), generator=order).to(device)
        bar = ProgressBar(steps, label=f"epoch {epoch}/{epochs}", stream=stream)
        loss_sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in networks]
        corrects = [torch.zeros((), dtype=torch.int64, device=device) for _ in networks]
        seconds = [0.0 for _ in networks]
        for step in range(steps):
            batch = permutation[step * batch_size:(step + 1) * batch_size]
            batch_images, batch_labels = images[batch], labels[batch]
            for index in range(len(networks)) if step % 2 == 0 else reversed(range(len(networks))):
                _, model, loss_fn, optimizer = networks[index]
                _synchronize(device)
                start = time.perf_counter()
                logits = model(batch_images)
                loss = loss_fn(logits, batch_labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                _synchronize(device)
                seconds[index] += time.perf_counter() - start
                loss_sums[index] += loss.detach().double() * len(batch)
                corrects[index] += (logits.detach().argmax(dim=1) == batch_labels).sum()
            if bar.due():
                seen = min((step + 1) * batch_size, len(labels))
                bar.update(step + 1, " | ".join(f"{run.name} loss {loss_sum.item() / seen:.4f}"
                                                for run, loss_sum in zip(runs, loss_sums)))
        bar.close(steps)
        for (_, model, loss_fn, _), run, loss_sum, correct, spent in zip(networks, runs, loss_sums, corrects, seconds):
            test_loss, test_accuracy = evaluate(model, loss_fn, test_images, test_labels)
            result = Epoch(loss_sum.item() / len(labels), correct.item() / len(labels), test_loss, test_accuracy,
                           spent)
            run.epochs.append(result)
            print(f"  {run.name:<{width}}  loss {result.train_loss:.4f} accuracy {result.train_accuracy:.4f} "
                  f"test accuracy {result.test_accuracy:.4f} {spent:.2f}s", file=stream, flush=True)
    return runs


def format_report(runs: List[Run], data: Digits) -> str:
    """The results as a table: the last epoch of each run, and the book's figure when the data is MNIST.

    Example::

        >>> print(format_report([run], data))
        run          data   train loss  train accuracy  test loss  test accuracy  s/epoch
        ...
    """
    header = ("run", "data", "train loss", "train accuracy", "test loss", "test accuracy", "s/epoch")
    body = [(run.name, data.name, f"{run.epochs[-1].train_loss:.4f}", f"{run.epochs[-1].train_accuracy:.4f}",
             f"{run.epochs[-1].test_loss:.4f}", f"{run.epochs[-1].test_accuracy:.4f}",
             f"{run.seconds_per_epoch():.3g}") for run in runs]
    if data.name == "MNIST":
        body.append(("the book (Keras 2, 5 epochs)", "MNIST", "-", "-", "-", f"{BOOK_TEST_ACCURACY:.4f}", "-"))
    return _table.format_table(header, body)


# How each run is drawn, so that identical curves stay visible: torchblocks
# solid with small filled markers, on top of native dashed with large hollow ones.
RUN_STYLES = [{"linestyle": "-", "markersize": 4, "zorder": 3},
              {"linestyle": "--", "markersize": 10, "markerfacecolor": "none", "zorder": 2}]


def plot_panels(runs: List[Run]) -> dict:
    """The panels of ``plot``: loss and accuracy, a line per run and split
    (colour: the run; marker: o for training, s for test; line and marker
    style: ``RUN_STYLES``)."""
    panels = {"loss": {}, "accuracy": {}}
    for index, run in enumerate(runs):
        options = RUN_STYLES[index % len(RUN_STYLES)]
        xs = list(range(1, len(run.epochs) + 1))
        for metric in panels:
            for split, marker in (("train", "o"), ("test", "s")):
                values = [getattr(epoch, f"{split}_{metric}") for epoch in run.epochs]
                panels[metric][f"{run.name} {split}"] = (xs, values, f"C{index}{marker}", options)
    return panels


def plot(runs: List[Run], data: Digits, path: str) -> None:
    """A PNG at ``path``: loss and accuracy per epoch, training and test, for every run.

    Example::

        >>> plot([torchblocks_run, native_run], data, "mnist.png")
    """
    _plot.save_line_plots(path, f"The book's first network on {data.name}", "", "epoch", plot_panels(runs),
                          integer_x=True)


def main(args, device: str) -> int:
    """``torchblocks mnist`` on ``device``: load the data, train with torchblocks
    (and natively with ``args.compare``), print the table, write the plot."""
    if args.plot:
        _plot.require_matplotlib("--plot")
    device = torch.device(device)
    data = load_mnist(args.data_dir, download_missing=args.download)
    if data.note:
        print(f"note: {data.note}")
    print(f"data: {data.describe()}", end="")
    if args.limit is not None:
        data = dataclasses.replace(data, train_images=data.train_images[:args.limit],
                                   train_labels=data.train_labels[:args.limit])
        print(f" (the first {len(data.train_labels):,} training images used)", end="")
    print()
    print(f"network: Dense({data.train_images.shape[1]}, {HIDDEN_FEATURES}, relu) -> "
          f"Dense({HIDDEN_FEATURES}, {NUM_CLASSES}), softmax cross-entropy, RMSprop(lr=1e-3, alpha=0.9, eps=1e-7), "
          f"{args.epochs} epoch{'s' if args.epochs > 1 else ''} of batch {args.batch_size}, seed {args.seed}, "
          f"on {device}", flush=True)
    networks = []
    for native in (False, True) if args.compare else (False,):
        model, loss_fn = build_network(data.train_images.shape[1], native, args.seed, device)
        networks.append(("native torch" if native else "torchblocks", model, loss_fn, build_optimizer(model, native)))
    runs = train_together(networks, data, args.epochs, args.batch_size, args.seed)
    print()
    print(format_report(runs, data))
    if args.compare:
        gap = runs[0].epochs[-1].test_accuracy - runs[1].epochs[-1].test_accuracy
        print(f"\ntest accuracy, torchblocks minus native: {gap:+.4f} ({data.name}, {len(data.test_labels):,} "
              f"test images; one image is {1 / len(data.test_labels):.4f})")
    if args.plot:
        plot(runs, data, args.plot)
        print(f"plot: {args.plot}")
    return 0
