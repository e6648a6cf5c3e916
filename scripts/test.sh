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

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}
# ruff is pinned because its lint rules and formatting change between releases.
DEPS=(setuptools wheel ninja numpy pytest pytest-timeout "ruff==0.17.6" matplotlib pybind11
      cmake)

step() { printf '\n==> %s (%ds)\n' "$*" "$SECONDS"; }

VENV=${PPFAST_VENV:-${VIRTUAL_ENV:-$ROOT/.venv}}
if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PIP=(python -m pip --disable-pip-version-check)

step "dependencies"
if ! python -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" install -q "$TORCH_SPEC"
fi
# pip leaves what is already installed and satisfies a requirement alone.
"${PIP[@]}" install -q "${DEPS[@]}"
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

step "building ppfast._C (MAX_JOBS=$MAX_JOBS)"
# Without build isolation the extension is built against the torch installed here, the one
# it will be imported with. pip compiles an editable install in a fresh temporary folder each
# time (a minute and a half on 2 cores), so once installed, build_ext --inplace reuses
# build/temp.* and ninja rebuilds only what changed; --force because setuptools does not see
# header changes and ninja does. A new torch, interpreter or build configuration reinstalls.
stamp=build/editable-install.key
key=$( (python -c 'import sys, torch; print(sys.executable, torch.__version__)'
        cat setup.py pyproject.toml csrc/SOURCES) | sha1sum)
# The installed ppfast must be this checkout's, or build_ext would build what is not tested.
installed_here() {
  python -c 'import os, sys, ppfast; sys.exit(os.path.dirname(ppfast.__file__) != sys.argv[1])' \
    "$ROOT/python/ppfast" 2>/dev/null
}
if [[ -f "$stamp" && "$(<"$stamp")" == "$key" ]] && installed_here; then
  python setup.py -q build_ext --inplace --force
else
  "${PIP[@]}" install -q --no-build-isolation --no-deps -e .
  mkdir -p build && echo "$key" >"$stamp"
fi

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
