#!/usr/bin/env bash
# The main job: set up, then check every block against native PyTorch
# (the Triton kernels too: on the GPU if there is one, else under the
# Triton interpreter on the CPU).
source "$(dirname "$0")/_setup.sh"
"$VENV/bin/torchblocks" check --interpreter
