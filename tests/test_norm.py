"""The models' norms, RMSNorm, LayerNorm and the single-group norm with its residual: PyTorch path, Triton kernels
(interpreted on the CPU), checks.

Every backend is compared with the definition computed in float64, forward and
gradients. The interpreted kernels run with tiles of 2 rows, so that rows are
split over several tiles, programs and loop steps, and the last tile is
partly masked (the single-group norm: a sample over several programs, each
over several tiles); the CUDA tests at the end compare them with the PyTorch
path at DPMamba's and SepMamba's shapes.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from speechbrain_mamba.lobes.mamba import LayerNorm, RMSNorm
from speechbrain_mamba.lobes.norms import SingleGroupNorm
from speechbrain_mamba.ops import layer_norm, rms_norm, single_group_norm
from speechbrain_mamba.ops.norm import load_triton_norms
from triton_interpret import interpreted

HAS_CUDA = torch.cuda.is_available()
EPS = 1e-5
KINDS = ["rms", "layer"]


def definition(kind, x, weight, bias, eps=EPS):
    """The norm in float64: ``(x - mean) / sqrt(var + eps) * weight + bias``; RMSNorm: no mean, no bias."""
    x64 = x.double()
    if kind == "layer":
        x64 = x64 - x64.mean(-1, keepdim=True)
    out = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out if bias is None else out + bias.double()


def make_inputs(kind, shape, dtype=torch.float32, seed=0):
    """x (shifted, so that LayerNorm's mean matters), weight, bias (LayerNorm only), grad_out."""
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g) + 0.5).to(dtype)
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    bias = 0.5 * torch.randn(shape[-1], generator=g) if kind == "layer" else None
    grad_out = torch.randn(*shape, generator=g).to(dtype)
    return (x.requires_grad_(), weight.requires_grad_(), None if bias is None else bias.requires_grad_(),
            grad_out)


def public(kind, backend=None):
    """The public function of ``kind`` as ``fn(x, weight, bias)``."""
    if kind == "rms":
        return lambda x, w, b: rms_norm(x, w, EPS, backend=backend)
    return lambda x, w, b: layer_norm(x, w, b, EPS, backend=backend)


def interpreted_fn(kernels, kind):
    if kind == "rms":
        return lambda x, w, b: kernels.rms_norm_triton(x, w, EPS)
    return lambda x, w, b: kernels.layer_norm_triton(x, w, b, EPS)


def forward_and_grads(fn, x, weight, bias, grad_out):
    out = fn(x, weight, bias)
    inputs = [t for t in (x, weight, bias) if t is not None]
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def assert_matches_definition(kind, fn, x, weight, bias, grad_out, atol):
    out, *grads = forward_and_grads(fn, x, weight, bias, grad_out)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref_out, *ref_grads = forward_and_grads(lambda *a: definition(kind, *a), *ref_inputs, grad_out.double())
    assert out.dtype == x.dtype and out.shape == x.shape
    assert [g.dtype for g in grads] == [t.dtype for t in (x, weight, bias) if t is not None]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], atol=atol, rtol=atol)
    for grad, ref in zip(grads[1:], ref_grads[1:]):  # sums over every row
        torch.testing.assert_close(grad.double(), ref, atol=atol * x.numel() ** 0.5, rtol=atol)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_matches_definition(kind):
    assert_matches_definition(kind, public(kind, "torch"), *make_inputs(kind, (3, 7, 12)), atol=1e-5)


def test_modules_match_definition_and_keep_their_parameters():
    x = make_inputs("layer", (2, 5, 12))[0].detach()
    rms, layer = RMSNorm(12, eps=EPS), LayerNorm(12, eps=EPS)
    with torch.no_grad():
        layer.bias.normal_()
    assert torch.equal(rms.weight, torch.ones(12))
    assert isinstance(layer, torch.nn.LayerNorm) and set(layer.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(rms(x).double(), definition("rms", x, rms.weight, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x).double(), definition("layer", x, layer.weight, layer.bias), atol=1e-5,
                               rtol=1e-5)


def test_bad_arguments_are_refused(monkeypatch):
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"weight must be \(4,\) for x of shape \(2, 3, 4\); got \(5,\)"):
        rms_norm(x, torch.ones(5))
    with pytest.raises(ValueError, match=r"bias must be \(4,\) for x of shape \(2, 3, 4\); got \(3,\)"):
        layer_norm(x, torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"backend='cuda'.*'auto', 'torch', 'triton'"):
        rms_norm(x, torch.ones(4), backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors only.*x is on cpu"):
        layer_norm(x, torch.ones(4), None, backend="triton")


# ---------------------------------------------------------------- Triton kernels, interpreted

@pytest.fixture(scope="class")  # torn down after the class: the CUDA tests then compile
def kernels():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    with interpreted("speechbrain_mamba.ops.norm_triton", forget=[load_triton_norms]) as module:
        module._TILE_ELEMENTS = 32  # 2 rows of 12 (16 padded) features per tile
        yield module


def strided(kind, shape):
    """A view with unit feature stride whose leading dims are not contiguous (the intra-chunk stack's input)."""
    x, weight, bias, grad_out = make_inputs(kind, (shape[1], shape[0], shape[2]))
    return x.detach().transpose(0, 1).requires_grad_(), weight, bias, grad_out.transpose(0, 1)


@pytest.mark.parametrize("kind", KINDS)
class TestInterpretedKernels:
    """The kernels on the CPU with 2-row tiles; the interpreted module is gone before the CUDA tests run."""

    @pytest.mark.parametrize("shape", [(3, 7, 12), (37, 12), (1, 1, 5), (2, 3, 4, 12)], ids=str)
    def test_triton_matches_definition(self, kernels, kind, shape):
        assert_matches_definition(kind, interpreted_fn(kernels, kind), *make_inputs(kind, shape), atol=1e-5)

    def test_triton_reads_strided_rows_and_gradients_in_place(self, kernels, kind):
        x, weight, bias, grad_out = strided(kind, (3, 7, 12))
        assert not x.is_contiguous() and not grad_out.is_contiguous()
        assert_matches_definition(kind, interpreted_fn(kernels, kind), x, weight, bias, grad_out, atol=1e-5)

    def test_triton_bf16_input_keeps_its_dtype(self, kernels, kind):
        # Against the definition on the same bf16 values: only the output's and dx's roundings differ.
        assert_matches_definition(kind, interpreted_fn(kernels, kind),
                                  *make_inputs(kind, (3, 7, 12), dtype=torch.bfloat16), atol=2e-2)

    def test_triton_edge_shapes_and_layouts(self, kernels, kind):
        fn = interpreted_fn(kernels, kind)
        assert_matches_definition(kind, fn, *make_inputs(kind, (12,)), atol=1e-5)  # one row
        x, weight, bias, grad_out = make_inputs(kind, (3, 7, 24))
        every_other = x.detach()[..., ::2].requires_grad_()  # feature stride 2: read from a copy
        assert_matches_definition(kind, fn, every_other, weight[:12].detach().requires_grad_(),
                                  None if bias is None else bias[:12].detach().requires_grad_(),
                                  grad_out[..., ::2], atol=1e-5)
        strided_weight = torch.randn(12, 2)[:, 0].requires_grad_()  # read from a copy, gradient passed back
        assert_matches_definition(kind, fn, *make_inputs(kind, (3, 7, 12))[:1], strided_weight, None,
                                  make_inputs(kind, (3, 7, 12))[3], atol=1e-5)
        empty = torch.zeros(2, 3, 0, 12, requires_grad=True)
        out = fn(empty, weight[:12].detach(), None)
        assert out.shape == empty.shape and torch.autograd.grad(out.sum(), empty)[0].shape == empty.shape

    def test_triton_reads_the_rows_of_a_view_in_place(self, kernels, kind):
        x = strided(kind, (3, 7, 12))[0]
        assert kernels._rows(x)[0].data_ptr() == x.data_ptr()

    def test_triton_refuses_double_backward(self, kernels, kind):
        x, weight, bias, _ = make_inputs(kind, (3, 7, 12))
        (dx,) = torch.autograd.grad(interpreted_fn(kernels, kind)(x, weight, bias).pow(2).sum(), x,
                                    create_graph=True)
        with pytest.raises(RuntimeError, match="twice|double|once"):
            dx.sum().backward()

    def test_public_function_dispatches_to_triton_when_interpreting(self, kernels, kind, monkeypatch):
        original, calls = kernels._forward, []

        def recorded(*args, **kwargs):
            calls.append(tuple(args[0].shape))
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, "_forward", recorded)
        x, weight, bias, _ = make_inputs(kind, (2, 3, 12))
        bias = None if bias is None else bias.detach()
        public(kind)(x.detach(), weight.detach(), bias)
        assert calls == [(2, 3, 12)]
        public(kind)(x.detach().double(), weight.detach().double(), None if bias is None else bias.double())
        assert calls == [(2, 3, 12)], "float64 should stay on PyTorch (the kernels compute in fp32)"

    def test_triton_without_autograd_gives_autograds_output(self, kernels, kind):
        x, weight, bias, _ = make_inputs(kind, (3, 7, 12))
        with torch.no_grad():
            plain = interpreted_fn(kernels, kind)(x, weight, bias)
        assert torch.equal(plain, interpreted_fn(kernels, kind)(x, weight, bias).detach())

    def test_triton_without_bias(self, kernels, kind):
        x, weight, _, grad_out = make_inputs(kind, (3, 7, 12))
        assert_matches_definition(kind, interpreted_fn(kernels, kind), x, weight, None, grad_out, atol=1e-5)

    def test_triton_gradient_of_x_alone(self, kernels, kind):
        x, weight, bias, grad_out = make_inputs(kind, (3, 7, 12))
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        (dx,) = torch.autograd.grad(interpreted_fn(kernels, kind)(x, weight, bias), x, grad_out)
        ref_x = x.detach().double().requires_grad_()
        (ref_dx,) = torch.autograd.grad(definition(kind, ref_x, weight, bias), ref_x, grad_out.double())
        torch.testing.assert_close(dx.double(), ref_dx, atol=1e-5, rtol=1e-5)

    def test_triton_refuses_what_the_kernels_cannot_do(self, kernels, kind, monkeypatch):
        fn = interpreted_fn(kernels, kind)
        with pytest.raises(ValueError, match="1 to 8192 features; x has 8193"):
            fn(torch.zeros(1, 8193), torch.ones(8193), None)
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="CUDA tensors only.*x is on cpu"):
            fn(torch.zeros(1, 4), torch.ones(4), None)


# ---------------------------------------------------------------- the single-group norm (GroupNorm(1, C))

def group_definition(x, weight, bias, residual, eps=EPS):
    """``GroupNorm(1, C)(x) + residual`` in float64."""
    x64, dims = x.double(), tuple(range(1, x.dim()))
    out = (x64 - x64.mean(dims, keepdim=True)) * torch.rsqrt(x64.var(dims, unbiased=False, keepdim=True) + eps)
    view = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.double().view(view) + bias.double().view(view)
    return out if residual is None else out + residual.double()


def group_inputs(shape, dtype=torch.float32, residual_dtype=torch.float32, channels_last=False, affine=True,
                 seed=0):
    """x (mean far from 0, varying along positions: Chan's merge matters), weight, bias, residual (in the
    dual-path layers' other layout when ``channels_last``: channels innermost, the position dims swapped),
    grad_out."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=g) + 20 + torch.linspace(0, 4, shape[-1])
    residual = torch.randn(*shape, generator=g)
    if channels_last:  # x: [B, S, K, N] storage seen as [B, N, K, S]; residual: [B, K, S, N] storage
        x = x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
        residual = residual.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    weight = (1 + 0.5 * torch.randn(shape[1], generator=g)).requires_grad_() if affine else None
    bias = (0.5 * torch.randn(shape[1], generator=g)).requires_grad_() if affine else None
    grad_out = torch.randn(*shape, generator=g)
    return (x.to(dtype).requires_grad_(), weight, bias, residual.to(residual_dtype).requires_grad_(), grad_out)


def assert_group_matches_definition(fn, x, weight, bias, residual, grad_out, atol):
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    out = fn(x, weight, bias, residual)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    ref_out = group_definition(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, [t for t in ref_inputs if t is not None], grad_out.double())
    assert out.shape == x.shape
    assert out.dtype == (x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    for grad, ref in zip(grads, ref_grads):
        scale = 1 if grad.shape == x.shape else x[0, 0].numel() ** 0.5  # weight and bias: sums over positions
        torch.testing.assert_close(grad.double(), ref, atol=atol * scale, rtol=atol)


def public_group(backend=None):
    return lambda x, w, b, r: single_group_norm(x, w, b, EPS, r, backend=backend)


@pytest.mark.parametrize("shape", [(2, 12, 23), (2, 12, 5, 3)], ids=str)
def test_single_group_norm_torch_path_matches_definition(shape):
    assert_group_matches_definition(public_group("torch"), *group_inputs(shape), atol=1e-5)


def test_single_group_norm_torch_path_keeps_float64():
    x, weight, bias, residual, grad_out = (t.detach().double() for t in group_inputs((2, 12, 5, 3)))
    out = single_group_norm(x, weight, bias, EPS, residual)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, group_definition(x, weight, bias, residual), atol=1e-12, rtol=1e-12)


def test_single_group_norm_module_adds_its_residual_in_the_residuals_layout():
    x, _, _, residual, _ = group_inputs((2, 12, 5, 3), channels_last=True)
    norm, reference = SingleGroupNorm(12, eps=EPS), torch.nn.GroupNorm(1, 12, eps=EPS)
    out = norm(x, residual)
    torch.testing.assert_close(out, reference(x) + residual, atol=1e-5, rtol=1e-5)
    assert out.stride() == residual.stride()


def test_single_group_norm_refuses_bad_arguments():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"weight must be \(3,\) for x of shape \(2, 3, 4\); got \(4,\)"):
        single_group_norm(x, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="both weight and bias, or neither"):
        single_group_norm(x, torch.ones(3), None)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(2, 3, 4\); got \(2, 3, 1\)"):
        single_group_norm(x, None, None, residual=torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"SingleGroupNorm expects \[batch, 5, ...\]; got \(2, 3, 4\)"):
        SingleGroupNorm(5)(x)


class TestInterpretedSingleGroupNorm:
    """The kernels on the CPU with 2 positions of 12 (16 padded) channels per tile: each sample spans several
    programs (4 in all), each looping over several tiles, the last partly masked; with batch 1, programs also
    pass the last tile."""

    @pytest.mark.parametrize("case", ["3d", "4d", "channels-last", "no-affine", "no-residual", "past-the-end"])
    def test_triton_matches_definition(self, kernels, case):
        # (1, 12, 19): 10 tiles over 4 programs of 3 tiles, the last program's third tile past the end.
        shape = {"3d": (2, 12, 23), "past-the-end": (1, 12, 19)}.get(case, (2, 12, 5, 3))
        x, weight, bias, residual, grad_out = group_inputs(shape, channels_last=case == "channels-last",
                                                           affine=case != "no-affine")
        assert_group_matches_definition(
            lambda *a: kernels.single_group_norm_triton(*a[:3], EPS, a[3]), x, weight, bias,
            None if case == "no-residual" else residual, grad_out, atol=1e-5)

    @pytest.mark.parametrize("residual_dtype", [torch.bfloat16, torch.float32], ids=str)
    def test_triton_bf16_input_and_the_residuals_dtype(self, kernels, residual_dtype):
        # Against the definition on the same bf16 values: only the output's and dx's roundings differ.
        inputs = group_inputs((2, 12, 5, 3), torch.bfloat16, residual_dtype, channels_last=True)
        assert_group_matches_definition(lambda *a: kernels.single_group_norm_triton(*a[:3], EPS, a[3]), *inputs,
                                        atol=3e-2)

    def test_triton_writes_the_residuals_layout_and_reads_views_in_place(self, kernels):
        x, weight, bias, residual, grad_out = group_inputs((2, 12, 5, 3), channels_last=True)
        out = kernels.single_group_norm_triton(x, weight, bias, EPS, residual)
        assert out.stride() == residual.stride() != x.stride()
        alone = kernels.single_group_norm_triton(x, weight, bias, EPS)
        assert alone.stride() == x.stride()
        (dx,) = torch.autograd.grad(alone, x, grad_out.transpose(2, 3).contiguous().transpose(2, 3))
        assert dx.stride() == x.stride()

    def test_triton_without_autograd_gives_autograds_output(self, kernels):
        x, weight, bias, residual, _ = group_inputs((2, 12, 5, 3), channels_last=True)
        with torch.no_grad():
            plain = kernels.single_group_norm_triton(x, weight, bias, EPS, residual)
        assert torch.equal(plain, kernels.single_group_norm_triton(x, weight, bias, EPS, residual).detach())

    def test_triton_refuses_double_backward_and_what_the_kernels_cannot_do(self, kernels):
        x, weight, bias, _, _ = group_inputs((2, 12, 5, 3))
        (dx,) = torch.autograd.grad(kernels.single_group_norm_triton(x, weight, bias, EPS).pow(2).sum(), x,
                                    create_graph=True)
        with pytest.raises(RuntimeError, match="twice|double|once"):
            dx.sum().backward()
        with pytest.raises(ValueError, match=r"takes \[B, C, L\] or \[B, C, P1, P2\]; x is \(1, 2, 3, 4, 5\)"):
            kernels.single_group_norm_triton(torch.zeros(1, 2, 3, 4, 5), None, None, EPS)
        with pytest.raises(ValueError, match="1 to 8192 features; x has 8193"):
            kernels.single_group_norm_triton(torch.zeros(1, 8193, 2), None, None, EPS)
        with pytest.raises(ValueError, match="both weight and bias, or neither"):
            kernels.single_group_norm_triton(x.detach(), weight.detach(), None, EPS)

    def test_triton_empty_input_stays_differentiable(self, kernels):
        x = torch.zeros(2, 12, 0, requires_grad=True)
        out = kernels.single_group_norm_triton(x, None, None, EPS, torch.zeros(2, 12, 0))
        assert out.shape == x.shape and torch.autograd.grad(out.sum(), x)[0].shape == x.shape

    def test_triton_gradient_of_the_residual_alone(self, kernels):
        x, weight, bias, residual, grad_out = group_inputs((2, 12, 5, 3))
        (d_residual,) = torch.autograd.grad(
            kernels.single_group_norm_triton(x.detach(), weight.detach(), bias.detach(), EPS, residual), residual,
            grad_out)
        assert torch.equal(d_residual, grad_out)

    def test_public_function_and_dual_path_layer_run_the_kernels_when_interpreting(self, kernels, monkeypatch):
        from speechbrain_mamba.lobes import DualPathModel, MambaStack

        calls = []
        original = kernels._group_forward
        monkeypatch.setattr(kernels, "_group_forward",
                            lambda *args, **kwargs: calls.append(args[3] is not None) or original(*args, **kwargs))
        x, weight, bias, residual, _ = group_inputs((2, 12, 5, 3))
        single_group_norm(x, weight, bias, EPS, residual)
        single_group_norm(x.double(), weight.double(), bias.double(), EPS)  # float64 stays on PyTorch
        assert calls == [True]
        torch.manual_seed(0)
        masknet = DualPathModel(12, 12, MambaStack(12, scan_backend="torch"), MambaStack(12, scan_backend="torch"),
                                num_layers=1, K=4, num_spks=1, linear_layer_after_inter_intra=False).eval()
        mixture = torch.randn(1, 12, 9)
        with torch.no_grad():
            fused = masknet(mixture)
            # The entry norm, then each layer's two norms with their residual sums.
            assert calls[1:] == [False, True, True]
            for module in masknet.modules():
                if isinstance(module, SingleGroupNorm):
                    module.forward = lambda x, residual=None, m=module: single_group_norm(
                        x, m.weight, m.bias, m.eps, residual, backend="torch")
            torch.testing.assert_close(fused, masknet(mixture), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not HAS_CUDA or load_triton_norms() is None, reason="needs CUDA and triton")


@cuda_only
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("shape", [(132, 250, 256), (1000, 33, 256), (2, 16000, 64), (1, 4000, 1024)], ids=str)
def test_cuda_triton_matches_torch(shape, layout, dtype, kind):
    x, weight, bias, grad_out = strided(kind, shape) if layout == "strided" else make_inputs(kind, shape)
    x = x.detach().to("cuda", dtype).requires_grad_()
    weight, grad_out = weight.detach().cuda().requires_grad_(), grad_out.to("cuda", dtype)
    bias = None if bias is None else bias.detach().cuda().requires_grad_()
    triton_out, *triton_grads = forward_and_grads(public(kind, "triton"), x, weight, bias, grad_out)
    # PyTorch's layer_norm takes no bf16 input with fp32 parameters outside autocast: given in fp32.
    reference = public(kind, "torch") if kind == "rms" else (
        lambda x, w, b: F.layer_norm(x.float(), (x.shape[-1],), w, b, EPS).to(x.dtype))
    torch_out, *torch_grads = forward_and_grads(reference, x, weight, bias, grad_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output and of dx
    torch.testing.assert_close(triton_out, torch_out, atol=tol, rtol=tol)
    torch.testing.assert_close(triton_grads[0], torch_grads[0], atol=tol, rtol=tol)
    for triton_grad, torch_grad in zip(triton_grads[1:], torch_grads[1:]):
        # Sums of a product over every row in fp32 on both backends, in different orders.
        torch.testing.assert_close(triton_grad, torch_grad, atol=1e-4 * x[..., 0].numel() ** 0.5, rtol=1e-4)


@cuda_only
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_triton_parameter_gradients_are_deterministic(kind):
    x, weight, bias, grad_out = (t if t is None else t.detach().cuda() for t in make_inputs(kind, (64, 250, 256)))
    params = [t.requires_grad_() for t in (weight, bias) if t is not None]
    grads = [torch.autograd.grad(public(kind)(x, weight, bias), params, grad_out) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@cuda_only
@pytest.mark.parametrize("module_class", [RMSNorm, LayerNorm])
def test_cuda_modules_under_autocast_give_torchs_dtypes(module_class):
    norm = module_class(256).cuda()
    x = torch.randn(4, 100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = norm(x)
        expected = (F.rms_norm(x.float(), (256,), norm.weight, norm.eps).to(x.dtype) if module_class is RMSNorm
                    else F.layer_norm(x, (256,), norm.weight, norm.bias, norm.eps))
    out.float().sum().backward()
    assert out.dtype == expected.dtype and x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, expected.detach(), atol=1e-2, rtol=1e-2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 256, 250, 34), (4, 256, 250, 34), (1, 256, 250, 482), (2, 64, 12000)],
                         ids=str)
def test_cuda_single_group_norm_matches_torch(shape, dtype):
    x, weight, bias, residual, grad_out = group_inputs(shape, dtype, dtype, channels_last=len(shape) == 4)
    cuda = [t.detach().cuda().requires_grad_() for t in (x, weight, bias, residual)]
    outs, grads = [], []
    for backend in ("triton", "torch"):
        out = public_group(backend)(*cuda)
        outs.append(out)
        grads.append(torch.autograd.grad(out, cuda, grad_out.to("cuda", out.dtype)))
    # bf16: the torch path rounds the norm before adding the residual, the kernel after.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
    assert outs[0].stride() == cuda[3].stride()
    for triton_grad, torch_grad in zip(*grads):
        scale = 1 if triton_grad.shape == x.shape else x[0, 0].numel() ** 0.5
        torch.testing.assert_close(triton_grad, torch_grad, atol=tol * scale, rtol=tol)


@cuda_only
def test_cuda_single_group_norm_is_deterministic():
    inputs = group_inputs((2, 256, 250, 34), channels_last=True)
    x, weight, bias, residual, grad_out = (t.detach().cuda() for t in inputs)
    params = [weight.requires_grad_(), bias.requires_grad_(), x.requires_grad_()]
    runs = [torch.autograd.grad(single_group_norm(x, weight, bias, EPS, residual), params, grad_out)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
