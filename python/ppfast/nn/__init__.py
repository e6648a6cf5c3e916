"""Layers whose backward splits into an input-gradient half (I) and a deferred weight-gradient
half (W), which zero-bubble schedules move into the pipeline's idle time."""

from ..training.weight_store import WeightGradStore
from .linear import Linear, convert

__all__ = ["Linear", "WeightGradStore", "convert"]
