"""One optimizer step against ``torch.optim``'s default, fused and compiled steps: GB/s against the copy peak."""

import dataclasses
from typing import Callable, List

import torch

import torchblocks.optim
from torchblocks.cli.bench.harness import Case, generator

# name -> (options, tensors one step reads + writes per parameter element)
OPTIMIZERS = {
    "SGD": ({"lr": 1e-3, "momentum": 0.9}, 5),  # reads p, g, buffer; writes p, buffer
    "RMSprop": ({"lr": 1e-3}, 5),  # reads p, g, square_avg; writes p, square_avg
    "Adam": ({"lr": 1e-3}, 7),  # reads p, g, exp_avg, exp_avg_sq; writes p, exp_avg, exp_avg_sq
    "AdamW": ({"lr": 1e-3}, 7),
}
HAS_FUSED = {"SGD", "Adam", "AdamW"}


@dataclasses.dataclass
class Stepper:
    """One input set: parameters with gradients, and the step of the optimizer that owns them."""
    params: List[torch.Tensor]
    step: Callable[[], None]


def take_step(stepper: Stepper):
    stepper.step()
    return stepper.params


def sizes(device: str, quick: bool):
    """(millions of parameters, layers): each layer a square weight and its bias.

    200 tensors on CUDA, where a step's launch count matters; 20 on the CPU
    and 4 in quick runs: on two cores, compiling the twin's step took about
    5 s for 20 tensors, and a 200-tensor run had not finished its first
    case after 7 minutes.
    """
    if quick:
        return [(0.25, 2)]
    return [(10, 100), (100, 100), (500, 100)] if device == "cuda" else [(1, 10), (10, 10)]


def cases(device: str, dtype: torch.dtype, quick: bool):
    """Every optimizer at every size; providers: torchblocks, the twin as
    constructed by default, ``fused=True`` where the twin has it, and
    ``torch.compile`` of the twin's step.

    Example::

        >>> rows = harness.measure(next(cases("cuda", torch.bfloat16, quick=True)), "cuda", torch.bfloat16, peak=3000.0)
    """
    for name, (options, tensors_moved) in OPTIMIZERS.items():
        for millions, layers in sizes(device, quick):
            width = max(1, round((millions * 1e6 / layers) ** 0.5))

            def make_inputs(seed, provider, name=name, options=options, layers=layers, width=width):
                random = generator(device, seed)
                params = []
                for _ in range(layers):
                    for shape in ((width, width), (width,)):
                        param = torch.randn(shape, generator=random, device=device, dtype=dtype) / width**0.5
                        param.grad = torch.randn(shape, generator=random, device=device, dtype=dtype) / width
                        param.requires_grad_()
                        params.append(param)
                if provider == "torchblocks":
                    optimizer = getattr(torchblocks.optim, name)(params, **options)
                elif provider == "fused":
                    optimizer = getattr(torch.optim, name)(params, **options, fused=True)
                else:
                    optimizer = getattr(torch.optim, name)(params, **options)
                step = torch.compile(optimizer.step) if provider == "compiled" else optimizer.step
                return Stepper(params, step)

            providers = {"torchblocks": take_step, "native": take_step, "compiled": take_step}
            if name in HAS_FUSED:
                providers["fused"] = take_step
            elements = layers * (width * width + width)
            # rotate=False: a compiled step is specialised to its optimizer, so
            # each input set would compile anew; from 10M parameters up a step
            # moves far more bytes than any cache holds anyway.
            # the minimum, and ours: each element of every tensor read once and
            # written once (the launch tables are cached, a few bytes per tensor)
            moved = tensors_moved * elements * dtype.itemsize
            yield Case("optim", f"{name} {elements / 1e6:.3g}M", elements / 1e6, "M parameters", moved, "GB/s",
                       make_inputs, providers, variant=name, rotate=False, min_bytes=moved, our_bytes=moved)
