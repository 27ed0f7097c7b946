#!/usr/bin/env bash
# The whole test suite: set up, then one pytest run over the reference
# fallback and the Triton kernels (under TRITON_INTERPRET=1 when no GPU is
# present; tests/conftest.py sets it), and beside it a second run of the
# Triton tests (-m triton) under the GPU image's Triton, in its own virtual
# environment. Extra arguments go to both pytest runs.
#   COMPAT_TRITON   the second Triton (default triton==3.6.0, the GPU image's;
#                   its interpreter needs numpy < 2.4); "none" skips that run
#   COMPAT_VENV     where its virtual environment lives (default .venv-compat)
source "$(dirname "$0")/_setup.sh"
COMPAT_TRITON="${COMPAT_TRITON:-triton==3.6.0}"
COMPAT_VENV="${COMPAT_VENV:-.venv-compat}"

compat_status=0
if [ "$COMPAT_TRITON" != "none" ]; then
    [ -x "$COMPAT_VENV/bin/python" ] || python3 -m venv "$COMPAT_VENV"
    install_compat() {
        # shellcheck disable=SC2086
        "$COMPAT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${TORCH_SPEC:-torch>=2.4}
        "$COMPAT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$COMPAT_TRITON" \
            "numpy<2.4" pytest matplotlib
        "$COMPAT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
            --no-build-isolation -e .
    }
    install_once "$COMPAT_VENV" "${TORCH_SPEC:-torch>=2.4} $COMPAT_TRITON" install_compat
    compat_log="$(mktemp)"
    # triton 3.6's interpreter converts arrays to scalars the way numpy 2.3 deprecates; the
    # compiled eager CPU path is Triton's business nowhere, so this run does not build it; one
    # thread, so that its torch ops do not spin OpenMP threads against the main run's on the cores
    TORCHBLOCKS_EAGER_CPU=0 OMP_NUM_THREADS=1 "$COMPAT_VENV/bin/python" -m pytest tests -m triton \
        -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" "$@" > "$compat_log" 2>&1 &
    compat_pid=$!
fi

main_status=0
"$PYTHON" -m pytest tests "$@" || main_status=$?

if [ "$COMPAT_TRITON" != "none" ]; then
    wait "$compat_pid" || compat_status=$?
    echo "== the Triton tests under $("$COMPAT_VENV/bin/python" -c 'import triton; print("triton", triton.__version__)')"
    cat "$compat_log"
    rm -f "$compat_log"
fi
exit $(( main_status || compat_status ))
