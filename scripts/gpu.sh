#!/usr/bin/env bash
# All the GPU work, on a machine where torch (with CUDA) and triton are
# already installed and nothing can be downloaded. Each stage finishes well
# inside 10 minutes, so that each can be one call to a lent machine:
#
#   bash scripts/gpu.sh [--out DIR] STAGE [STAGE ...]
#
#   test          the CUDA tests (pytest -m cuda): the Triton kernels and the
#                 reference on the GPU; and the compiled eager CPU path's
#                 tests (-m eager_cpu), built against this machine's torch
#   check         torchblocks check on the GPU (gradcheck, parity, optimizers)
#   bench [BLOCK ...]
#                 the benchmark suite: every block, or the ones named
#                 (relu dense cross_entropy dense_cross_entropy optim training_step patched)
#   all           test, check, then bench
#   install       only install torchblocks (below) and show what was imported
#   where         print the results folder for this GPU and stop
#
# torchblocks is installed for the run only, into a temporary folder, with
# pip --no-deps --no-build-isolation (no virtual environment, no download):
# the installed torch and triton are the ones tested. Results go to
# benchmarks/results/<gpu-name>/ (environment.md, test.txt, check.txt and
# check.json, and per block <block>.csv, <block>.png, <block>.md). Each stage
# writes into a temporary folder and moves its files into place when it has
# finished, so an interrupted stage leaves nothing half-written. With --out
# DIR (or $GPU_OUT) every result is copied there too.
#   PYTHON     the Python that has torch and triton (default: python3)
#   GPU_NAME   names the results folder instead of the GPU's own name
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="${GPU_OUT:-}"
BLOCKS=(relu dense cross_entropy dense_cross_entropy optim training_step patched)

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

fail() {
    echo "gpu.sh: $*" >&2
    exit 2
}

absolute() {  # a path that still holds after the script changes directory
    case "$1" in /*|"") echo "$1" ;; */*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;; *) echo "$1" ;; esac
}

stages=()
bench_blocks=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        test|check|all|install|where) stages+=("$1"); shift ;;
        bench)
            stages+=("bench"); shift
            while [ $# -gt 0 ] && [[ " ${BLOCKS[*]} " == *" $1 "* ]]; do bench_blocks+=("$1"); shift; done
            ;;
        *) fail "unknown stage or option '$1' (stages: test check bench all install where; see --help)" ;;
    esac
done
[ ${#stages[@]} -gt 0 ] || fail "name a stage: test, check, bench, all, install or where (see --help)"
PYTHON="$(absolute "$PYTHON")"
[ -z "$OUT" ] || { mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"; }
[ ${#bench_blocks[@]} -gt 0 ] || bench_blocks=("${BLOCKS[@]}")

work="$(mktemp -d "${TMPDIR:-/tmp}/torchblocks-gpu.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The results folder: benchmarks/results/<GPU name as a slug>.
folder_name() {
    if [ -n "${GPU_NAME:-}" ]; then
        echo "$GPU_NAME" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//'
    else
        "$PYTHON" -c 'from torchblocks.cli.bench.harness import results_folder_name; print(results_folder_name("cuda"))'
    fi
}

# torchblocks into $work/site, nothing else: no dependency, no build isolation,
# no index. A Python without setuptools cannot build it: its two source
# folders are then copied in place, as the wheel lays them out.
install() {
    echo "== installing torchblocks into $work/site (no dependencies, no download)"
    if ! PIP_NO_INDEX=1 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
            --no-build-isolation --target "$work/site" "$ROOT" 2>"$work/pip.log"; then
        echo "   pip could not build it ($(tail -n 1 "$work/pip.log")): copying the sources instead"
        mkdir -p "$work/site"
        cp -r "$ROOT/torchblocks" "$work/site/torchblocks"
        cp -r "$ROOT/kernels" "$work/site/torchblocks/kernels"
    fi
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    cd "$work"  # so that the checkout's torchblocks/ never shadows the installed package
    "$PYTHON" -c 'import torch, torchblocks, torchblocks.kernels, triton
print(f"   torchblocks {torchblocks.__version__} from {torchblocks.__file__}")
print(f"   torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")' ||
        fail "torchblocks does not import with this Python ($PYTHON): torch and triton must be installed"
}

require_gpu() {
    "$PYTHON" - <<'PY' || fail "these stages need a CUDA GPU and triton: torch.cuda.is_available() is False here (nothing was run or written)"
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY
}

environment() {
    "$PYTHON" - "$ROOT" <<'PY'
import subprocess, sys
from torchblocks.cli.bench.harness import environment
info = environment("cuda")
commit = subprocess.run(["git", "-C", sys.argv[1], "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
info["commit"] = commit.stdout.strip() or "-"
print("| " + " | ".join(info) + " |")
print("|" + "---|" * len(info))
print("| " + " | ".join(info.values()) + " |")
PY
}

# Run "$@" with its files in a staging folder; on completion move them into
# the results folder (and --out), then return the command's status.
stage() {
    local name="$1"; shift
    local staging="$work/stage-$name"
    mkdir -p "$staging"
    cp "$work/environment.md" "$staging/"
    echo "== $name: $*"
    local status=0
    STAGING="$staging" "$@" || status=$?
    mkdir -p "$results"
    cp -r "$staging"/. "$results"/
    [ -z "$OUT" ] || { mkdir -p "$OUT"; cp -r "$staging"/. "$OUT"/; }
    echo "== $name: exit status $status; results in $results${OUT:+ and $OUT}"
    return $status
}

run_test() {
    "$PYTHON" -c 'import pytest' 2>/dev/null ||
        { echo "the test stage needs pytest, which this Python ($PYTHON) lacks" | tee "$STAGING/test.txt"; return 2; }
    "$PYTHON" -m pytest "$ROOT/tests" -m "cuda or eager_cpu" -q -p no:cacheprovider 2>&1 | tee "$STAGING/test.txt"
    return "${PIPESTATUS[0]}"
}

run_check() {
    "$PYTHON" -m torchblocks check --device cuda --json "$STAGING/check.json" 2>&1 | tee "$STAGING/check.txt"
    return "${PIPESTATUS[0]}"
}

run_bench() {
    local status=0 block
    for block in "${bench_blocks[@]}"; do
        echo "-- bench $block"
        "$PYTHON" -m torchblocks bench --device cuda --block "$block" --out "$work/bench-$block" || status=$?
        [ ! -f "$work/bench-$block/summary.md" ] || mv "$work/bench-$block/summary.md" "$STAGING/$block.md"
        cp -r "$work/bench-$block"/. "$STAGING"/
    done
    return $status
}

if [ "${stages[*]}" = "where" ]; then
    [ -n "${GPU_NAME:-}" ] || { install >/dev/null; require_gpu; }
    echo "$ROOT/benchmarks/results/$(folder_name)"
    exit 0
fi

install
[ "${stages[*]}" != "install" ] || exit 0
require_gpu
results="$ROOT/benchmarks/results/$(folder_name)"
environment > "$work/environment.md"
echo "== $(sed -n 3p "$work/environment.md")"
status=0
for name in "${stages[@]}"; do
    case "$name" in
        where) echo "$results" ;;
        install) ;;
        test) stage test run_test || status=1 ;;
        check) stage check run_check || status=1 ;;
        bench) stage bench run_bench || status=1 ;;
        all)
            stage test run_test || status=1
            stage check run_check || status=1
            stage bench run_bench || status=1
            ;;
    esac
done
exit $status
