"""Layers whose backward splits into an input-gradient half (I) and a deferred weight-gradient
half (W), which zero-bubble schedules move into the pipeline's idle time."""

from .linear import Linear, convert
from .weight_grad_store import WeightGradStore

__all__ = ["Linear", "WeightGradStore", "convert"]
