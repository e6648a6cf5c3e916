"""Layers whose backward splits into an input-gradient half (I) and a deferred weight-gradient
half (W), which zero-bubble schedules move into the pipeline's idle time."""

from ..training.weight_store import WeightGradStore
from .convert import convert, register_linear
from .linear import Linear, SplitLayer

__all__ = ["Linear", "SplitLayer", "WeightGradStore", "convert", "register_linear"]
