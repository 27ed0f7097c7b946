#!/usr/bin/env bash
# The whole test suite: set up, then one pytest run over the reference
# fallback and the Triton kernels (under TRITON_INTERPRET=1 when no GPU is
# present; tests/conftest.py sets it), and beside it a second run of the
# Triton tests (-m triton) under the GPU image's Triton, in its own virtual
# environment. Extra arguments go to both pytest runs.
#
#   bash scripts/test.sh [--newest | --oldest] [PYTEST ARGS ...]
#
#   (default)  the tested versions: tests/constraints.txt, TORCH_SPEC
#   --newest   the newest torch, triton and transformers the index offers (and
#              the newest of everything else), in .venv-newest, upgraded once a
#              day; no compat run. Several GB: not part of .ci/run.
#   --oldest   setup.py's lower bounds of torch and transformers, with the
#              compat run's Triton and numpy, in .venv-oldest; no compat run.
#
#   COMPAT_TRITON   the second Triton (default: the "#compat" pins of
#                   tests/constraints.txt, the GPU image's triton 3.6.0, whose
#                   interpreter needs numpy < 2.4); "none" skips that run
#   COMPAT_VENV     where its virtual environment lives (default .venv-compat)
#   TEST_WORKERS    pytest-xdist workers of the main run (default auto: one per core)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PINS="$ROOT/tests/constraints.txt"
compat_pins() { sed -n 's/^#compat //p' "$PINS"; }
lower_bound() { sed -n "s/.*\"$1>=\([0-9.]*\).*/\1/p" "$ROOT/setup.py" | head -n 1; }

mode="${1:-}"
case "$mode" in
    --newest)
        shift
        export VENV=.venv-newest TORCH_SPEC="torch triton" CONSTRAINTS=none UPGRADE=1 COMPAT_TRITON=none
        ;;
    --oldest)
        shift
        mkdir -p "$ROOT/.venv-oldest"
        oldest="$ROOT/.venv-oldest/constraints.txt"
        { echo "transformers==$(lower_bound transformers)"; compat_pins | grep -v '^triton=='; } > "$oldest"
        export VENV=.venv-oldest CONSTRAINTS="$oldest" COMPAT_TRITON=none
        export TORCH_SPEC="torch==$(lower_bound torch) $(compat_pins | grep '^triton==')"
        ;;
esac
source "$ROOT/scripts/_setup.sh"
COMPAT_TRITON="${COMPAT_TRITON:-$(compat_pins | grep '^triton==')}"
COMPAT_VENV="${COMPAT_VENV:-.venv-compat}"

compat_status=0
if [ "$COMPAT_TRITON" != "none" ]; then
    [ -x "$COMPAT_VENV/bin/python" ] || python3 -m venv "$COMPAT_VENV"
    compat_constraints="$COMPAT_VENV/constraints.txt"
    # the main pins, but for the packages the compat run pins itself
    compat_names="$(compat_pins | sed 's/==.*//' | paste -sd'|')"
    { grep -v -i -E "^($compat_names)==" "$PINS"; compat_pins | grep -v '^triton=='; } > "$compat_constraints"
    install_compat() {
        # shellcheck disable=SC2086
        "$COMPAT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile $TORCH_SPEC
        "$COMPAT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile -c "$compat_constraints" \
            "$COMPAT_TRITON" numpy pytest matplotlib
        "$COMPAT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile --no-deps \
            --no-build-isolation -e .
    }
    install_once "$COMPAT_VENV" "$TORCH_SPEC $COMPAT_TRITON" install_compat
    compat_log="$(mktemp)"
    # triton 3.6's interpreter converts arrays to scalars the way numpy 2.3 deprecates; the
    # compiled eager CPU path is Triton's business nowhere, so this run does not build it; one
    # thread, so that its torch ops do not spin OpenMP threads against the main run's on the cores.
    # It runs what the Triton version decides: every kernel, dtype and option, the offline compile
    # for sm_90 and sm_80, the interpreter's bfloat16. What the host decides alone (the contract
    # matrices of transforms, autograd's transforms, training loops, learning-rate schedulers,
    # state dicts) the main run covers once.
    TORCHBLOCKS_EAGER_CPU=0 OMP_NUM_THREADS=1 "$COMPAT_VENV/bin/python" -m pytest tests -m triton \
        --ignore=tests/test_contract.py --ignore=tests/test_contract_optim.py --ignore=tests/test_autograd.py \
        --ignore=tests/cli/test_book.py --ignore=tests/cli/test_step.py -k "not lr_scheduler and not state_dict" \
        -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" "$@" > "$compat_log" 2>&1 &
    compat_pid=$!
fi

main_status=0
# pytest-xdist: TEST_WORKERS processes (default: one per core), whole files to each
"$PYTHON" -m pytest tests -n "${TEST_WORKERS:-auto}" --dist loadfile "$@" || main_status=$?

if [ "$COMPAT_TRITON" != "none" ]; then
    wait "$compat_pid" || compat_status=$?
    echo "== the Triton tests under $("$COMPAT_VENV/bin/python" -c 'import triton; print("triton", triton.__version__)')"
    cat "$compat_log"
    rm -f "$compat_log"
fi
"$PYTHON" - <<'PY'
import importlib.metadata, sys


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


names = ("torch", "triton", "transformers", "kernels", "numpy")
print(f"== tested with Python {sys.version.split()[0]}: " + ", ".join(f"{name} {version(name)}" for name in names))
PY
exit $(( main_status || compat_status ))
