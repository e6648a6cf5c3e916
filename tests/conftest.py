"""Fixtures shared by the test files."""

import os
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the checkout's root first on sys.path, where kernels/ (installed as
# ppfast.kernels) would stand for the PyPI package `kernels` that transformers looks for.
# Nothing imports from the root: ppfast is installed (editable) with its kernels.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: p ranks of tiny ops as threads on a couple of cores only add
    hand-offs with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
