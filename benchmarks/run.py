"""Run the benchmark suite and keep the results in this repository.

    python benchmarks/run.py [torchblocks bench options]

The same as ``torchblocks bench`` (every block unless --block says which),
except that without --out the CSVs, plots and summary.md go to
benchmarks/results/<device>/, the folder benchmarks/README.md reports from.
"""

import os
import sys

import torch

from torchblocks.cli.bench.harness import results_folder_name
from torchblocks.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_folder(argv) -> str:
    """benchmarks/results/<device name as a slug>, for the device the options choose."""
    device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return os.path.join(RESULTS, results_folder_name(device))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", device_folder(argv)]
    sys.exit(main(["bench", *argv]))
