"""Input gradient of a linear layer, dX = dY·W, with the previous activation's derivative fused.

For Y = X·Wᵀ + b with dY (M, N) and W (N, K), dX (M, K) = dY·W. When X itself came out of an
activation, X = act(Z), the gradient the previous layer needs is dZ = dX ⊙ act'(Z); the kernel
applies act'(Z) to each output tile before storing it, so dX never goes to memory and back.
This is the I half of a split backward.

`input_grad` runs the Triton kernel on CUDA tensors (and on CPU tensors when Triton runs in
its interpreter, TRITON_INTERPRET=1); elsewhere it runs `input_grad_reference`, PyTorch's
own unfused sequence (mm, then the activation's backward op).
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

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def _prune_configs(configs, named_args, **kwargs):
    return prune_tiles(
        configs,
        named_args["dy_ptr"].element_size(),
        "BLOCK_M",
        "BLOCK_K",
        "BLOCK_N",
        named_args["M"],
        named_args["K"],
    )


if triton is not None:

    @triton.jit
    def _times_act_grad(g, z, ACT: tl.constexpr):
        # g·act'(z) in fp32, the derivatives of PyTorch's own gelu / gelu(approximate="tanh") /
        # silu / relu. Where a derivative has 1 − t or 1 − σ (t = tanh), it is computed as a
        # sigmoid of the negated argument instead: 1 − t² = 4σ(2u)σ(−2u) keeps its digits for
        # |z| of 3 and more, where the subtraction loses them and z·(1 + 3cz²) magnifies it.
        if ACT == "gelu":
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1/sqrt(2π)
            g = g * (cdf + z * pdf)
        elif ACT == "gelu_tanh":
            s2pi: tl.constexpr = 0.7978845608028654  # sqrt(2/π)
            c: tl.constexpr = 0.044715
            u2 = 2.0 * s2pi * (z + c * z * z * z)
            p = tl.sigmoid(u2)  # (1 + tanh u) / 2
            q = tl.sigmoid(-u2)  # (1 − tanh u) / 2
            g = g * (p + 2.0 * z * p * q * s2pi * (1.0 + 3.0 * c * z * z))
        elif ACT == "silu":
            g = g * (tl.sigmoid(z) * (1.0 + z * tl.sigmoid(-z)))
        elif ACT == "relu":
            g = tl.where(z > 0, g, 0.0)
        return g

    @triton.jit
    def _epilogue(
        acc,
        offs_m,
        offs_k,
        M,
        K,
        z_ptr,
        dx_ptr,
        stride_zm,
        stride_zk,
        stride_dxm,
        stride_dxk,
        ACT: tl.constexpr,
        EMULATE_RTNE: tl.constexpr,
    ):
        ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        rows = offs_m.to(tl.int64)[:, None]
        if ACT != "none":
            z = tl.load(z_ptr + rows * stride_zm + offs_k[None, :] * stride_zk, mask=ok, other=0.0)
            acc = _times_act_grad(acc, z.to(tl.float32), ACT)
        if EMULATE_RTNE and dx_ptr.dtype.element_ty == tl.bfloat16:
            acc = rtne_bf16(acc)
        dx_ptrs = dx_ptr + rows * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _input_grad_kernel(
        dy_ptr,
        w_ptr,
        z_ptr,
        dx_ptr,
        M,
        N,
        K,
        M_BUCKET,
        stride_dym,
        stride_dyn,
        stride_wn,
        stride_wk,
        stride_zm,
        stride_zk,
        stride_dxm,
        stride_dxk,
        ACT: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
        EMULATE_RTNE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)
        m_ok = offs_m[:, None] < M
        k_ok = offs_k[None, :] < K
        # 64-bit row offsets: M·stride passes 2³¹ for long sequences of wide layers
        dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n_left = N - n0
            dy = tl.load(dy_ptrs, mask=m_ok & (offs_n[None, :] < n_left), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_n[:, None] < n_left) & k_ok, other=0.0)
            if DOT_UPCAST:
                # the interpreter holds bf16 as raw uint16 and its dot would multiply the bit
                # patterns; widened, the products (exact in fp32) and sums are the same
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn

        if ACT != "none":
            # Two half-width passes: a whole tile of Z and the derivative's temporaries next
            # to the accumulator spill registers at the 128×256 tiles (1.3 KB per thread for
            # erf-GELU per ptxas -v on sm_90a); in halves it is 24 bytes.
            halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_K // 2)), (0, 2, 1)))
            offs_h = pid_k * BLOCK_K + tl.arange(0, BLOCK_K // 2)
            _epilogue(
                halves[0], offs_m, offs_h, M, K, z_ptr, dx_ptr,
                stride_zm, stride_zk, stride_dxm, stride_dxk, ACT, EMULATE_RTNE,
            )  # fmt: skip
            _epilogue(
                halves[1], offs_m, offs_h + BLOCK_K // 2, M, K, z_ptr, dx_ptr,
                stride_zm, stride_zk, stride_dxm, stride_dxk, ACT, EMULATE_RTNE,
            )  # fmt: skip
        else:
            _epilogue(
                acc, offs_m, offs_k, M, K, z_ptr, dx_ptr,
                stride_zm, stride_zk, stride_dxm, stride_dxk, ACT, EMULATE_RTNE,
            )  # fmt: skip

    _input_grad_tuned = triton.autotune(
        configs=tile_configs("BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M", (16, 32, 32)),
        # M is bucketed to a power of two: token counts vary from microbatch to microbatch
        # and each new exact M would otherwise be tuned again. The activation changes the
        # epilogue's register needs, so it is part of the key.
        key=["M_BUCKET", "N", "K", "ACT"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_input_grad_kernel)


def _check(dy, weight, act, preact, dtypes=KERNEL_DTYPES):
    if dy.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"dy must be (..., out) and weight (out, in); got {tuple(dy.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if dy.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"dy's last dimension ({dy.shape[-1]}) must be weight's first (out features, "
            f"{weight.shape[0]})"
        )
    if dy.dtype != weight.dtype or dy.dtype not in dtypes:
        raise TypeError(
            f"dy and weight must share one dtype of {[str(d) for d in dtypes]}; got {dy.dtype} "
            f"and {weight.dtype}"
        )
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None or one of {ACTIVATIONS}, got {act!r}")
    if (act is None) != (preact is None):
        raise ValueError(
            "pass act and preact together: preact is the activation's input saved in forward"
        )
    if preact is not None:
        want = (*dy.shape[:-1], weight.shape[1])
        if tuple(preact.shape) != want:
            raise ValueError(f"preact must have dX's shape {want}, got {tuple(preact.shape)}")
        if not preact.is_floating_point():
            raise TypeError(f"preact must be a floating tensor, got {preact.dtype}")
    devices = {t.device for t in (dy, weight, preact) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def input_grad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    *,
    act: str | None = None,
    preact: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Input gradient of Y = X·Wᵀ + b, times act'(preact) when X = act(preact).

    Args:
        dy: gradient of the layer's output, (..., out) — float32, float16 or bfloat16.
        weight: the layer's weight, (out, in), dy's dtype. Any strides.
        act: None, or the activation that produced X: "gelu" (erf), "gelu_tanh" (tanh
            approximation, torch's approximate="tanh"), "relu" or "silu".
        preact: the activation's input Z saved in forward, (..., in); with act only. Any
            floating dtype.
        backend: "auto" (Triton where it can run, else PyTorch), "triton" or "torch".

    Returns a new tensor (..., in) of dy's dtype: dY·W, or dY·W ⊙ act'(Z). Products are summed
    in fp32 and the result rounded once. fp32 inputs use TF32 when torch.mm would
    (torch.backends.cuda.matmul.fp32_precision, or allow_tf32).
    """
    _check(dy, weight, act, preact)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f'backend must be "auto", "triton" or "torch", got {backend!r}')
    use_triton = backend == "triton" or (backend == "auto" and triton_runs_on(dy.device))
    if use_triton and not triton_runs_on(dy.device):
        raise ValueError(
            f"the Triton kernel cannot run on {dy.device}: it needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before Triton is first imported"
        )
    n, k = weight.shape
    if not use_triton or n == 0:  # n == 0: an empty reduction, which torch handles
        return input_grad_reference(dy, weight, act=act, preact=preact)

    dy2 = dy.reshape(-1, n)
    m = dy2.shape[0]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0 or k == 0:
        return dx.reshape(*dy.shape[:-1], k)
    z = preact.reshape(m, k) if preact is not None else dx  # never read without an activation

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    _input_grad_tuned[grid](
        dy2, weight, z, dx,
        m, n, k, triton.next_power_of_2(m),
        dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1),
        z.stride(0), z.stride(1), dx.stride(0), dx.stride(1),
        ACT=act or "none",
        DOT_UPCAST=INTERPRET and dy.dtype == torch.bfloat16,
        EMULATE_RTNE=INTERPRET,
        PRECISION=fp32_dot_precision(),
    )  # fmt: skip
    return dx.reshape(*dy.shape[:-1], k)


def input_grad_reference(
    dy: torch.Tensor,
    weight: torch.Tensor,
    *,
    act: str | None = None,
    preact: torch.Tensor | None = None,
) -> torch.Tensor:
    """`input_grad` as autograd computes it unfused: mm, then the activation's backward op.

    In 16-bit this rounds twice (after the mm and after the backward op), which is the
    precision PyTorch itself delivers; the fused kernel rounds once. Also the CPU path.
    """
    _check(dy, weight, act, preact, REFERENCE_DTYPES)
    dx = torch.matmul(dy, weight)
    if act is None:
        return dx
    z = preact.to(dx.dtype)
    if act == "gelu":
        return torch.ops.aten.gelu_backward(dx, z, approximate="none")
    if act == "gelu_tanh":
        return torch.ops.aten.gelu_backward(dx, z, approximate="tanh")
    if act == "silu":
        return torch.ops.aten.silu_backward(dx, z)
    return torch.ops.aten.threshold_backward(dx, z, 0)
