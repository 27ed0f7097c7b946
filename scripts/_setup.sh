# Sourced by scripts/main.sh and scripts/test.sh: make the virtual environment
# (once) and install torchblocks into it with its test extra, editable, so
# that later runs reinstall only when setup.py, this file or TORCH_SPEC change.
#   TORCH_SPEC   the torch requirement to install first, pip options allowed
#                (default: torch>=2.4, which on Linux is a CUDA build of
#                several GB from PyPI); .ci/run pins torch==2.13.0, the CPU
#                build on the CI machines.
#   VENV         where the virtual environment lives (default: .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PYTHON="$VENV/bin/python"

# install_once VENV STAMP-KEY COMMAND...: run COMMAND unless VENV was set up with the same key.
install_once() {
    local venv="$1" key="$2"
    shift 2
    local stamp="$venv/.torchblocks-setup"
    key="$key $(cat setup.py "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
        "$@"
        echo "$key" > "$stamp"
    fi
}

install_main() {
    echo "== setting up $VENV: ${TORCH_SPEC:-torch>=2.4}, then torchblocks with its test extra"
    # unquoted: a spec may carry pip options, e.g. "torch --index-url https://download.pytorch.org/whl/cpu"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --disable-pip-version-check --progress-bar off ${TORCH_SPEC:-torch>=2.4}
    "$PYTHON" -m pip install --disable-pip-version-check --progress-bar off -e ".[test]"
}
install_once "$VENV" "${TORCH_SPEC:-torch>=2.4}" install_main
