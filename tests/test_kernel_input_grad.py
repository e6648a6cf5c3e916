"""Input-grad kernel (dX = dY·W, times act'(Z) when fused) against a float64 answer, CPU and CUDA.

The float64 answer is `input_grad_reference` (mm, then PyTorch's activation backward op) on
float64 copies of the inputs. Tolerances:
- fp32: elementwise, (A·γ_n + c·u) · (|dY|·|W|) with u = 2⁻²⁴, γ_n = n·u / (1 − n·u) and
  n = N + 1 (Higham's bound for an fp32 sum of N products, plus the final rounding);
  A bounds |act'| (1 without an activation or for relu, 1.2 for gelu, gelu_tanh and silu,
  whose derivatives peak near 1.13 and 1.10), and c = 32 ulps for evaluating the smooth
  derivatives (erf, exp, a dozen arithmetic operations), 0 for none and relu. With TF32 on
  CUDA each input is first rounded to 11 bits, adding 2·2⁻¹¹·A.
- bf16 / fp16: flash-attention's rule. PyTorch's own result at that precision (the same
  reference run in 16 bits) is compared with the float64 answer, and ours may be off by at
  most twice that error plus 1e-5 (for cases where PyTorch is exact).

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

from ppfast.kernels import input_grad as ig  # noqa: E402

# The interpreter evaluates exp in numpy, which warns where a GPU quietly gives inf (and the
# sigmoid built on it the right limit, 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ACTS = [None, "gelu", "gelu_tanh", "relu", "silu"]
EPS = 1e-5
U32 = 2.0**-24


def _fp32_bound(dy, w, act, device) -> torch.Tensor:
    n = w.shape[0]
    gamma = (n + 1) * U32 / (1 - (n + 1) * U32)
    smooth = act in ("gelu", "gelu_tanh", "silu")
    a, c = (1.2, 32) if smooth else (1.0, 0)
    tf32 = device == "cuda" and ig.fp32_dot_precision() == "tf32"
    scale = dy.double().abs() @ w.double().abs()
    return (a * (gamma + (2 * 2.0**-11 if tf32 else 0.0)) + c * U32) * scale


def _inputs(m, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    # |dY·W| of order 1, and Z spread over the activations' curved part and both tails
    w = (torch.randn(n, k, generator=g) / n**0.5).to(device=device, dtype=dtype)
    z = (3 * torch.randn(m, k, generator=g)).to(device=device, dtype=dtype)
    return dy, w, z


def _exact(dy, w, act, z):
    return ig.input_grad_reference(
        dy.double(), w.double(), act=act, preact=None if act is None else z.double()
    )


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
        assert ig.triton_runs_on("cuda")
    else:
        assert ig.INTERPRET and ig.triton_runs_on("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("m", [1, 17, 67])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a or "noact")
def test_input_grad_matches_float64(device, impl, dtype, m, act):
    n, k = 48, 40  # not multiples of the interpreter's tiles: ragged on every axis
    dy, w, z = _inputs(m, n, k, dtype, device, seed=m)
    preact = None if act is None else z
    if impl == "kernel":
        dx = ig.input_grad(dy, w, act=act, preact=preact)
    else:
        dx = ig.input_grad_reference(dy, w, act=act, preact=preact)
    assert dx.shape == (m, k) and dx.dtype == dtype and dx.device.type == device
    exact = _exact(dy, w, act, z)

    if dtype == torch.float32:
        bound = _fp32_bound(dy, w, act, device)
        assert ((dx.double() - exact).abs() <= bound).all(), _max_err(dx, exact)
        return
    # PyTorch's own unfused sequence at this precision: mm and the backward op, each rounded
    dx_pt = ig.input_grad_reference(dy, w, act=act, preact=preact)
    err, err_pt = _max_err(dx, exact), _max_err(dx_pt, exact)
    assert err <= 2 * err_pt + EPS, (err, err_pt)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("act", [None, "gelu_tanh"], ids=lambda a: a or "noact")
def test_input_grad_autotuned_tiles_on_cuda(dtype, act):
    # Large enough for the Hopper tiles, ragged in every dimension.
    m, n, k = 1000, 392, 264
    dy, w, z = _inputs(m, n, k, dtype, "cuda", seed=0)
    preact = None if act is None else z
    dx = ig.input_grad(dy, w, act=act, preact=preact)
    exact = _exact(dy, w, act, z)
    if dtype == torch.float32:
        assert ((dx.double() - exact).abs() <= _fp32_bound(dy, w, act, "cuda")).all()
        return
    dx_pt = ig.input_grad_reference(dy, w, act=act, preact=preact)
    assert _max_err(dx, exact) <= 2 * _max_err(dx_pt, exact) + EPS


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_strided_weight(device):
    # dY as (batch, seq, out); W stored transposed (a weight tied to another layer's, say)
    # and Z a slice of a wider activation: the kernel must honour strides.
    n, k = 24, 40
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(2, 9, n, generator=g).to(device)
    w = torch.randn(k, n, generator=g).to(device).t()
    z = torch.randn(2, 9, k + 6, generator=g).to(device)[..., 3 : 3 + k]
    dx = ig.input_grad(dy, w, act="gelu", preact=z)
    assert dx.shape == (2, 9, k)
    exact = _exact(dy, w, "gelu", z)
    bound = _fp32_bound(dy.reshape(-1, n), w, "gelu", device).reshape(2, 9, k)
    assert ((dx.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens(device):
    dx = ig.input_grad(torch.zeros(0, 4, device=device), torch.ones(4, 8, device=device))
    assert dx.shape == (0, 8)


def test_mistakes_say_what_to_change():
    dy, w, z = torch.randn(5, 4), torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="last dimension"):
        ig.input_grad(dy, w.t())
    with pytest.raises(ValueError, match="together"):
        ig.input_grad(dy, w, act="gelu")
    with pytest.raises(ValueError, match="together"):
        ig.input_grad(dy, w, preact=z)
    with pytest.raises(ValueError, match="act must be None or one of"):
        ig.input_grad(dy, w, act="tanh", preact=z)
    with pytest.raises(ValueError, match=r"preact must have dX's shape \(5, 8\)"):
        ig.input_grad(dy, w, act="relu", preact=z.t())
    with pytest.raises(TypeError, match="share one dtype"):
        ig.input_grad(dy.bfloat16(), w)
    with pytest.raises(ValueError, match="backend"):
        ig.input_grad(dy, w, backend="cuda")
