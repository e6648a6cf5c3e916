#!/usr/bin/env bash
# Sourced by test.sh and demo.sh: a virtual environment with torch and the other dependencies,
# and ppfast with its native module built in place. Running it again installs nothing new and
# rebuilds only what changed.
#   PPFAST_VENV  the virtual environment (default: the active one, else ./.venv)
#   TORCH_SPEC   torch to install when none is there (default torch==2.13.0: the CPU wheel
#                where one is on local disk; a bare `torch` can mean a CUDA build of several GB)
#   MAX_JOBS     parallel compile jobs (default 2)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}
# ruff is pinned because its lint rules and formatting change between releases.
# transformers is optional for ppfast; the tests build Hugging Face models from configs with it.
DEPS=(setuptools wheel ninja numpy pytest pytest-timeout "ruff==0.17.6" matplotlib pybind11
      cmake "triton>=3.6" "transformers>=5")

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

