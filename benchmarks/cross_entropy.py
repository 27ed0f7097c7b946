"""Softmax cross-entropy and the fused dense + cross-entropy head, forward +
backward, against native PyTorch and torch.compile of it, in the same run.

    python benchmarks/cross_entropy.py [--device cpu|cuda] [--dtype float32|bfloat16]
                                       [--max-classes 131072] [--head [--rows N] [--hidden K]] [--csv FILE]

Cross-entropy: N x C from 4096 x 1000 up to 8192 x --max-classes (mean
reduction, class-index targets), torchblocks with and without
inplace_backward. --head: the fused head against F.linear + F.cross_entropy
at N = --rows (8192), hidden --hidden (4096), C from 32k up to --max-classes. Time is the median
of a forward + backward pass; peak memory (CUDA only) is what one pass
allocates above its inputs.
"""

import argparse

import torch
import torch.nn.functional as F

import torchblocks
from _harness import environment, peak_memory_mb, print_header, report, time_ms


def loss_sizes(max_classes):
    yield 4096, 1000
    classes = 32768
    while classes <= max_classes:
        yield 8192, classes
        classes *= 2


def pass_of(loss_fn, make_input, target, grad_of):
    def step():
        loss_fn(make_input(), target).backward()
        for t in grad_of:
            t.grad = None

    return step


def row(case, providers, device, extra):
    times = {name: time_ms(fn, device) for name, fn in providers.items()}
    memory = {name: peak_memory_mb(fn, device) for name, fn in providers.items()}
    baseline = "torch"
    out = {"case": case, **extra}
    for name in providers:
        out[f"{name} ms"] = f"{times[name]:.3f}"
    for name in providers:
        if name != baseline:
            out[f"{name} speedup"] = f"{times[baseline] / times[name]:.2f}"
    for name in providers:
        out[f"{name} MB"] = "-" if memory[name] is None else f"{memory[name]:.0f}"
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-classes", type=int, default=131072)
    parser.add_argument("--head", action="store_true", help="benchmark the fused dense + cross-entropy head instead")
    parser.add_argument("--rows", type=int, default=8192, help="--head: rows N (default 8192)")
    parser.add_argument("--hidden", type=int, default=4096, help="--head: in_features (default 4096)")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    env = environment(device)
    print_header(env, dtype=args.dtype)
    compiled_loss = torch.compile(F.cross_entropy)
    rows = []
    if not args.head:
        for n, classes in loss_sizes(args.max_classes):
            logits = torch.randn(n, classes, device=device, dtype=dtype).requires_grad_()
            target = torch.randint(classes, (n,), device=device)
            torch.testing.assert_close(torchblocks.functional.softmax_cross_entropy(logits, target),
                                       F.cross_entropy(logits, target), atol=1e-2, rtol=1e-2)
            # the logits come out of an op (as in a model, and as inplace_backward
            # needs): the same scaling op for every provider, timed with each
            def make_logits():
                return logits * 1

            providers = {
                "torch": pass_of(F.cross_entropy, make_logits, target, [logits]),
                "compiled": pass_of(compiled_loss, make_logits, target, [logits]),
                "torchblocks": pass_of(torchblocks.functional.softmax_cross_entropy, make_logits, target, [logits]),
                "inplace": pass_of(lambda x, t: torchblocks.functional.softmax_cross_entropy(x, t, inplace_backward=True),
                                   make_logits, target, [logits]),
            }
            rows.append(row(f"{n}x{classes}", providers, device, {}))
    else:
        n, hidden = args.rows, args.hidden
        classes = 32768
        while classes <= args.max_classes:
            x = torch.randn(n, hidden, device=device, dtype=dtype).requires_grad_()
            weight = (torch.randn(classes, hidden, device=device, dtype=dtype) / hidden**0.5).requires_grad_()
            target = torch.randint(classes, (n,), device=device)

            def unfused(x, t):
                return F.cross_entropy(F.linear(x, weight), t)

            def fused(x, t):
                return torchblocks.functional.dense_cross_entropy(x, weight, t)

            torch.testing.assert_close(fused(x, target), unfused(x, target), atol=2e-2, rtol=2e-2)
            providers = {
                "torch": pass_of(unfused, lambda: x, target, [x, weight]),
                "compiled": pass_of(torch.compile(unfused), lambda: x, target, [x, weight]),
                "torchblocks": pass_of(fused, lambda: x, target, [x, weight]),
            }
            rows.append(row(f"{n}x{hidden}x{classes}", providers, device, {}))
            classes *= 2
    report(rows, env, args.csv)


if __name__ == "__main__":
    main()
