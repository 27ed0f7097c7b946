"""The chapter's second half, rebuilt on torchblocks' blocks: a network with no
torch.nn and no torch.optim, trained by the update ``w -= lr * grad`` written out.

    python examples/from_scratch.py                  # 10 epochs on MNIST (or the embedded digits)
    python examples/from_scratch.py --limit 1000     # a quick run on the first 1,000 images

Only the forward and backward passes come from torchblocks: ``dense`` and
``softmax_cross_entropy`` are autograd Functions whose backward passes were
derived by hand, so ``loss.backward()`` below runs that math, layer by layer,
from the loss back to the first weights.
"""

import argparse
import math

import torch

import torchblocks
from torchblocks.functional import dense, softmax_cross_entropy


class NaiveDense:
    """One layer: ``activation(inputs @ W^T + b)``.

    The book draws W uniform in [0, 0.1) with shape (input, output); torch
    stores it as (output, input), the layout ``dense`` takes (as F.linear).
    """

    def __init__(self, input_size, output_size, activation, generator):
        self.W = (torch.rand(output_size, input_size, generator=generator) * 0.1).requires_grad_()
        self.b = torch.zeros(output_size, requires_grad=True)
        self.activation = activation

    def __call__(self, inputs):
        return dense(inputs, self.W, self.b, self.activation)

    @property
    def weights(self):
        return [self.W, self.b]


class NaiveSequential:
    """Layers applied one after the other; its weights are all of theirs."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, inputs):
        for layer in self.layers:
            inputs = layer(inputs)
        return inputs

    @property
    def weights(self):
        return [weight for layer in self.layers for weight in layer.weights]


class BatchGenerator:
    """The training set in order (no shuffling, as in the book), ``batch_size`` images at a time."""

    def __init__(self, images, labels, batch_size=128):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.num_batches = math.ceil(len(images) / batch_size)
        self.index = 0

    def next(self):
        images = self.images[self.index:self.index + self.batch_size]
        labels = self.labels[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return images, labels


def one_training_step(model, images_batch, labels_batch, learning_rate):
    # Forward pass: the logits, one row of 10 class scores per image.
    logits = model(images_batch)
    # The loss: mean cross-entropy of softmax(logits) against the labels. The
    # book applies softmax in the last layer and clips the probabilities to
    # [1e-7, 1 - 1e-7] before the log; this block takes the logits and
    # computes log-softmax exactly, so its gradient never vanishes.
    loss = softmax_cross_entropy(logits, labels_batch)
    # Backward pass: d loss / d w for every weight, into w.grad.
    loss.backward()
    # Gradient descent: a small step against the gradient, then forget it.
    with torch.no_grad():
        for w in model.weights:
            w -= learning_rate * w.grad
            w.grad = None
    return loss.item()


def fit(model, images, labels, epochs, batch_size=128, learning_rate=1e-3):
    for epoch_counter in range(epochs):
        batch_generator = BatchGenerator(images, labels, batch_size)
        losses = [one_training_step(model, *batch_generator.next(), learning_rate)
                  for _ in range(batch_generator.num_batches)]
        print(f"epoch {epoch_counter + 1}/{epochs}: mean loss {sum(losses) / len(losses):.4f}")


def evaluate(model, images, labels):
    # The predicted class is the largest logit (softmax does not change the order).
    with torch.no_grad():
        predicted_labels = model(images).argmax(dim=1)
    return (predicted_labels == labels).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, help="train on the first N training images only")
    parser.add_argument("--data-dir", help="where MNIST is or is downloaded to (see torchblocks mnist --help)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = torchblocks.cli.data.load_mnist(args.data_dir, download_missing=args.download)
    if data.note:
        print(f"note: {data.note}")
    train_images, train_labels = data.train_images[:args.limit], data.train_labels[:args.limit]
    print(f"data: {data.describe()}; training on {len(train_labels):,} images")

    generator = torch.Generator().manual_seed(args.seed)
    pixels = train_images.shape[1]
    model = NaiveSequential([
        NaiveDense(input_size=pixels, output_size=512, activation="relu", generator=generator),
        NaiveDense(input_size=512, output_size=10, activation=None, generator=generator),
    ])
    fit(model, train_images, train_labels, args.epochs, args.batch_size, args.learning_rate)
    accuracy = evaluate(model, data.test_images, data.test_labels)
    print(f"test accuracy: {accuracy:.4f} ({data.name})")
    return accuracy


if __name__ == "__main__":
    main()
