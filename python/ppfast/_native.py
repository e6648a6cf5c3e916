"""Loads the native module ppfast._C, or says how to build it."""

import importlib

import torch  # noqa: F401  (loads libc10/libtorch that _C links against)

try:
    C = importlib.import_module("ppfast._C")
except ImportError as e:  # pragma: no cover - exercised by the install check in tests
    raise ImportError(
        "ppfast's native module ppfast._C is not built. From the ppfast source folder run\n"
        "    pip install --no-build-isolation -e .\n"
        "(this needs torch's headers, ninja and a C++20 compiler; no CUDA toolkit: one build "
        f"serves CPU and CUDA). Import error was: {e}"
    ) from e
