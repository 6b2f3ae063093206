"""Every selective-scan backend against the step-by-step loop reference."""

import importlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from speechbrain_mamba.ops import BACKEND_ENV_VAR, resolve_backend, selective_scan

# mamba-ssm's own tests: rtol/atol about 6e-4/2e-3 in fp32, looser in bf16.
TOLERANCE = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 6e-2)}
CPU_BACKENDS = ["torch"]
GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_inputs(batch, channels, state, length, groups=None, dtype=torch.float32, device="cpu",
                with_D=True, with_z=True, with_bias=True, with_initial=False):
    """Random inputs in the ranges Mamba produces (negative A, modest dt)."""
    g = torch.Generator().manual_seed(batch * 1000 + channels * 100 + length)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    inputs = {
        "u": rand(batch, channels, length).to(dtype),
        "delta": (0.5 * rand(batch, channels, length)).to(dtype),
        "A": -0.5 - torch.rand(channels, state, generator=g) * 4,
        "B": rand(*bc_shape).to(dtype),
        "C": rand(*bc_shape).to(dtype),
        "D": rand(channels) if with_D else None,
        "z": rand(batch, channels, length).to(dtype) if with_z else None,
        "delta_bias": (0.5 * rand(channels) - 1) if with_bias else None,
        "initial_state": rand(batch, channels, state) if with_initial else None,
    }
    return {k: (v.to(device).requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run_scan(inputs, backend, reverse=False, state_in_loss=True):
    """Output, last state and gradients of a weighted loss (of y, and of the last state) for all inputs."""
    y, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True,
                             reverse=reverse, backend=backend)
    weights = torch.linspace(-1, 1, y.shape[-1], device=y.device)
    loss = (y.float() * weights).sum()
    if state_in_loss:
        loss = loss + last.pow(2).sum()
    names = [n for n in GRAD_NAMES if inputs[n] is not None]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names])
    return y, last, dict(zip(names, grads))


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


CASES = [
    # batch, channels, state, length, groups, D, z, bias, initial, reverse
    (2, 8, 4, 1, None, True, True, True, False, False),
    (2, 8, 4, 1, None, True, True, True, True, True),
    (1, 4, 16, 2, None, False, False, False, False, False),
    (3, 6, 4, 17, None, True, False, True, False, True),
    (2, 8, 16, 63, 2, True, True, True, True, False),
    (2, 8, 8, 128, None, False, True, False, False, True),
    (1, 16, 16, 251, 4, True, True, True, False, False),
    (2, 4, 4, 1000, None, True, True, True, True, True),
    (1, 4, 4, 4096, None, True, True, True, False, False),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}e{c[1]}n{c[2]}L{c[3]}g{c[4]}-D{c[5]:d}z{c[6]:d}"
                         f"bias{c[7]:d}h0{c[8]:d}rev{c[9]:d}")
def test_backend_matches_reference_fp32(backend, case):
    batch, channels, state, length, groups, with_D, with_z, with_bias, with_initial, reverse = case
    inputs = make_inputs(batch, channels, state, length, groups, with_D=with_D, with_z=with_z,
                         with_bias=with_bias, with_initial=with_initial)
    y_ref, last_ref, grads_ref = run_scan(inputs, "reference", reverse)
    y, last, grads = run_scan(inputs, backend, reverse)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(last, last_ref, torch.float32, "last state")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], torch.float32, f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_backend_matches_reference_bf16(backend, reverse):
    inputs = make_inputs(2, 8, 16, 200, dtype=torch.bfloat16)
    y_ref, last_ref, grads_ref = run_scan(inputs, "reference", reverse)
    y, last, grads = run_scan(inputs, backend, reverse)
    assert y.dtype == torch.bfloat16, "output keeps u's dtype"
    assert_close(y, y_ref, torch.bfloat16, "output")
    assert_close(last, last_ref, torch.float32, "last state")
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype
        assert_close(grads[name], grads_ref[name], torch.bfloat16, f"grad {name}")


def test_reference_reverse_is_the_flipped_scan():
    """Independent definition of reverse: the forward scan of time-flipped inputs, flipped back."""
    inputs = make_inputs(2, 6, 4, 33)
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    y_flip, last_flip = selective_scan(**flipped, delta_softplus=True, return_last_state=True,
                                       backend="reference")
    for backend in ["reference"] + CPU_BACKENDS:
        y, last = selective_scan(**inputs, delta_softplus=True, reverse=True,
                                 return_last_state=True, backend=backend)
        assert_close(y, y_flip.flip(-1), torch.float32, backend)
        assert_close(last, last_flip, torch.float32, backend)


def test_known_values_of_a_one_state_scan():
    """h_t = exp(-dt) h_{t-1} + dt * u_t with dt=ln 2, u=1: h = ln2 * (1, 1.5, 1.75)."""
    u = torch.ones(1, 1, 3)
    delta = torch.full((1, 1, 3), 0.6931471805599453)
    A = -torch.ones(1, 1)
    B = C = torch.ones(1, 1, 3)
    expected = 0.6931471805599453 * torch.tensor([1.0, 1.5, 1.75])
    for backend in ["reference"] + CPU_BACKENDS:
        y = selective_scan(u, delta, A, B, C, backend=backend)
        torch.testing.assert_close(y.view(-1), expected)


def test_chunked_state_carry_splits_exactly():
    """Scanning [0, t) then [t, L) from the carried state equals one scan (streaming)."""
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(1, 4, 4, 40).items()}
    whole, whole_last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="torch")
    part = lambda t, sl: t[..., sl] if t is not None and t.dim() == 3 else t  # noqa: E731
    first = {k: part(v, slice(0, 15)) for k, v in inputs.items()}
    second = {k: part(v, slice(15, None)) for k, v in inputs.items()}
    y1, state = selective_scan(**first, delta_softplus=True, return_last_state=True, backend="torch")
    second["initial_state"] = state
    y2, last = selective_scan(**second, delta_softplus=True, return_last_state=True, backend="torch")
    assert_close(torch.cat([y1, y2], -1), whole, torch.float32, "output")
    assert_close(last, whole_last, torch.float32, "last state")


def test_backend_choice(monkeypatch):
    u = torch.zeros(1, 1, 1)
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend(u) == "torch", "CPU tensors use the PyTorch backend"
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    assert resolve_backend(u) == "reference"
    assert resolve_backend(u, "torch") == "torch", "the argument wins over the environment"
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend(u)
    with pytest.raises(ValueError, match="backend='cuda'"):
        resolve_backend(u, "cuda")


def test_auto_prefers_triton_then_mamba_ssm_on_cuda(monkeypatch):
    """Our Triton kernels first (faster in our mixers, benchmarks/results/mamba_ssm_2026-11-25_h100/), then
    mamba-ssm's kernel (no initial state), then PyTorch; the GPU is faked: only ``u.is_cuda`` is read."""
    module = importlib.import_module("speechbrain_mamba.ops.selective_scan")  # the module, not the function
    cuda_tensor = SimpleNamespace(is_cuda=True)
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(module, "load_triton_scan", lambda: module.selective_scan_triton)
    monkeypatch.setattr(module, "load_mamba_ssm_scan", lambda: module.selective_scan_mamba_ssm)
    assert resolve_backend(cuda_tensor) == "triton"
    monkeypatch.setattr(module, "load_triton_scan", lambda: None)
    assert resolve_backend(cuda_tensor) == "mamba_ssm"
    assert resolve_backend(cuda_tensor, initial_state=torch.zeros(1)) == "torch"
    monkeypatch.setattr(module, "load_mamba_ssm_scan", lambda: None)
    assert resolve_backend(cuda_tensor) == "torch"


def test_mamba_ssm_backend_refuses_cpu_clearly():
    inputs = make_inputs(1, 2, 2, 4)
    with pytest.raises((RuntimeError, ValueError), match="mamba_ssm"):
        selective_scan(**inputs, backend="mamba_ssm")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"u": torch.zeros(2, 8)}, "u must be"),
        ({"delta": torch.zeros(2, 8, 9)}, "delta must"),
        ({"A": torch.zeros(7, 4)}, "A must be"),
        ({"B": torch.zeros(2, 4, 9)}, "B must be"),
        ({"C": torch.zeros(2, 3, 4, 10)}, "C must be"),
        ({"D": torch.zeros(3)}, "D must be"),
        ({"initial_state": torch.zeros(2, 8, 5)}, "initial_state must be"),
        ({"output_add": torch.zeros(2, 8, 9)}, "output_add must"),
    ],
)
def test_bad_shapes_are_named(change, message):
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(2, 8, 4, 10).items()}
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_output_scale_and_add(backend):
    """``output_scale * y + output_add``, and the added tensor's gradient is the output's."""
    inputs = make_inputs(2, 4, 4, 9)
    add = torch.randn(2, 4, 9, requires_grad=True)
    plain = selective_scan(**inputs, delta_softplus=True, backend=backend)
    y = selective_scan(**inputs, delta_softplus=True, output_scale=0.5, output_add=add, backend=backend)
    torch.testing.assert_close(y, 0.5 * plain + add)
    weights = torch.randn(y.shape)
    grad_add, grad_u = torch.autograd.grad((y * weights).sum(), [add, inputs["u"]])
    (plain_grad_u,) = torch.autograd.grad((plain * weights).sum(), [inputs["u"]])
    torch.testing.assert_close(grad_add, weights)
    torch.testing.assert_close(grad_u, 0.5 * plain_grad_u)


def test_import_loads_neither_mamba_ssm_nor_triton():
    code = (
        "import sys, torch, speechbrain_mamba, speechbrain_mamba.lobes, speechbrain_mamba.ops\n"
        "m = speechbrain_mamba.lobes.BiMamba(8)\n"
        "m(torch.randn(1, 5, 8)).sum().backward()\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('mamba_ssm', 'selective_scan_cuda', 'triton')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_backend_under_bf16_autocast_matches_reference():
    """Autocast must not lower the scan's internal products to bf16 (nor break its backward)."""
    inputs = make_inputs(2, 8, 4, 40, dtype=torch.bfloat16, with_initial=False)
    y_ref, _, grads_ref = run_scan(inputs, "reference", reverse=False, state_in_loss=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _, grads = run_scan(inputs, "torch", reverse=False, state_in_loss=False)
    assert_close(y, y_ref, torch.bfloat16, "output")
    for name in grads:
        assert_close(grads[name], grads_ref[name], torch.bfloat16, f"grad {name}")


@pytest.mark.parametrize("reverse", [False, True])
def test_two_backward_passes_through_a_retained_graph_match_the_reference(reverse):
    """The backward must leave the tensors it saved intact: a second pass gives the same gradients."""
    inputs = make_inputs(2, 8, 4, 37, groups=2, with_initial=True)
    names = [n for n in GRAD_NAMES if inputs[n] is not None]
    results = {}
    for backend in ("reference", "torch"):
        y, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, reverse=reverse,
                                 backend=backend)
        loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + last.pow(2).sum()
        results[backend] = [torch.autograd.grad(loss, [inputs[n] for n in names], retain_graph=True)
                            for _ in range(2)]
    for attempt, (grads, ref_grads) in enumerate(zip(results["torch"], results["reference"])):
        for name, grad, ref_grad in zip(names, grads, ref_grads):
            assert_close(grad, ref_grad, torch.float32, f"pass {attempt + 1}, grad {name}")


@pytest.mark.parametrize(
    "B_shape, C_shape, message",
    [
        ((2, 2, 4, 10), (2, 4, 4, 10), r"same number of groups; got B \(2, 2, 4, 10\) and C \(2, 4, 4, 10\)"),
        ((2, 4, 10), (2, 2, 4, 10), r"B and C must have the same number of groups"),
        ((2, 0, 4, 10), (2, 0, 4, 10), r"B must be .*got \(2, 0, 4, 10\)"),
        ((2, 1, 4, 10), (2, 0, 4, 10), r"C must be .*got \(2, 0, 4, 10\)"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_b_and_c_group_counts_must_agree_and_be_positive(backend, B_shape, C_shape, message):
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(2, 8, 4, 10).items()}
    inputs.update(B=torch.randn(B_shape), C=torch.randn(C_shape))
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs, backend=backend)
