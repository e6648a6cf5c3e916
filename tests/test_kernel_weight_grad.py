"""Fused weight-grad kernel and its reference against a float64 answer, on CPU and CUDA.

Tolerances:
- fp32: elementwise, the worst-case bound for an fp32 sum of products (Higham, "Accuracy and
  Stability of Numerical Algorithms", §3.1): |ours − exact| ≤ γ_n · (|dY|ᵀ|X| + |old|) with
  γ_n = n·u / (1 − n·u), u = 2⁻²⁴ and n = M + 2 (M products, the add of the old value, the
  final rounding). With TF32 on CUDA each input is first rounded to 11 bits, adding 2·2⁻¹¹.
- bf16 / fp16: flash-attention's rule. PyTorch's own result at that precision (mm in 16 bits,
  then added into the buffer; dY summed in 16 bits) is compared with the float64 answer, and
  ours may be off by at most twice that error plus 1e-5 (for cases where PyTorch is exact).

Without a GPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1) on CPU
tensors. Triton reads that switch when it decorates its own library and our kernels, so it
must be set before Triton is first imported in the process; this module sets it. If
something imported Triton earlier without it, the tests here skip and one test runs this
file again in a fresh process instead.
"""

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# False when something imported Triton before us without the interpreter: Triton's library and
# our kernels are then decorated for a GPU this machine does not have.
IN_THIS_PROCESS = (
    HAS_CUDA or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
)
if not HAS_CUDA and IN_THIS_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from ppfast.kernels import weight_grad as wg  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
# (input dtype, where the gradient goes): an fp32 main grad, or .grad in the weight's dtype
# (for fp32 inputs the two are the same case)
CASES = [
    (torch.bfloat16, "main_grad"),
    (torch.bfloat16, "grad"),
    (torch.float16, "main_grad"),
    (torch.float16, "grad"),
    (torch.float32, "main_grad"),
]
EPS = 1e-5
U32 = 2.0**-24


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _fp32_bound(dy, x, old, device) -> torch.Tensor:
    tf32 = device == "cuda" and wg.fp32_dot_precision() == "tf32"
    scale = dy.double().abs().t() @ x.double().abs()
    if old is not None:
        scale = scale + old.double().abs()
    return (_gamma(x.shape[0] + 2) + (2 * 2.0**-11 if tf32 else 0.0)) * scale


def _inputs(m, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    w_old = torch.randn(n, k, generator=g).to(device)
    b_old = torch.randn(n, generator=g).to(device)
    return x, dy, w_old, b_old


def _max_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    return (a.double() - exact).abs().max().item() if a.numel() else 0.0


@pytest.fixture(autouse=True)
def _kernels_usable_here(request):
    if not IN_THIS_PROCESS and request.node.originalname != "test_in_a_fresh_process":
        pytest.skip(
            "Triton was imported without TRITON_INTERPRET; test_in_a_fresh_process runs this"
        )


@pytest.mark.skipif(IN_THIS_PROCESS, reason="the tests run in this process")
def test_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


def test_kernel_runs_through_triton_on_cpu_without_a_gpu():
    # Otherwise the tests below would check the PyTorch fallback twice and the kernel never.
    if HAS_CUDA:
        assert wg.triton_runs_on("cuda")
    else:
        assert wg.INTERPRET and wg.triton_runs_on("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize(("dtype", "into"), CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("m", [1, 17, 67])
@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "overwrite"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_weight_grad_matches_float64(device, impl, dtype, into, m, accumulate, bias):
    n, k = 48, 40  # not multiples of the interpreter's 32-wide tiles: ragged on every axis
    x, dy, w_old, b_old = _inputs(m, n, k, dtype, device, seed=m)
    out_dtype = torch.float32 if into == "main_grad" else dtype
    w_old, b_old = w_old.to(out_dtype), b_old.to(out_dtype)
    dw = w_old.clone()
    db = b_old.clone() if bias else None
    fn = wg.weight_grad if impl == "kernel" else wg.weight_grad_reference
    got_w, got_b = fn(x, dy, dw, db, accumulate=accumulate)
    assert got_w is dw and got_b is db

    exact_w = dy.double().t() @ x.double()
    exact_b = dy.double().sum(0)
    if accumulate:
        exact_w += w_old.double()
        exact_b += b_old.double()

    if dtype == torch.float32:
        bound_w = _fp32_bound(dy, x, w_old if accumulate else None, device)
        assert ((dw.double() - exact_w).abs() <= bound_w).all(), _max_err(dw, exact_w)
        if bias:
            ones = torch.ones(m, 1, dtype=dtype, device=device)
            bound_b = _fp32_bound(dy, ones, b_old[:, None] if accumulate else None, device)
            assert ((db.double() - exact_b).abs() <= bound_b[:, 0]).all()
        return

    # PyTorch's own unfused sequence at this precision: mm rounded to 16 bits, then added
    w_pt, b_pt = w_old.clone(), b_old.clone()
    (w_pt.add_ if accumulate else w_pt.copy_)(torch.mm(dy.t(), x))
    (b_pt.add_ if accumulate else b_pt.copy_)(dy.sum(0))
    err_w, err_w_pt = _max_err(dw, exact_w), _max_err(w_pt, exact_w)
    assert err_w <= 2 * err_w_pt + EPS, (err_w, err_w_pt)
    if bias:
        err_b, err_b_pt = _max_err(db, exact_b), _max_err(b_pt, exact_b)
        assert err_b <= 2 * err_b_pt + EPS, (err_b, err_b_pt)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "into"), CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_weight_grad_autotuned_tiles_on_cuda(dtype, into):
    # Large enough for the Hopper tiles, ragged in every dimension.
    m, n, k = 1000, 392, 264
    x, dy, w_old, b_old = _inputs(m, n, k, dtype, "cuda", seed=0)
    out_dtype = torch.float32 if into == "main_grad" else dtype
    dw, db = w_old.to(out_dtype), b_old.to(out_dtype)
    w_ref, b_ref = dw.clone(), db.clone()
    wg.weight_grad(x, dy, dw, db)
    wg.weight_grad_reference(x.double(), dy.double(), w_ref.double(), b_ref.double())
    exact_w = w_ref.double() + dy.double().t() @ x.double()
    exact_b = b_ref.double() + dy.double().sum(0)
    if dtype == torch.float32:
        assert ((dw.double() - exact_w).abs() <= _fp32_bound(dy, x, w_ref, "cuda")).all()
        return
    w_pt = w_ref.clone().add_(torch.mm(dy.t(), x))
    b_pt = b_ref.clone().add_(dy.sum(0))
    assert _max_err(dw, exact_w) <= 2 * _max_err(w_pt, exact_w) + EPS
    assert _max_err(db, exact_b) <= 2 * _max_err(b_pt, exact_b) + EPS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_leading_dims_strided_buffers_and_neighbours(device, impl):
    # Activations come as (batch, seq, features), dY can be a column slice of a wider
    # gradient, and main grads are views into one flat buffer: the kernel must honour strides
    # and write nothing outside its view.
    n, k = 24, 40
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, k, generator=g).to(device)
    dy = torch.randn(2, 9, n + 8, generator=g).to(device)[..., 4 : 4 + n]
    flat = torch.randn(7 + n * k + 5 + n, generator=g).to(device)
    before = flat.clone()
    dw = flat[7 : 7 + n * k].view(k, n).t()  # column-major view
    db = flat[7 + n * k + 5 :]
    fn = wg.weight_grad if impl == "kernel" else wg.weight_grad_reference
    fn(x, dy, dw, db)

    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    old_w = before[7 : 7 + n * k].view(k, n).t()
    exact_w = old_w.double() + dy2.double().t() @ x2.double()
    assert ((dw.double() - exact_w).abs() <= _fp32_bound(dy2, x2, old_w, device)).all()
    ones = torch.ones(dy2.shape[0], 1, device=device)
    bound_b = _fp32_bound(dy2, ones, before[-n:, None], device)[:, 0]
    assert ((db.double() - before[-n:].double() - dy2.double().sum(0)).abs() <= bound_b).all()
    assert torch.equal(flat[:7], before[:7])
    assert torch.equal(flat[7 + n * k : 7 + n * k + 5], before[7 + n * k : 7 + n * k + 5])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_no_tokens(device, impl):
    fn = wg.weight_grad if impl == "kernel" else wg.weight_grad_reference
    x = torch.zeros(0, 8, device=device)
    dy = torch.zeros(0, 4, device=device)
    dw, db = torch.ones(4, 8, device=device), torch.ones(4, device=device)
    fn(x, dy, dw, db, accumulate=True)
    assert bool((dw == 1).all()) and bool((db == 1).all())
    fn(x, dy, dw, db, accumulate=False)
    assert bool((dw == 0).all()) and bool((db == 0).all())


def test_mistakes_say_what_to_change():
    x, dy = torch.randn(5, 8), torch.randn(5, 4)
    with pytest.raises(ValueError, match="leading"):
        wg.weight_grad(x, torch.randn(6, 4), torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"\(out, in\) = \(4, 8\)"):
        wg.weight_grad(x, dy, torch.zeros(8, 4))
    with pytest.raises(ValueError, match=r"bias_grad_out must have shape \(4,\)"):
        wg.weight_grad(x, dy, torch.zeros(4, 8), torch.zeros(5))
    with pytest.raises(TypeError, match="share one dtype"):
        wg.weight_grad(x.half(), dy, torch.zeros(4, 8))
    with pytest.raises(TypeError, match="main grad"):
        wg.weight_grad(x.bfloat16(), dy.bfloat16(), torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="share one dtype"):
        wg.weight_grad(x.double(), dy.double(), torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        wg.weight_grad(x, dy, torch.zeros(4, 8), backend="cuda")
