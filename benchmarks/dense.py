"""Dense forward and forward+backward: torchblocks against F.linear (+ F.relu)
and torch.compile of it, in the same run.

    python benchmarks/dense.py [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                               [--max-size 8192] [--csv FILE]

Shapes (M x N x K, y = x @ W^T with x (M, K), W (N, K)): square sizes from 512
up to --max-size, and the book's MNIST layers 128 x 512 x 784 and 128 x 10 x
512; each with the ReLU fused (torchblocks) or applied after (native).
TFLOP/s counts 2*M*N*K per GEMM: one forward, three forward+backward.
"""

import argparse

import torch
import torch.nn.functional as F

import torchblocks
from _harness import environment, print_header, report, time_ms


def native_dense(x, w, b):
    return F.relu(F.linear(x, w, b))


def ours_dense(x, w, b):
    return torchblocks.functional.dense(x, w, b, activation="relu")


def shapes(max_size):
    size = 512
    while size <= max_size:
        yield size, size, size
        size *= 2
    yield 128, 512, 784
    yield 128, 10, 512


def forward_backward(fn, x, w, b, grad_output):
    def step():
        w.grad = b.grad = None
        fn(x, w, b).backward(grad_output)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-size", type=int, default=8192, help="largest square size (default 8192)")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    env = environment(args.device)
    print_header(env, dtype=args.dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
    compiled_dense = torch.compile(native_dense)
    providers = {"torchblocks": ours_dense, "torch": native_dense, "compiled": compiled_dense}
    rows = []
    for M, N, K in shapes(args.max_size):
        x = torch.randn(M, K, device=args.device, dtype=dtype)
        w = (torch.randn(N, K, device=args.device, dtype=dtype) / K**0.5).requires_grad_()
        b = torch.randn(N, device=args.device, dtype=dtype).requires_grad_()
        grad_output = torch.randn(M, N, device=args.device, dtype=dtype)
        torch.testing.assert_close(ours_dense(x, w, b), native_dense(x, w, b), atol=1e-2, rtol=1e-2)
        for mode, gemms in (("forward", 1), ("fwd+bwd", 3)):
            times = {}
            for name, fn in providers.items():
                if mode == "forward":
                    times[name] = time_ms(lambda fn=fn: fn(x, w, b), args.device)
                else:
                    times[name] = time_ms(forward_backward(fn, x, w, b, grad_output), args.device)
            flops = gemms * 2 * M * N * K
            rows.append({
                "M x N x K": f"{M}x{N}x{K}", "mode": mode,
                **{f"{name} ms": f"{t:.3f}" for name, t in times.items()},
                "vs torch": f"{times['torch'] / times['torchblocks']:.2f}",
                "vs compiled": f"{times['compiled'] / times['torchblocks']:.2f}",
                "torchblocks TFLOP/s": f"{flops / times['torchblocks'] / 1e9:.2f}",
                "torch TFLOP/s": f"{flops / times['torch'] / 1e9:.2f}",
            })
    report(rows, env, args.csv)


if __name__ == "__main__":
    main()
