"""GPU behaviour: skipped without CUDA; run on the GPU machine before claiming GPU support."""

import pytest
import torch

from speechbrain_mamba.lobes import BiMamba, SingleGroupNorm
from speechbrain_mamba.ops import resolve_backend, selective_scan
from speechbrain_mamba.ops.scan_mamba_ssm import load_mamba_ssm_scan
from speechbrain_mamba.ops.selective_scan import load_triton_scan
from test_selective_scan import CASES, assert_close, make_inputs, run_scan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HAS_GPU = torch.cuda.is_available()
GPU_BACKENDS = (
    ["torch"]
    + (["triton"] if HAS_GPU and load_triton_scan() else [])
    + (["mamba_ssm"] if HAS_GPU and load_mamba_ssm_scan() else [])
)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}e{c[1]}n{c[2]}L{c[3]}g{c[4]}rev{c[9]:d}")
def test_gpu_backend_matches_reference(backend, dtype, case):
    batch, channels, state, length, groups, with_D, with_z, with_bias, with_initial, reverse = case
    if backend == "mamba_ssm" and with_initial:
        pytest.skip("mamba-ssm's kernel takes no initial state")
    inputs = make_inputs(batch, channels, state, length, groups, dtype=dtype, device="cuda", with_D=with_D,
                         with_z=with_z, with_bias=with_bias, with_initial=with_initial)
    # mamba-ssm's kernel returns its last state without a gradient.
    state_in_loss = backend != "mamba_ssm"
    y_ref, last_ref, grads_ref = run_scan(inputs, "reference", reverse, state_in_loss)
    y, last, grads = run_scan(inputs, backend, reverse, state_in_loss)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "output")
    assert_close(last, last_ref, torch.float32, "last state")
    for name in grads:
        assert_close(grads[name], grads_ref[name], dtype, f"grad {name}")


@pytest.mark.skipif(not torch.cuda.is_available() or not load_mamba_ssm_scan(), reason="needs mamba-ssm")
def test_mamba_ssm_last_state_has_no_gradient():
    inputs = make_inputs(1, 4, 4, 16, device="cuda")
    _, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="mamba_ssm")
    assert not last.requires_grad


def test_auto_backend_on_cuda():
    expected = "mamba_ssm" if load_mamba_ssm_scan() else "triton" if load_triton_scan() else "torch"
    assert resolve_backend(torch.zeros(1, device="cuda")) == expected
    with_state = "triton" if load_triton_scan() else "torch"
    assert resolve_backend(torch.zeros(1, device="cuda"), initial_state=torch.zeros(1, device="cuda")) == with_state


@pytest.mark.skipif(not HAS_GPU or not load_triton_scan(), reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "shape",
    [(2, 64, 16, 250, 1), (1, 32, 16, 5000, 1), (2, 256, 16, 4000, 1), (3, 48, 16, 97, 3), (40, 512, 16, 250, 1),
     (260, 256, 16, 33, 1)],
    ids=lambda s: "b{}e{}n{}L{}g{}".format(*s),
)
def test_triton_on_model_shapes_matches_torch(shape, reverse, dtype):
    """Real tile sizes against the PyTorch backend: several chunks; few long sequences (SepMamba) with the
    frame-by-frame forward kernel over segments of time and the chunked backward kernel over segments;
    the frame-by-frame kernels on DPMamba's many-sequence shapes."""
    batch, channels, state, length, groups = shape
    inputs = make_inputs(batch, channels, state, length, groups, dtype=dtype, device="cuda", with_initial=True)
    y_ref, last_ref, grads_ref = run_scan(inputs, "torch", reverse)
    y, last, grads = run_scan(inputs, "triton", reverse)
    assert_close(y, y_ref, dtype, "output")
    assert_close(last, last_ref, torch.float32, "last state")
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype
        # Sums over thousands of frames: compare relative to the gradient's scale.
        scale = grads_ref[name].float().abs().max().clamp_min(1.0)
        assert_close(grads[name] / scale, grads_ref[name] / scale, dtype, f"grad {name}")


@pytest.mark.skipif(not HAS_GPU or not load_triton_scan(), reason="needs triton")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(40, 512, 16, 250), (260, 256, 16, 33)], ids=lambda s: "b{}e{}n{}L{}".format(*s))
def test_triton_on_channel_last_inputs_as_the_mixer_passes_them(shape, reverse):
    """Frames of the projections, read through transposed views; outputs and gradients in the same layout."""
    batch, channels, state, length = shape
    inputs = make_inputs(batch, channels, state, length, device="cuda")
    for name in ("u", "delta", "z", "B", "C"):
        inputs[name] = inputs[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    y_ref, last_ref, grads_ref = run_scan(inputs, "torch", reverse)
    y, last, grads = run_scan(inputs, "triton", reverse)
    assert y.stride(1) == 1 and grads["u"].stride(1) == 1 and grads["delta"].stride(1) == 1
    assert_close(y, y_ref, torch.float32, "output")
    for name in grads:
        scale = grads_ref[name].abs().max().clamp_min(1.0)
        assert_close(grads[name] / scale, grads_ref[name] / scale, torch.float32, f"grad {name}")


@pytest.mark.skipif(not HAS_GPU or not load_triton_scan(), reason="needs triton")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(33, 512, 250), (250, 512, 33)], ids=lambda s: "b{}e{}L{}".format(*s))
def test_triton_on_views_of_the_mixers_projections(shape, reverse):
    """u and z halves of one in_proj output, B and C slices of one x_proj output (after the dt columns), as
    the mixer passes them to the frame-by-frame kernels on DPMamba's 4 s shapes: y, last state and every
    gradient against the PyTorch backend."""
    batch, channels, length = shape
    state, rank = 16, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, length, 2 * channels, device="cuda", generator=g)
    proj = torch.randn(batch, length, rank + 2 * state, device="cuda", generator=g)
    leaves = dict(
        xz=xz.requires_grad_(), proj=proj.requires_grad_(),
        delta=(0.5 * torch.randn(batch, length, channels, device="cuda", generator=g)).requires_grad_(),
        A=(-torch.rand(channels, state, device="cuda", generator=g) - 0.5).requires_grad_(),
        D=torch.randn(channels, device="cuda", generator=g).requires_grad_(),
        delta_bias=(0.1 * torch.randn(channels, device="cuda", generator=g)).requires_grad_(),
    )
    results = {}
    for backend in ("torch", "triton"):
        y, last = selective_scan(
            xz[..., :channels].transpose(1, 2), leaves["delta"].transpose(1, 2), leaves["A"],
            proj[..., rank:rank + state].transpose(1, 2), proj[..., rank + state:].transpose(1, 2),
            D=leaves["D"], z=xz[..., channels:].transpose(1, 2), delta_bias=leaves["delta_bias"],
            delta_softplus=True, return_last_state=True, reverse=reverse, backend=backend,
        )
        loss = (y * torch.linspace(-1, 1, length, device="cuda")).sum() + last.pow(2).sum()
        results[backend] = (y, last, torch.autograd.grad(loss, list(leaves.values())))
    (y_ref, last_ref, grads_ref), (y, last, grads) = results["torch"], results["triton"]
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(last, last_ref, torch.float32, "last state")
    for name, grad, grad_ref in zip(leaves, grads, grads_ref):
        scale = grad_ref.abs().max().clamp_min(1.0)
        assert_close(grad / scale, grad_ref / scale, torch.float32, f"grad {name}")


def test_bimamba_on_gpu_matches_cpu():
    """Triton convolution and scan on CUDA against the PyTorch ones on the CPU: output and every gradient."""
    mixer = BiMamba(32)
    x = torch.randn(2, 100, 32, requires_grad=True)
    expected = mixer(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x, *mixer.parameters()])
    gpu_mixer, gpu_x = mixer.cuda(), x.detach().cuda().requires_grad_()
    out = gpu_mixer(gpu_x)
    grads = torch.autograd.grad(out.pow(2).sum(), [gpu_x, *gpu_mixer.parameters()])
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.cpu(), expected_grad, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16 = gpu_mixer(gpu_x)
    out_bf16.float().pow(2).sum().backward()
    torch.testing.assert_close(out_bf16.float().cpu(), expected, rtol=0.05, atol=0.05)


def test_cuda_graph_replay_matches_eager_forward():
    from speechbrain_mamba.inference import CUDAGraphCache
    from speechbrain_mamba.separation.separator import separate_mixture
    from conftest import load_model_hparams

    modules = torch.nn.ModuleDict(load_model_hparams("dpmamba_xs")["modules"]).cuda().eval()
    graphed = CUDAGraphCache(lambda mix: separate_mixture(modules, mix, 2), max_graphs=1)
    with torch.inference_mode():
        for samples in (8000, 8000, 12000):  # capture, replay on new data, a second shape evicts the first
            mixture = torch.randn(1, samples, device="cuda")
            torch.testing.assert_close(graphed(mixture), separate_mixture(modules, mixture, 2), rtol=1e-4,
                                       atol=1e-4)
            assert len(graphed) == 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixture = torch.randn(1, 8000, device="cuda")
            replayed = graphed(mixture)
            torch.testing.assert_close(replayed, separate_mixture(modules, mixture, 2), rtol=0.02, atol=0.02)


def test_single_group_norm_on_gpu_matches_group_norm():
    reference = torch.nn.GroupNorm(1, 64, eps=1e-8).cuda()
    fast = SingleGroupNorm(64, eps=1e-8).cuda()
    x = torch.randn(1, 64, 250, 130, device="cuda") * 2 + 0.5
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-4, atol=1e-4)
