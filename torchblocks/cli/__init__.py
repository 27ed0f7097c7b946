"""The torchblocks command line (also python -m torchblocks)."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import traceback

DESCRIPTION = ("torchblocks: the building blocks of a neural network (dense layer, ReLU, softmax "
               "cross-entropy, optimizers), hand-written for PyTorch, checked and timed against native PyTorch.")


def _report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check(args) -> int:
    import torch

    from torchblocks import backend
    from torchblocks.cli import check

    if args.device == "cuda" and not torch.cuda.is_available():
        print("torchblocks check: --device cuda, but CUDA is not available here", file=sys.stderr)
        return 2
    only = args.block or None
    scope = "a representative set (--quick: float32 and float64, two option sets per optimizer)" if args.quick \
        else "every dtype and option set"
    if not args.quiet:
        _report(f"torchblocks check: {', '.join(only or check.names())}, {scope}")
    rows = check.run(args.device, args.backend, only, args.quick, None if args.quiet else _report)
    wants_interpreted = args.interpreter and args.device in ("all", "cpu") and args.backend in ("all", "triton")
    if wants_interpreted and not backend.INTERPRETER:
        # The interpreter must be chosen before triton defines any kernel:
        # run the Triton-on-CPU rows in a child process that starts with it.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rows.json")
            command = [sys.executable, "-m", "torchblocks", "check", "--device", "cpu", "--backend", "triton",
                       "--json", path, *(["--block", *only] if only else []), *(["--quick"] if args.quick else []),
                       *(["--quiet"] if args.quiet else ["--progress-only"])]
            child = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"})
            if not os.path.exists(path):
                print(f"torchblocks check: the interpreter run failed (exit status {child.returncode})", file=sys.stderr)
                return 1
            with open(path) as f:
                rows += [check.Row(**row) for row in json.load(f)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(row) for row in rows], f)
    if not rows:
        print(f"torchblocks check: nothing to check on device {args.device} with backend {args.backend} here",
              file=sys.stderr)
        return 2
    failed = [row for row in rows if row.status == "FAIL"]
    if not (args.quiet or args.progress_only):
        print(check.format_table(rows))
        print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed, {len(failed)} failed")
    return 1 if failed else 0


def _add_device_option(parser, what: str) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help=f"where to {what} (default: cuda when present, else cpu)")


def _resolve_device(command: str, choice: str):
    """``--device``'s device: "auto" is cuda when present, else cpu; None (after saying why) for an absent cuda."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        print(f"torchblocks {command}: --device cuda, but CUDA is not available here", file=sys.stderr)
        return None
    return choice


def _mnist(args) -> int:
    from torchblocks.cli import book

    device = _resolve_device("mnist", args.device)
    return 2 if device is None else book.main(args, device)


def _bench(args) -> int:
    import torch

    from torchblocks.cli import bench

    device = _resolve_device("bench", args.device)
    if device is None:
        return 2
    dtypes = args.dtype or (["float32", "bfloat16"] if device == "cuda" else ["float32"])
    blocks = list(bench.BLOCKS) if args.block == "all" else [args.block]
    rows = bench.run(blocks, device, [getattr(torch, name) for name in dtypes], args.quick, args.out)
    mismatched = sorted({f"{row.block} {row.case} {row.dtype} {row.provider}" for row in rows if not row.matched})
    if mismatched:
        print("\ntorchblocks bench: outputs that did not match the native twin: " + "; ".join(mismatched),
              file=sys.stderr)
        return 1
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    """Entry point of the ``torchblocks`` command; returns the exit status."""
    from torchblocks import __version__
    from torchblocks.cli import check as checks
    from torchblocks.cli.bench import BLOCKS as BENCH_BLOCKS

    parser = argparse.ArgumentParser(prog="torchblocks", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"torchblocks {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: TORCHBLOCKS_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="gradcheck and parity of every block and optimizer against native PyTorch",
        description="Check every block (parity of outputs and gradients with native PyTorch per dtype, then "
        "gradcheck and gradgradcheck in float64) and every optimizer (parameters after 30 steps, or the update "
        "of one step in 16 bits) against its native twin, on every device and backend present; print a table "
        "and exit 1 on any failure, 2 when nothing could be checked.")
    check.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                       help="devices to check on (default: all present)")
    check.add_argument("--backend", choices=("all", "reference", "triton"), default="all",
                       help="backends to check (default: all present)")
    check.add_argument("--block", nargs="+", choices=checks.names(), metavar="NAME",
                       help="only these blocks or optimizers (default: all): " + ", ".join(checks.names()))
    check.add_argument("--quick", action="store_true",
                       help="a representative set: float32 and float64, two option sets per optimizer")
    check.add_argument("--interpreter", action="store_true",
                       help="also run the Triton kernels on the CPU under the Triton interpreter (slow, small shapes)")
    check.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    check.add_argument("--quiet", action="store_true", help="print nothing; the exit status still tells")
    check.add_argument("--progress-only", action="store_true", help=argparse.SUPPRESS)
    check.set_defaults(run=_check)
    mnist = commands.add_parser("mnist", help="train the book's first network with torchblocks and native PyTorch",
                                description="Train Dense(512, relu) -> Dense(10) with softmax cross-entropy and "
                                "RMSprop (Keras 2's settings) on MNIST, with torchblocks and with native PyTorch "
                                "from the same weights on the same batches, and compare. Without MNIST on disk or "
                                "a network to download it, an embedded 8x8 digits set stands in (and says so), "
                                "unless --data-dir named where MNIST must be.")
    mnist.add_argument("--epochs", type=_positive_int, default=5, help="passes over the training set (default 5)")
    mnist.add_argument("--batch-size", type=_positive_int, default=128, help="images per step (default 128)")
    _add_device_option(mnist, "train")
    mnist.add_argument("--data-dir", metavar="DIR",
                       help="where MNIST is, or is downloaded to; it must hold MNIST or receive it (default: "
                       "$TORCHBLOCKS_DATA_DIR, else ~/.cache/torchblocks/mnist, where the embedded digits may stand "
                       "in); mnist.npz or the four IDX files, raw or .gz")
    mnist.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                       help="download MNIST when it is missing (default: on)")
    mnist.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batch order (default 0)")
    mnist.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                       help="also train the same network in native PyTorch (default: on)")
    mnist.add_argument("--limit", type=_positive_int, metavar="N", help="train on the first N training images only")
    mnist.add_argument("--plot", metavar="FILE", help="write a PNG of loss and accuracy per epoch to FILE")
    mnist.set_defaults(run=_mnist)
    bench = commands.add_parser("bench", help="time every block against its native twin and torch.compile of it",
                                description="Benchmark torchblocks' blocks and optimizers against native PyTorch and "
                                "torch.compile of it, in one process: a table per block on stdout and, with --out, "
                                "CSV, PNG plots and summary.md. Every timed output is first checked against the "
                                "twin's; the exit status is 1 if any did not match.")
    bench.add_argument("--block", choices=("all", *BENCH_BLOCKS), default="all", help="which block (default: all)")
    _add_device_option(bench, "run")
    bench.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16"),
                       help="dtypes to run (default: float32 and bfloat16 on CUDA, float32 on the CPU)")
    bench.add_argument("--quick", action="store_true",
                       help="small cases and short timing: a smoke run (under a minute on a 2-core CPU)")
    bench.add_argument("--out", metavar="DIR", help="write <block>.csv, <block>.png and summary.md to DIR")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    from torchblocks.cli.data import DataFileError, DownloadError, MissingDataError

    try:
        return args.run(args)
    except (DataFileError, DownloadError, MissingDataError) as error:
        if args.debug or os.environ.get("TORCHBLOCKS_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"torchblocks {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
