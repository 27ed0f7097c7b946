#!/usr/bin/env bash
# The main job: set up, check every block against native PyTorch on a
# representative set (the Triton kernels too: on the GPU if there is one, else
# under the Triton interpreter on the CPU), then train the book's first network with
# torchblocks and with native PyTorch and print both accuracies. MNIST is
# read from (or downloaded to) ~/.cache/torchblocks/mnist; with neither
# files nor a network, the embedded 8x8 digits stand in, and it says so.
# Extra arguments go to `torchblocks mnist` (e.g. --data-dir DIR --plot mnist.png).
source "$(dirname "$0")/_setup.sh"
# A representative check (float32 and float64, two option sets per optimizer);
# the test suite holds the full proof. Progress goes to stderr line by line.
"$VENV/bin/torchblocks" check --quick --interpreter
"$VENV/bin/torchblocks" mnist "$@"
