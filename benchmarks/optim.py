"""One optimizer step: torchblocks against torch.optim's foreach and fused paths, in the same run.

    python benchmarks/optim.py [--device cpu|cuda] [--millions 10 100 500] [--dtypes float32 bfloat16]
                               [--optimizers SGD RMSprop Adam AdamW] [--csv FILE]

The model is 200 parameter tensors (100 square weights and their biases)
holding about the given number of parameters, each with a random gradient.
For each optimizer and dtype: the median time of one ``step()``, the GB/s
achieved from the bytes the step must move (every parameter, gradient and
state tensor read once, and every parameter and state tensor written once),
and that as a fraction of the measured copy bandwidth. The twin runs with
``foreach=True`` and, where it has one, ``fused=True``; ``torch default`` is
the twin as constructed with no flags (single-tensor loops on the CPU).
"""

import argparse

import torch

import torchblocks.optim
from _harness import copy_bandwidth_gbs, environment, print_header, report, time_ms

LAYERS = 100  # two tensors each: 200 parameter tensors

# name -> (constructor options, tensors each step reads + writes)
OPTIMIZERS = {
    "SGD": (dict(lr=1e-3, momentum=0.9), 5),  # reads p, g, buffer; writes p, buffer
    "RMSprop": (dict(lr=1e-3), 5),  # reads p, g, square_avg; writes p, square_avg
    "Adam": (dict(lr=1e-3), 7),  # reads p, g, exp_avg, exp_avg_sq; writes p, exp_avg, exp_avg_sq
    "AdamW": (dict(lr=1e-3), 7),
}
HAS_FUSED = {"SGD", "Adam", "AdamW"}


def make_parameters(millions: float, dtype, device):
    """200 tensors, about ``millions`` x 1e6 elements, with random gradients."""
    width = max(1, round((millions * 1e6 / LAYERS) ** 0.5))
    params = []
    for _ in range(LAYERS):
        for shape in ((width, width), (width,)):
            param = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype) / width**0.5)
            param.grad = torch.randn_like(param) / width
            params.append(param)
    return params


def providers(name: str, options: dict):
    """(label, factory) for every implementation timed."""
    native = getattr(torch.optim, name)
    found = [
        ("torchblocks", lambda params: getattr(torchblocks.optim, name)(params, **options)),
        ("torch default", lambda params: native(params, **options)),
        ("torch foreach", lambda params: native(params, **options, foreach=True)),
    ]
    if name in HAS_FUSED:
        found.append(("torch fused", lambda params: native(params, **options, fused=True)))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--millions", type=float, nargs="+", help="model sizes in millions of parameters "
                        "(default: 10 100 500 on CUDA, 1 10 on the CPU)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--csv", help="write the rows to this CSV file")
    args = parser.parse_args()
    sizes = args.millions or ([10, 100, 500] if args.device == "cuda" else [1, 10])

    env = environment(args.device)
    print_header(env, tensors=2 * LAYERS)
    peak = copy_bandwidth_gbs(256 * 2**20, args.device)
    rows = []
    for millions in sizes:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for name in args.optimizers:
                options, tensors_moved = OPTIMIZERS[name]
                timings = {}
                for label, make in providers(name, options):
                    params = make_parameters(millions, dtype, args.device)
                    optimizer = make(params)
                    timings[label] = time_ms(optimizer.step, args.device)
                    elements = sum(p.numel() for p in params)
                    del params, optimizer
                nbytes = tensors_moved * elements * dtype.itemsize
                ours = timings["torchblocks"]
                row = {"params (M)": f"{elements / 1e6:.0f}", "dtype": dtype_name, "optimizer": name,
                       "torchblocks ms": f"{ours:.3f}"}
                for label, ms in timings.items():
                    if label != "torchblocks":
                        row[f"vs {label}"] = f"{ms / ours:.2f}x"
                row.setdefault("vs torch fused", "-")
                row["GB/s"] = f"{nbytes / ours / 1e6:.1f}"
                row["of copy"] = f"{nbytes / ours / 1e6 / peak:.0%}"
                rows.append(row)
    print(f"\ncopy bandwidth: {peak:.1f} GB/s; 'vs X' is X's time over torchblocks' (above 1: torchblocks faster)")
    report(rows, env, args.csv)


if __name__ == "__main__":
    main()
