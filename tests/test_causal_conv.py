"""The mixer's causal depthwise convolution + SiLU: PyTorch path, Triton kernels (interpreted on the CPU), checks.

Every backend is compared with a frame-by-frame Python loop written from the
definition, forward and gradients. The Triton kernels run through Triton's
interpreter with 4 x 4 tiles, so that 11 frames and 6 channels cross tile
boundaries in both directions; the CUDA tests at the end compare them with the
PyTorch path at the mixer's real shapes.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from speechbrain_mamba.ops import causal_conv1d_silu
from speechbrain_mamba.ops.causal_conv import _resolve_backend, load_triton_conv
from speechbrain_mamba.ops.triton_support import check_32bit_offsets
from triton_interpret import interpreted

HAS_CUDA = torch.cuda.is_available()


def loop_reference(x, weight, bias, reverse):
    """``out[:, t] = silu(bias + sum_k w_k x[:, t -/+ (K - 1 - k)])``, one frame at a time."""
    batch, length, channels = x.shape
    weight = weight.reshape(channels, -1)
    kernel_size = weight.shape[1]
    frames = []
    for t in range(length):
        acc = x.new_zeros(batch, channels) if bias is None else bias.expand(batch, channels)
        for k in range(kernel_size):
            source = t + (kernel_size - 1 - k) if reverse else t - (kernel_size - 1 - k)
            if 0 <= source < length:
                acc = acc + weight[:, k] * x[:, source]
        frames.append(acc * torch.sigmoid(acc))
    return torch.stack(frames, dim=1)


def make_inputs(batch, length, channels, kernel_size, with_bias, dtype=torch.float64, strided=True, seed=0):
    """``x`` as the mixer passes it (``xz[..., :E]`` of a contiguous (B, L, 2E) tensor), weight, bias."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        x = torch.randn(batch, length, 2 * channels, generator=g, dtype=dtype)[..., :channels]
    else:
        x = torch.randn(batch, length, channels, generator=g, dtype=dtype)
    weight = torch.randn(channels, 1, kernel_size, generator=g, dtype=dtype) / kernel_size**0.5
    bias = torch.randn(channels, generator=g, dtype=dtype) if with_bias else None
    grad_out = torch.randn(batch, channels, length, generator=g, dtype=dtype).transpose(1, 2)  # not contiguous
    return x.requires_grad_(), weight.requires_grad_(), bias if bias is None else bias.requires_grad_(), grad_out


def forward_and_grads(fn, x, weight, bias, grad_out, reverse):
    out = fn(x, weight, bias, reverse)
    inputs = [t for t in (x, weight, bias) if t is not None]
    return out, torch.autograd.grad(out, inputs, grad_out)


def assert_matches_loop(fn, x, weight, bias, grad_out, reverse, rtol=1e-7, atol=1e-9):
    out, grads = forward_and_grads(fn, x, weight, bias, grad_out, reverse)
    out_ref, grads_ref = forward_and_grads(loop_reference, x, weight, bias, grad_out, reverse)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol, msg=lambda m: f"output: {m}")
    for name, grad, grad_ref, source in zip(("x", "weight", "bias"), grads, grads_ref, (x, weight, bias)):
        assert grad.shape == source.shape and grad.dtype == source.dtype, name
        torch.testing.assert_close(grad, grad_ref, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
    return out


# ---------------------------------------------------------------- PyTorch path


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_torch_path_matches_loop(kernel_size, with_bias, reverse):
    x, weight, bias, grad_out = make_inputs(2, 9, 5, kernel_size, with_bias)
    conv = lambda *args: causal_conv1d_silu(*args, backend="torch")  # noqa: E731
    assert_matches_loop(conv, x, weight, bias, grad_out, reverse)


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_torch_path_without_autograd_matches_loop(kernel_size, with_bias, reverse):
    """Without autograd the PyTorch backend adds shifted taps on the channel-last input (not F.conv1d)."""
    for length in (11, 2):  # 2 frames: taps shifted past the whole sequence add nothing
        x, weight, bias, _ = make_inputs(2, length, 6, kernel_size, with_bias)
        with torch.no_grad():
            out = causal_conv1d_silu(x, weight, bias, reverse, backend="torch")
            expected = loop_reference(x, weight, bias, reverse)
        assert out.is_contiguous() and out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-9)
    x, weight, bias, _ = make_inputs(2, 11, 6, 4, with_bias, dtype=torch.float32)
    with torch.no_grad():  # bf16 input, fp32 parameters: computed in fp32, returned in bf16
        out = causal_conv1d_silu(x.bfloat16(), weight, bias, reverse, backend="torch")
        expected = loop_reference(x.bfloat16().float(), weight, bias, reverse)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_torch_path_gradients_on_sequences_shorter_than_the_filter(reverse):
    x, weight, bias, grad_out = make_inputs(2, 2, 6, 4, True)  # taps shifted by 2 and 3 frames read nothing
    assert_matches_loop(lambda *a: causal_conv1d_silu(*a, backend="torch"), x, weight, bias, grad_out, reverse)


def test_torch_path_takes_a_2d_weight_and_matches_the_mixers_conv1d():
    x, weight, bias, _ = make_inputs(2, 7, 3, 4, True)
    out = causal_conv1d_silu(x, weight.squeeze(1), bias, backend="torch")
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), weight, bias, groups=3)).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    out = causal_conv1d_silu(x, weight.squeeze(1), bias, reverse=True, backend="torch")
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (0, 3)), weight.flip(-1), bias, groups=3)).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_auto_is_torch_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _resolve_backend(torch.zeros(1, 2, 3), None, 4) == "torch"
    assert _resolve_backend(torch.zeros(1, 2, 3), "auto", 4) == "torch"


def test_importing_the_module_does_not_import_triton():
    code = "import sys, speechbrain_mamba.ops.causal_conv; assert 'triton' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("x_shape, w_shape, b_shape, match", [
    ((2, 5), (4, 1, 4), None, r"x must be \(batch, length, channels\)"),
    ((2, 0, 4), (4, 1, 4), None, "length 0"),
    ((2, 5, 4), (3, 1, 4), None, r"weight must be \(4, 1, K\) or \(4, K\)"),
    ((2, 5, 4), (4, 2, 4), None, r"weight must be \(4, 1, K\)"),
    ((2, 5, 4), (4, 1, 0), None, "K >= 1"),
    ((2, 5, 4), (4,), None, "weight must be"),
    ((2, 5, 4), (4, 1, 4), (3,), r"bias must be \(4,\)"),
])
def test_bad_shapes_are_refused(x_shape, w_shape, b_shape, match):
    bias = None if b_shape is None else torch.zeros(b_shape)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_silu(torch.zeros(x_shape), torch.zeros(w_shape), bias)


def test_32bit_offset_check_is_exact_at_the_limit():
    """The quick bound (elements x largest stride) only decides when to sum the exact reach."""
    fits = torch.empty_strided((2, 2**30), (1, 2), device="meta")  # reaches 1 + (2**30 - 1) * 2 = 2**31 - 1
    check_32bit_offsets(x=fits, other=None)
    beyond = torch.empty_strided((2, 2**30 + 1), (1, 2), device="meta")
    with pytest.raises(ValueError, match="32-bit offsets; x"):
        check_32bit_offsets(x=beyond)


def test_bad_backends_are_refused(monkeypatch):
    x, weight = torch.zeros(1, 3, 2), torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match=r"backend='cuda'.*'auto', 'torch', 'triton'"):
        causal_conv1d_silu(x, weight, None, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors only.*x is on cpu"):
        causal_conv1d_silu(x, weight, None, backend="triton")


# ---------------------------------------------------------------- Triton kernels, interpreted

@pytest.fixture(scope="class")  # torn down after the class: the CUDA tests then compile
def kernels():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    with interpreted("speechbrain_mamba.ops.causal_conv_triton", forget=[load_triton_conv]) as module:
        yield module


class TestInterpretedKernels:
    """The kernels on the CPU, 4 x 4 tiles; the interpreted module is gone before the CUDA tests run."""

    @staticmethod
    def tiny_triton(kernels):
        """The kernels with 4 x 4 tiles and a check that the output is contiguous."""
        tiny = kernels.ConvConfig(block_l=4, block_e=4, num_warps=1)

        def conv(x, weight, bias, reverse):
            out = kernels.causal_conv1d_silu_triton(x, weight, bias, reverse, forward_config=tiny, backward_config=tiny)
            assert out.is_contiguous()
            return out
        return conv

    @pytest.mark.parametrize("kernel_size", [1, 3, 4])
    @pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
    def test_triton_matches_loop(self, kernels, kernel_size, with_bias, reverse):
        # 11 frames, 6 channels: 3 time tiles and 2 channel tiles, both partly masked; x and grad_out strided.
        x, weight, bias, grad_out = make_inputs(2, 11, 6, kernel_size, with_bias, dtype=torch.float32)
        assert x.stride() == (132, 12, 1) and not grad_out.is_contiguous()
        assert_matches_loop(self.tiny_triton(kernels), x, weight, bias, grad_out, reverse, rtol=1e-5, atol=1e-6)

    def test_triton_with_contiguous_x_and_2d_weight(self, kernels):
        x, weight, bias, grad_out = make_inputs(1, 5, 4, 4, True, dtype=torch.float32, strided=False)
        conv = self.tiny_triton(kernels)
        assert_matches_loop(lambda x, w, b, r: conv(x, w.reshape(4, 4), b, r), x, weight, bias,
                            grad_out.contiguous(), True, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
    def test_triton_backward_programs_take_tiles_of_several_sequences(self, kernels, reverse):
        # 3 sequences of 9 frames: 9 time tiles x 2 channel tiles over 4 programs of 5 time tiles each, so a
        # program's tiles run into the next sequence, and the last program's last tile is past the end.
        x, weight, bias, grad_out = make_inputs(3, 9, 6, 4, True, dtype=torch.float32)
        assert_matches_loop(self.tiny_triton(kernels), x, weight, bias, grad_out, reverse, rtol=1e-5, atol=1e-6)

    def test_triton_gradients_of_only_some_inputs(self, kernels):
        """The kernel skips dx (or dw and db) when autograd does not ask for it."""
        x, weight, bias, grad_out = make_inputs(1, 9, 5, 4, True, dtype=torch.float32)
        conv = self.tiny_triton(kernels)
        (dx_ref, dw_ref, db_ref) = forward_and_grads(loop_reference, x, weight, bias, grad_out, False)[1]
        dx, = torch.autograd.grad(conv(x, weight.detach(), bias.detach(), False), [x], grad_out)
        torch.testing.assert_close(dx, dx_ref)
        dw, db = torch.autograd.grad(conv(x.detach(), weight, bias, False), [weight, bias], grad_out)
        torch.testing.assert_close(dw, dw_ref)
        torch.testing.assert_close(db, db_ref)
        dw, = torch.autograd.grad(conv(x.detach(), weight, bias.detach(), False), [weight], grad_out)
        torch.testing.assert_close(dw, dw_ref)

    def test_public_function_dispatches_to_triton_when_interpreting(self, kernels):
        x, weight, bias, grad_out = make_inputs(2, 11, 6, 4, True, dtype=torch.float32)
        assert _resolve_backend(x, None, 4) == "triton"
        assert _resolve_backend(x, None, 9) == "torch"  # beyond the kernels' unrolled taps
        for backend in (None, "triton"):
            for reverse in (False, True):
                out = assert_matches_loop(lambda *args: causal_conv1d_silu(*args, backend=backend), x, weight, bias,
                                          grad_out, reverse, rtol=1e-5, atol=1e-6)
                assert out.is_contiguous()  # the PyTorch path returns a transposed view

    def test_triton_bf16_input_with_fp32_parameters_under_autocast(self, kernels):
        """As the mixer runs under bf16 autocast: output and dx in bf16, dw and db in fp32, no dtype error."""
        x, weight, bias, grad_out = make_inputs(2, 11, 6, 4, True, dtype=torch.float32)
        x_bf16 = x.detach().to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.tiny_triton(kernels)(x_bf16, weight, bias, True)
        dx, dw, db = torch.autograd.grad(out, [x_bf16, weight, bias], grad_out.to(torch.bfloat16))
        assert (out.dtype, dx.dtype) == (torch.bfloat16, torch.bfloat16)
        assert (dw.dtype, db.dtype) == (torch.float32, torch.float32)
        x_ref = x_bf16.detach().float().requires_grad_()
        out_ref, (dx_ref, dw_ref, db_ref) = forward_and_grads(
            loop_reference, x_ref, weight, bias, grad_out.to(torch.bfloat16).float(), True)
        torch.testing.assert_close(out.float(), out_ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dx.float(), dx_ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)  # fp32 sums of the same bf16 inputs
        torch.testing.assert_close(db, db_ref, rtol=1e-4, atol=1e-4)

    def test_triton_without_autograd_gives_autograds_output(self, kernels):
        """Inputs that need no gradient skip the autograd Function: the same kernel, the same output."""
        x, weight, bias, _ = make_inputs(2, 11, 6, 4, True, dtype=torch.float32)
        conv = self.tiny_triton(kernels)
        for reverse in (False, True):
            expected = conv(x, weight, bias, reverse)
            with torch.no_grad():
                out = conv(x, weight, bias, reverse)
            assert expected.requires_grad and out.grad_fn is None
            assert torch.equal(out, expected.detach())

    def test_triton_refuses_forward_mode_ad_instead_of_dropping_the_tangent(self, kernels):
        x, weight, bias, _ = make_inputs(1, 5, 4, 4, True, dtype=torch.float32)
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x.detach(), torch.ones_like(x))
            with pytest.raises(RuntimeError, match="jvp"):
                self.tiny_triton(kernels)(dual, weight.detach(), bias.detach(), False)

    def test_triton_refuses_what_the_kernels_cannot_do(self, kernels, monkeypatch):
        x = torch.zeros(1, 3, 2)
        with pytest.raises(ValueError, match="kernel sizes 1 to 8"):
            kernels.causal_conv1d_silu_triton(x, torch.zeros(2, 1, 9), None)
        with pytest.raises(ValueError, match="power of two"):
            kernels.ConvConfig(block_l=24)
        huge = torch.empty_strided((2, 3, 2), (2**31, 2, 1), device="meta")  # offsets past 2**31, no memory
        with pytest.raises(ValueError, match="32-bit offsets; x"):
            kernels.causal_conv1d_silu_triton(huge, torch.zeros(2, 1, 4, device="meta"), None)
        with pytest.raises(ValueError, match="weight is on cpu but x is on meta"):
            kernels.causal_conv1d_silu_triton(huge, torch.zeros(2, 1, 4), None)
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="CUDA tensors only"):
            kernels.causal_conv1d_silu_triton(x, torch.zeros(2, 1, 4), None)


# ---------------------------------------------------------------- CUDA: Triton against the PyTorch path

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
REAL_SHAPES = [(481, 250, 512), (1, 16000, 256), (3, 37, 200)]  # DPMamba intra, SepMamba's first stage, odd


@pytest.fixture
def exact_fp32_conv(monkeypatch):
    """The fp32 reference must not run its convolution in TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def compiled_triton(x, weight, bias, reverse):
    assert os.environ.get("TRITON_INTERPRET") != "1", "the interpreter would take hours at these shapes"
    return causal_conv1d_silu(x, weight, bias, reverse, backend="triton")


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_cuda_triton_matches_torch(exact_fp32_conv, shape, dtype, reverse):
    batch, length, channels = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, length, 2 * channels, generator=g, device="cuda").to(dtype)
    x = xz[..., :channels].requires_grad_()
    weight = (torch.randn(channels, 1, 4, generator=g, device="cuda") / 2).requires_grad_()  # fp32 parameters
    bias = torch.randn(channels, generator=g, device="cuda").requires_grad_()
    grad_out = torch.randn(batch, length, channels, generator=g, device="cuda").to(dtype)

    out, (dx, dw, db) = forward_and_grads(compiled_triton, x, weight, bias, grad_out, reverse)
    assert out.is_contiguous() and out.dtype == dtype and dx.dtype == dtype
    assert dw.dtype == db.dtype == torch.float32
    # Reference: the PyTorch path in fp32 on the very same (rounded) inputs.
    x_ref = x.detach().float().requires_grad_()
    out_ref, (dx_ref, dw_ref, db_ref) = forward_and_grads(lambda *a: causal_conv1d_silu(*a, backend="torch"),
                                                          x_ref, weight, bias, grad_out.float(), reverse)
    loose = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output and of dx
    for name, actual, expected, tol in (("out", out, out_ref, loose), ("dx", dx, dx_ref, loose),
                                        ("dw", dw, dw_ref, 1e-4), ("db", db, db_ref, 1e-4)):
        assert relative_error(actual, expected) < tol, name

    # The weight gradient is summed without atomics: the same bits on a second run.
    _, (_, dw_again, db_again) = forward_and_grads(compiled_triton, x, weight, bias, grad_out, reverse)
    assert torch.equal(dw, dw_again) and torch.equal(db, db_again)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_cuda_auto_under_bf16_autocast(reverse):
    """What the mixer will do: fp32 module parameters, bf16 activations, autocast on."""
    conv = torch.nn.Conv1d(256, 256, 4, groups=256, padding=3).cuda()
    xz = torch.randn(8, 250, 512, device="cuda", requires_grad=True)
    assert os.environ.get("TRITON_INTERPRET") != "1"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = xz.to(torch.bfloat16)[..., :256]
        out = causal_conv1d_silu(x, conv.weight, conv.bias, reverse=reverse)
        out_ref = causal_conv1d_silu(x, conv.weight, conv.bias, reverse=reverse, backend="torch")
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert relative_error(out, out_ref) < 2e-2
    grads = torch.autograd.grad(out.float().square().sum(), [xz, conv.weight, conv.bias])
    grads_ref = torch.autograd.grad(out_ref.float().square().sum(), [xz, conv.weight, conv.bias])
    for name, grad, grad_ref in zip(("xz", "weight", "bias"), grads, grads_ref):
        assert grad.dtype == torch.float32, name
        assert relative_error(grad, grad_ref) < 3e-2, name
