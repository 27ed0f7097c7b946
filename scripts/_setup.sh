# Sourced by scripts/main.sh and scripts/test.sh: make the virtual environment
# (once) and install torchblocks into it with its test extra, editable, so
# that later runs reinstall only when setup.py, this file, the constraints or
# TORCH_SPEC change.
#   TORCH_SPEC   the torch requirement to install first, pip options allowed
#                (default: torch>=2.11, which on Linux is a CUDA build of
#                several GB from PyPI); .ci/run pins "torch==2.13.0 triton==3.9.0",
#                the CPU build on the CI machines and its Triton.
#   CONSTRAINTS  the pip constraints file for everything else (default
#                tests/constraints.txt, the tested versions); "none": no pins.
#   UPGRADE      1: bring every package to the newest the index offers, once a
#                day (scripts/test.sh --newest).
#   VENV         where the virtual environment lives (default: .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch>=2.11}"
CONSTRAINTS="${CONSTRAINTS:-tests/constraints.txt}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PYTHON="$VENV/bin/python"
# --no-compile: no bytecode for the tens of thousands of modules of torch and transformers at install
# time (about 25 s for torch alone); Python compiles what is imported, once, when it is imported.
PIP=(-m pip install --disable-pip-version-check --progress-bar off --no-compile)
if [ "${UPGRADE:-0}" = 1 ]; then
    PIP+=(--upgrade --upgrade-strategy eager)
fi
CONSTRAINED=()
if [ "$CONSTRAINTS" != none ]; then
    CONSTRAINED=(-c "$CONSTRAINTS")
fi

# install_once VENV STAMP-KEY COMMAND...: run COMMAND unless VENV was set up with the same key.
install_once() {
    local venv="$1" key="$2"
    shift 2
    local stamp="$venv/.torchblocks-setup"
    key="$key $(cat setup.py "${BASH_SOURCE[0]}" "${CONSTRAINED[@]:1}" | sha256sum | cut -c1-16)"
    [ "${UPGRADE:-0}" != 1 ] || key="$key $(date -u +%F)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
        "$@"
        echo "$key" > "$stamp"
    fi
}

install_main() {
    echo "== setting up $VENV: $TORCH_SPEC, then torchblocks with its test extra (constraints: $CONSTRAINTS)"
    # unquoted: a spec may carry pip options, e.g. "torch --index-url https://download.pytorch.org/whl/cpu"
    # shellcheck disable=SC2086
    "$PYTHON" "${PIP[@]}" $TORCH_SPEC
    "$PYTHON" "${PIP[@]}" "${CONSTRAINED[@]}" -e ".[test]"
}
install_once "$VENV" "$TORCH_SPEC $CONSTRAINTS" install_main
