"""The Mamba blocks' RMSNorm: PyTorch path, Triton kernels (interpreted on the CPU), checks.

Every backend is compared with the definition computed in float64, forward and
gradients. The interpreted kernels run with tiles of 2 rows, so that rows are
split over several tiles, programs and loop steps, and the last tile is
partly masked; the CUDA tests at the end compare them with the PyTorch path
at DPMamba's shapes.
"""

import importlib.util

import pytest
import torch

from speechbrain_mamba.lobes.mamba import RMSNorm
from speechbrain_mamba.ops import rms_norm
from speechbrain_mamba.ops.rms_norm import load_triton_rms_norm, rms_norm_torch
from triton_interpret import interpreted

HAS_CUDA = torch.cuda.is_available()
EPS = 1e-5


def definition(x, weight, eps=EPS):
    """``x / sqrt(mean(x^2) + eps) * weight`` in float64."""
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def make_inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g) + 0.5).to(dtype)
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    grad_out = torch.randn(*shape, generator=g).to(dtype)
    return x.requires_grad_(), weight.requires_grad_(), grad_out


def forward_and_grads(fn, x, weight, grad_out):
    out = fn(x, weight)
    return (out, *torch.autograd.grad(out, (x, weight), grad_out))


def assert_matches_definition(fn, x, weight, grad_out, atol):
    out, dx, dw = forward_and_grads(fn, x, weight, grad_out)
    ref_x, ref_w = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_out, ref_dx, ref_dw = forward_and_grads(definition, ref_x, ref_w, grad_out.double())
    assert out.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == weight.dtype
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(dx.double(), ref_dx, atol=atol, rtol=atol)
    torch.testing.assert_close(dw.double(), ref_dw, atol=atol * x.numel() ** 0.5, rtol=atol)


def test_torch_path_matches_definition():
    assert_matches_definition(lambda x, w: rms_norm(x, w, EPS, backend="torch"), *make_inputs((3, 7, 12)), atol=1e-5)


def test_module_matches_definition_and_mamba_ssm_init():
    norm = RMSNorm(12, eps=EPS)
    assert torch.equal(norm.weight, torch.ones(12))
    x = make_inputs((2, 5, 12))[0].detach()
    torch.testing.assert_close(norm(x).double(), definition(x, norm.weight), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused(monkeypatch):
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"weight must be \(4,\) for x of shape \(2, 3, 4\); got \(5,\)"):
        rms_norm(x, torch.ones(5))
    with pytest.raises(ValueError, match=r"backend='cuda'.*'auto', 'torch', 'triton'"):
        rms_norm(x, torch.ones(4), backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors only.*x is on cpu"):
        rms_norm(x, torch.ones(4), backend="triton")


# ---------------------------------------------------------------- Triton kernels, interpreted

@pytest.fixture(scope="class")  # torn down after the class: the CUDA tests then compile
def kernels():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    load_triton_rms_norm.cache_clear()
    with interpreted("speechbrain_mamba.ops.rms_norm_triton") as module:
        module._TILE_ELEMENTS = 32  # 2 rows of 12 (16 padded) features per tile
        try:
            yield module
        finally:
            load_triton_rms_norm.cache_clear()


def strided(shape):
    """A view with unit feature stride whose leading dims are not contiguous (the intra-chunk stack's input)."""
    x, weight, grad_out = make_inputs((shape[1], shape[0], shape[2]))
    return x.detach().transpose(0, 1).requires_grad_(), weight, grad_out.transpose(0, 1)


class TestInterpretedKernels:
    """The kernels on the CPU with 2-row tiles; the interpreted module is gone before the CUDA tests run."""

    @pytest.mark.parametrize("shape", [(3, 7, 12), (37, 12), (1, 1, 5), (2, 3, 4, 12)], ids=str)
    def test_triton_matches_definition(self, kernels, shape):
        assert_matches_definition(lambda x, w: kernels.rms_norm_triton(x, w, EPS), *make_inputs(shape), atol=1e-5)

    def test_triton_reads_strided_rows_and_gradients_in_place(self, kernels):
        x, weight, grad_out = strided((3, 7, 12))
        assert not x.is_contiguous() and not grad_out.is_contiguous()
        assert_matches_definition(lambda x, w: kernels.rms_norm_triton(x, w, EPS), x, weight, grad_out, atol=1e-5)

    def test_triton_bf16_input_keeps_its_dtype(self, kernels):
        x, weight, grad_out = make_inputs((3, 7, 12), dtype=torch.bfloat16)
        # Against the definition on the same bf16 values: only the output's and dx's roundings differ.
        assert_matches_definition(lambda x, w: kernels.rms_norm_triton(x, w, EPS), x, weight, grad_out, atol=2e-2)

    def test_public_function_dispatches_to_triton_when_interpreting(self, kernels, monkeypatch):
        original, calls = kernels._forward, []

        def recorded(*args, **kwargs):
            calls.append(tuple(args[0].shape))
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, "_forward", recorded)
        x, weight, _ = make_inputs((2, 3, 12))
        rms_norm(x.detach(), weight.detach())
        assert calls == [(2, 3, 12)]

    def test_triton_without_autograd_gives_autograds_output(self, kernels):
        x, weight, _ = make_inputs((3, 7, 12))
        with torch.no_grad():
            plain = kernels.rms_norm_triton(x, weight, EPS)
        assert torch.equal(plain, kernels.rms_norm_triton(x, weight, EPS).detach())

    def test_triton_gradient_of_x_alone(self, kernels):
        x, weight, grad_out = make_inputs((3, 7, 12))
        (dx,) = torch.autograd.grad(kernels.rms_norm_triton(x, weight.detach(), EPS), x, grad_out)
        ref_x = x.detach().double().requires_grad_()
        (ref_dx,) = torch.autograd.grad(definition(ref_x, weight.detach()), ref_x, grad_out.double())
        torch.testing.assert_close(dx.double(), ref_dx, atol=1e-5, rtol=1e-5)

    def test_triton_refuses_what_the_kernels_cannot_do(self, kernels, monkeypatch):
        with pytest.raises(ValueError, match="1 to 8192 features; x has 8193"):
            kernels.rms_norm_triton(torch.zeros(1, 8193), torch.ones(8193), EPS)
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="CUDA tensors only.*x is on cpu"):
            kernels.rms_norm_triton(torch.zeros(1, 4), torch.ones(4), EPS)


# ---------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not HAS_CUDA or load_triton_rms_norm() is None, reason="needs CUDA and triton")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("shape", [(132, 250, 256), (1000, 33, 256), (2, 16000, 64)], ids=str)
def test_cuda_triton_matches_torch(shape, layout, dtype):
    x, weight, grad_out = strided(shape) if layout == "strided" else make_inputs(shape)
    x = x.detach().to("cuda", dtype).requires_grad_()
    weight, grad_out = weight.detach().cuda().requires_grad_(), grad_out.to("cuda", dtype)
    triton_out, triton_dx, triton_dw = forward_and_grads(
        lambda x, w: rms_norm(x, w, EPS, backend="triton"), x, weight, grad_out)
    torch_out, torch_dx, torch_dw = forward_and_grads(
        lambda x, w: rms_norm(x, w, EPS, backend="torch"), x, weight, grad_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output and of dx
    torch.testing.assert_close(triton_out, torch_out, atol=tol, rtol=tol)
    torch.testing.assert_close(triton_dx, torch_dx, atol=tol, rtol=tol)
    # dw sums a product over every row in fp32 on both backends, in different orders.
    torch.testing.assert_close(triton_dw, torch_dw, atol=1e-4 * x[..., 0].numel() ** 0.5, rtol=1e-4)


@cuda_only
def test_cuda_triton_weight_gradient_is_deterministic():
    x, weight, grad_out = (t.cuda() for t in make_inputs((64, 250, 256)))
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    grads = [torch.autograd.grad(rms_norm(x, weight, EPS), weight, grad_out)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


@cuda_only
def test_cuda_auto_takes_triton_under_autocast():
    norm = RMSNorm(256).cuda()
    x = torch.randn(4, 100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = norm(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_torch(x.detach(), norm.weight.detach(), norm.eps), atol=1e-2, rtol=1e-2)
