"""``ppfast demo``: a small GPT-style model trained pipelined on local ranks."""

from .launch import main

__all__ = ["main"]
