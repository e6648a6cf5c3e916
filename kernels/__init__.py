"""Triton kernels of ppfast (fused split-backward for linear layers).

One kernel per module, each with its host wrapper and a PyTorch reference beside it:

    from ppfast.kernels.weight_grad import weight_grad   # W: dW += dYᵀX, db += Σ dY (fp32)
    from ppfast.kernels.input_grad import input_grad     # I: dX = dY·W (⊙ act'(Z))

The package itself imports nothing, so importing it never imports Triton. To run the kernels
on CPU tensors through Triton's interpreter, set TRITON_INTERPRET=1 before Triton is first
imported in the process: Triton decorates its own library, and ours, when imported.
"""
