"""Fused weight gradient of a linear layer: dW += dYᵀ·X and db += Σ dY in one pass over dY.

For Y = X·Wᵀ + b with X (M, K) (tokens × in features) and dY (M, N) (tokens × out features):

    dW (N, K) = dYᵀ·X        db (N,) = dY summed over tokens

The kernel computes both from the same dY tiles, accumulates in fp32 and writes either into an
fp32 main grad (read, add, write in place) or into a ``.grad`` of the weight's own dtype (the
sum is rounded once, after the add). This is the W half of a split backward.

`weight_grad` runs the Triton kernel on CUDA tensors (and on CPU tensors when Triton runs in
its interpreter, TRITON_INTERPRET=1); elsewhere it runs `weight_grad_reference`, which does the
same in PyTorch.
"""

from __future__ import annotations

import torch

from ._triton import (
    INTERPRET,
    KERNEL_DTYPES,
    REFERENCE_DTYPES,
    fp32_dot_precision,
    grouped_tile,
    prune_tiles,
    rtne_bf16,
    tile_configs,
    tl,
    triton,
    triton_runs_on,
)


def _prune_configs(configs, named_args, **kwargs):
    return prune_tiles(
        configs,
        named_args["x_ptr"].element_size(),
        "BLOCK_N",
        "BLOCK_K",
        "BLOCK_M",
        named_args["N"],
        named_args["K"],
    )


if triton is not None:

    @triton.jit
    def _weight_grad_kernel(
        x_ptr,
        dy_ptr,
        dw_ptr,
        db_ptr,
        M,
        N,
        K,
        M_BUCKET,
        stride_xm,
        stride_xk,
        stride_dym,
        stride_dyn,
        stride_dwn,
        stride_dwk,
        stride_db,
        HAS_BIAS: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
        EMULATE_RTNE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        GROUP_N: tl.constexpr,
    ):
        pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        k_ok = offs_k < K
        dw_ptrs = (
            dw_ptr
            + offs_n.to(tl.int64)[:, None] * stride_dwn
            + offs_k.to(tl.int64)[None, :] * stride_dwk
        )
        dw_ok = n_ok[:, None] & k_ok[None, :]
        if ACCUMULATE:
            # The old gradient seeds the accumulator (fp32, for a main grad and a 16-bit .grad
            # alike: the sum is rounded once, on store). Adding it after the loop instead
            # would hold the old tile and the accumulator in registers together, which spills
            # at the 128×256 tiles (checked with ptxas -v for sm_90a).
            acc = tl.load(dw_ptrs, mask=dw_ok, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # Only the first column of programs sums dY for db, from the dY tiles its GEMM loads
        # anyway. The branch is uniform per program; two specialised copies of the loop
        # under one if/else would be cheaper in principle, but there ptxas serialises the
        # wgmma of the merged accumulator (warning C7515).
        sum_bias = HAS_BIAS and pid_k == 0
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        for m0 in range(0, M, BLOCK_M):
            m_ok = offs_m[:, None] < M - m0
            dy = tl.load(dy_ptrs, mask=m_ok & n_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
            if sum_bias:
                db += tl.sum(dy.to(tl.float32), axis=0)
            if DOT_UPCAST:
                # the interpreter holds bf16 as raw uint16 and its dot would multiply the bit
                # patterns; widened, the products (exact in fp32) and sums are the same
                dy = dy.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
            # pointers advance rather than offsets grow, so M·stride never overflows int32
            dy_ptrs += BLOCK_M * stride_dym
            x_ptrs += BLOCK_M * stride_xm

        if EMULATE_RTNE and dw_ptr.dtype.element_ty == tl.bfloat16:
            acc = rtne_bf16(acc)
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=dw_ok)
        if HAS_BIAS and pid_k == 0:
            db_ptrs = db_ptr + offs_n * stride_db
            if ACCUMULATE:
                db += tl.load(db_ptrs, mask=n_ok, other=0.0).to(tl.float32)
            if EMULATE_RTNE and db_ptr.dtype.element_ty == tl.bfloat16:
                db = rtne_bf16(db)
            tl.store(db_ptrs, db.to(db_ptr.dtype.element_ty), mask=n_ok)

    _weight_grad_tuned = triton.autotune(
        configs=tile_configs("BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_N", (32, 32, 16)),
        # M is bucketed to a power of two: token counts vary from microbatch to microbatch
        # and each new exact M would otherwise be tuned again.
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_configs},
        # Tuning runs the kernel once per config and it adds into the buffers: put back what
        # they held, or the first call of each shape would add its gradient many times.
        restore_value=["dw_ptr", "db_ptr"],
    )(_weight_grad_kernel)


def _flatten(x: torch.Tensor, dy: torch.Tensor):
    if x.dim() < 1 or dy.dim() < 1:
        raise ValueError("x and dy need at least one dimension (features last)")
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(
            f"x {tuple(x.shape)} and dy {tuple(dy.shape)} must have the same leading (token) "
            "dimensions: pass the layer's input and the gradient of its output"
        )
    return x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])


def _check(x2, dy2, dw, db, dtypes=KERNEL_DTYPES):
    m, k = x2.shape
    n = dy2.shape[1]
    if x2.dtype != dy2.dtype or x2.dtype not in dtypes:
        raise TypeError(
            f"x and dy must share one dtype of {[str(d) for d in dtypes]}; got {x2.dtype} and "
            f"{dy2.dtype}"
        )
    if tuple(dw.shape) != (n, k):
        raise ValueError(
            f"weight_grad_out must have shape (out, in) = ({n}, {k}), got {tuple(dw.shape)}"
        )
    if dw.dtype not in (torch.float32, x2.dtype):
        raise TypeError(
            f"weight_grad_out must be float32 (a main grad) or {x2.dtype} (the weight's .grad), "
            f"got {dw.dtype}"
        )
    if db is not None:
        if tuple(db.shape) != (n,):
            raise ValueError(f"bias_grad_out must have shape ({n},), got {tuple(db.shape)}")
        if db.dtype not in (torch.float32, x2.dtype):
            raise TypeError(f"bias_grad_out must be float32 or {x2.dtype}, got {db.dtype}")
    devices = {t.device for t in (x2, dy2, dw, db) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight_grad_out: torch.Tensor,
    bias_grad_out: torch.Tensor | None = None,
    *,
    accumulate: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (and bias) gradient of Y = X·Wᵀ + b, written into the given buffers.

    Args:
        x: the layer's input, (..., in) — float32, float16 or bfloat16.
        dy: gradient of the layer's output, (..., out), same dtype and leading dims as x.
        weight_grad_out: (out, in); float32 (a main grad) or x's dtype (the weight's .grad).
            Any strides.
        bias_grad_out: (out,), float32 or x's dtype; None when the layer has no bias.
        accumulate: add to what the buffers hold (True) or overwrite it (False).
        backend: "auto" (Triton where it can run, else PyTorch), "triton" or "torch".

    Products are summed in fp32 whatever the input dtype; a 16-bit output is rounded once,
    after the existing value is added. fp32 inputs use TF32 when torch.mm would
    (torch.backends.cuda.matmul.fp32_precision, or allow_tf32).

    Returns (weight_grad_out, bias_grad_out).
    """
    x2, dy2 = _flatten(x, dy)
    _check(x2, dy2, weight_grad_out, bias_grad_out)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f'backend must be "auto", "triton" or "torch", got {backend!r}')
    use_triton = backend == "triton" or (backend == "auto" and triton_runs_on(x2.device))
    if use_triton and not triton_runs_on(x2.device):
        raise ValueError(
            f"the Triton kernel cannot run on {x2.device}: it needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before Triton is first imported"
        )
    if not use_triton:
        return weight_grad_reference(x2, dy2, weight_grad_out, bias_grad_out, accumulate=accumulate)

    m, k = x2.shape
    n = dy2.shape[1]
    if n == 0 or k == 0:  # an empty grid; nothing for a kernel to do
        return weight_grad_reference(x2, dy2, weight_grad_out, bias_grad_out, accumulate=accumulate)
    has_bias = bias_grad_out is not None
    db = bias_grad_out if has_bias else weight_grad_out  # never read without HAS_BIAS

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    _weight_grad_tuned[grid](
        x2, dy2, weight_grad_out, db,
        m, n, k, triton.next_power_of_2(max(m, 1)),
        x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1),
        weight_grad_out.stride(0), weight_grad_out.stride(1), db.stride(0),
        HAS_BIAS=has_bias,
        ACCUMULATE=accumulate,
        DOT_UPCAST=INTERPRET and x2.dtype == torch.bfloat16,
        EMULATE_RTNE=INTERPRET,
        PRECISION=fp32_dot_precision(),
    )  # fmt: skip
    return weight_grad_out, bias_grad_out


# Rows per step when a 16-bit input is widened for an fp32 GEMM: bounds the temporary copy.
_REFERENCE_CHUNK = 4096


def _addmm_fp32_out(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int) -> bool:
    """C (fp32) = beta·C + A·B for 16-bit A, B in one cuBLAS call; False where torch lacks it."""
    # cuBLAS reads and writes an fp32 C from 16-bit A and B (Megatron's wgrad_gemm_accum_fp32),
    # so the main grad is updated in place and nothing is copied. torch's out_dtype overload
    # of addmm does this; older releases lack it or insist C has A's dtype, and say so before
    # touching C.
    try:
        torch.addmm(c, a, b, beta=beta, out_dtype=torch.float32, out=c)
    except (RuntimeError, TypeError):
        return False
    return True


def weight_grad_reference(
    x: torch.Tensor,
    dy: torch.Tensor,
    weight_grad_out: torch.Tensor,
    bias_grad_out: torch.Tensor | None = None,
    *,
    accumulate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight_grad` in PyTorch: the same arguments, results and rounding; the CPU path."""
    x2, dy2 = _flatten(x, dy)
    _check(x2, dy2, weight_grad_out, bias_grad_out, REFERENCE_DTYPES)
    dw = weight_grad_out
    beta = 1 if accumulate else 0
    if dw.dtype == x2.dtype:
        # One GEMM with C = the grad itself: BLAS sums 16-bit products in fp32 and rounds
        # once after adding C, as the kernel does, with no temporary the size of dW.
        dw.addmm_(dy2.t(), x2, beta=beta)
    elif dw.is_cuda and _addmm_fp32_out(dw, dy2.t(), x2, beta):
        pass
    else:
        # 16-bit inputs into an fp32 main grad without a mixed-dtype GEMM (CPU): widen a slab
        # of tokens at a time and addmm_ it in, so the extra memory is a slab, not all of X.
        if not accumulate:
            dw.zero_()
        for s in range(0, x2.shape[0], _REFERENCE_CHUNK):
            e = s + _REFERENCE_CHUNK
            dw.addmm_(dy2[s:e].t().to(dw.dtype), x2[s:e].to(dw.dtype))
    if bias_grad_out is not None:
        # sum in at least fp32 (the kernel's accumulator), then one rounding into the buffer
        acc_dtype = torch.promote_types(dy2.dtype, torch.float32)
        db = dy2.sum(0, dtype=acc_dtype)
        if accumulate:
            bias_grad_out.add_(db)
        else:
            bias_grad_out.copy_(db)
    return weight_grad_out, bias_grad_out
