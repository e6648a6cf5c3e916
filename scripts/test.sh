#!/usr/bin/env bash
# Builds ppfast and runs every check: lint, format, the C++ tests (ctest) and pytest.
#
#   bash scripts/test.sh
#
# Uses the virtual environment in $PPFAST_VENV, else the active one ($VIRTUAL_ENV), else
# ./.venv (created if missing), and installs what is missing into it; running it again
# installs nothing new and recompiles only what changed.
#   TORCH_SPEC      torch to install when none is there (default torch==2.13.0: the CPU
#                   wheel where one is on local disk; a bare `torch` can mean a CUDA build
#                   of several GB)
#   MAX_JOBS        parallel compile jobs for the extension and the C++ tests (default 2)
#   PYTEST_TIMEOUT  seconds one test may take before it is failed (default 300)
#   PYTEST_ARGS     extra pytest arguments, e.g. "-k validate"
set -euo pipefail

# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

step "ruff check"
ruff check .
step "ruff format --check"
ruff format --check .

step "C++ tests"
cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build build/cmake -j "$MAX_JOBS"
ctest --test-dir build/cmake --output-on-failure

step "pytest"
# shellcheck disable=SC2086
python -m pytest -q -x --timeout="${PYTEST_TIMEOUT:-300}" ${PYTEST_ARGS:-}

step "all checks passed"
