"""Whole models after ``torchblocks.patch``, forward + backward, against the
same models unpatched: a torchvision-style MLP and a small transformer
encoder block, built here from random weights (no downloads). TFLOP/s of
their GEMMs against the GEMM peak; every parameter's gradient is checked."""

import torch
from torch import nn

from torchblocks.cli.bench.harness import Case, generator, training_step
from torchblocks.patching import patch


def mlp(dtype, device):
    """torchvision.ops.MLP(784, [512, 256, 10]): Linear, ReLU, Dropout per
    hidden layer, then the last Linear and its Dropout."""
    layers = []
    for in_features, out_features in ((784, 512), (512, 256)):
        layers += [nn.Linear(in_features, out_features), nn.ReLU(), nn.Dropout(0.0)]
    layers += [nn.Linear(256, 10), nn.Dropout(0.0)]
    return nn.Sequential(*layers).to(device, dtype)


def transformer_block(dtype, device):
    """One post-norm encoder layer, d_model 256, 4 heads, feed-forward 1024, ReLU."""
    return nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True).to(device, dtype)


def mlp_flops(batch):
    return 3 * 2 * batch * (784 * 512 + 512 * 256 + 256 * 10)


def transformer_flops(batch, seq, d_model=256, feed_forward=1024):
    projections = 2 * batch * seq * d_model * (4 * d_model + 2 * feed_forward)
    attention = 2 * 2 * batch * seq * seq * d_model
    return 3 * (projections + attention)


MODELS = {
    # name: (builder, input shape, GEMM FLOPs of a forward + backward)
    "MLP 784-512-256-10": (mlp, (128, 784), mlp_flops(128)),
    "encoder d=256 B=16 T=64": (transformer_block, (16, 64, 256), transformer_flops(16, 64)),
}


def run_model(model, x):
    return model(x)


def cases(device: str, dtype: torch.dtype, quick: bool):
    """One case per model; the weights and the input need gradients.

    Example::

        >>> rows = harness.measure(next(cases("cpu", torch.float32, quick=True)), "cpu", torch.float32, peak=0.1)
    """
    for name, (build, shape, flops) in MODELS.items():
        def make_inputs(seed, provider, build=build, shape=shape):
            torch.manual_seed(seed)
            model = build(dtype, device)
            if provider == "torchblocks":
                patch(model)
            elif provider == "compiled":
                model = torch.compile(model)
            random = generator(device, seed)
            x = torch.randn(shape, generator=random, device=device, dtype=dtype).requires_grad_()
            parameters = tuple(model.parameters())
            output_shape = model(x).shape
            grad_output = torch.randn(output_shape, generator=random, device=device, dtype=dtype)
            return (model, x), (x, *parameters), grad_output

        parameter_bytes = sum(p.numel() for p in build(dtype, "meta").parameters()) * dtype.itemsize
        # the parameters read in the forward and the backward, their gradients written: the floor of any step
        minimum = 3 * parameter_bytes
        providers = {provider: training_step(run_model) for provider in ("torchblocks", "native", "compiled")}
        yield Case("patched", name, flops / 1e9, "GFLOP per pass", flops, "TFLOP/s", make_inputs, providers,
                   min_bytes=minimum, our_bytes=minimum, matmul=True)
        if quick:
            return
