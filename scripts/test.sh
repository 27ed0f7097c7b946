#!/usr/bin/env bash
# The whole test suite: set up, then one pytest run over the reference
# fallback and the Triton kernels (under TRITON_INTERPRET=1 when no GPU is
# present; tests/conftest.py sets it). Extra arguments go to pytest.
source "$(dirname "$0")/_setup.sh"
"$PYTHON" -m pytest tests "$@"
