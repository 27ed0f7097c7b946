# Sourced by scripts/main.sh and scripts/test.sh: make the virtual environment
# (once) and install torchblocks into it with its test extra.
#   TORCH_SPEC   the torch requirement to install first (default: torch>=2.4);
#                .ci/run pins torch==2.13.0, the CPU build on the CI machines.
#   VENV         where the virtual environment lives (default: .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PYTHON="$VENV/bin/python"
"$PYTHON" -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch>=2.4}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
