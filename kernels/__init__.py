"""Triton kernels of ppfast (fused split-backward for linear layers)."""
