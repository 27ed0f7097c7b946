"""ReLU forward + backward: torchblocks against torch.relu in the same run.

    python benchmarks/relu.py [--device cpu|cuda] [--max-mb 1024] [--csv FILE]

For each tensor size (float32, 1 MB to 1 GB): the median time of one forward
and backward pass, the achieved GB/s from the bytes the pass must move
(forward reads x and writes y; backward reads dy and y and writes dx: 5
tensors), and that as a fraction of the measured copy bandwidth.
"""

import argparse

import torch

import torchblocks
from _harness import copy_bandwidth_gbs, environment, print_header, report, time_ms

TENSORS_MOVED = 5  # x, y forward; dy, y, dx backward


def forward_backward(relu, x, grad_output):
    def step():
        x.grad = None
        relu(x).backward(grad_output)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-mb", type=int, default=1024, help="largest tensor, in MB (default 1024)")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    args = parser.parse_args()

    env = environment(args.device)
    print_header(env)
    rows = []
    megabytes = 1
    while megabytes <= args.max_mb:
        n_elements = megabytes * 2**20 // 4
        x = torch.randn(n_elements, device=args.device).requires_grad_()
        grad_output = torch.randn(n_elements, device=args.device)
        nbytes = TENSORS_MOVED * n_elements * 4
        peak = copy_bandwidth_gbs(n_elements * 4, args.device)
        native_ms = time_ms(forward_backward(torch.relu, x, grad_output), args.device)
        ours_ms = time_ms(forward_backward(torchblocks.functional.relu, x, grad_output), args.device)
        rows.append({
            "MB": megabytes,
            "torch ms": f"{native_ms:.3f}",
            "torchblocks ms": f"{ours_ms:.3f}",
            "speedup": f"{native_ms / ours_ms:.2f}",
            "torchblocks GB/s": f"{nbytes / ours_ms / 1e6:.1f}",
            "torch GB/s": f"{nbytes / native_ms / 1e6:.1f}",
            "copy GB/s": f"{peak:.1f}",
            "of copy": f"{nbytes / ours_ms / 1e6 / peak:.0%}",
        })
        del x, grad_output
        megabytes *= 4
    report(rows, env, args.csv)


if __name__ == "__main__":
    main()
