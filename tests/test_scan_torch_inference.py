"""The PyTorch scan's inference path (no autograd, cache-sized blocks) against the loop reference."""

import pytest
import torch

from speechbrain_mamba.ops import scan_torch, selective_scan
from test_selective_scan import assert_close, make_inputs

CASES = [
    # batch, channels, state, length, groups, D, z, bias, initial, reverse, softplus
    (2, 8, 4, 1, None, True, True, True, False, False, True),
    (2, 8, 4, 1, None, True, True, True, True, True, True),
    (1, 4, 16, 2, None, False, False, False, False, False, False),
    (3, 6, 4, 17, None, True, False, True, False, True, True),
    (2, 8, 16, 63, 2, True, True, True, True, False, True),
    (3, 8, 8, 128, None, False, True, False, False, True, False),
    (1, 16, 16, 251, 4, True, True, True, False, False, True),
    (5, 4, 4, 100, None, True, True, True, True, True, True),
    (2, 4, 4, 1000, None, True, True, True, True, True, True),
]
CASE_ID = "b{}e{}n{}L{}g{}-D{:d}z{:d}bias{:d}h0{:d}rev{:d}sp{:d}"
# Values per block buffer, from a sequence's states at one frame (``frame``): one
# frame of one sequence, frames of two sequences, three frames of the whole batch.
BLOCKS = {
    "one": lambda batch, frame: 1,
    "rows": lambda batch, frame: 2 * frame,
    "frames": lambda batch, frame: 3 * batch * frame,
    "default": lambda batch, frame: scan_torch.INFERENCE_BLOCK_VALUES,
}


def detached(inputs):
    """The inputs without requires_grad."""
    return {k: (v.detach() if v is not None else None) for k, v in inputs.items()}


def scan(inputs, reverse, backend, softplus=True, **kwargs):
    """(y, last state) without gradients."""
    with torch.no_grad():
        return selective_scan(**inputs, delta_softplus=softplus, return_last_state=True, reverse=reverse,
                              backend=backend, **kwargs)


def scan_both(inputs, reverse, softplus=True, **kwargs):
    """(y, last state) of the torch backend and of the reference."""
    return [scan(inputs, reverse, backend, softplus, **kwargs) for backend in ("torch", "reference")]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: CASE_ID.format(*c))
def test_inference_matches_reference(monkeypatch, case, block):
    batch, channels, state, length, groups, with_D, with_z, with_bias, with_initial, reverse, softplus = case
    monkeypatch.setattr(scan_torch, "INFERENCE_BLOCK_VALUES", BLOCKS[block](batch, channels * state))
    inputs = detached(make_inputs(batch, channels, state, length, groups, with_D=with_D, with_z=with_z,
                                  with_bias=with_bias, with_initial=with_initial))
    # Half of the cases also scale the output and add a tensor (BiMamba's average).
    extra = {"output_scale": 0.5, "output_add": torch.randn(batch, channels, length)} if length % 2 else {}
    (y, last), (y_ref, last_ref) = scan_both(inputs, reverse, softplus, **extra)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(last, last_ref, torch.float32, "last state")


def test_inference_path_is_taken_without_autograd(monkeypatch):
    """no_grad, inference_mode or inputs without requires_grad: no autograd Function; else the chunked scan."""
    inputs = make_inputs(2, 8, 4, 30)

    def refuse(*args):
        raise AssertionError("the autograd Function ran")

    with monkeypatch.context() as patch:
        patch.setattr(scan_torch.SelectiveScanFunction, "apply", refuse)
        with torch.no_grad():
            selective_scan(**inputs, backend="torch")
        with torch.inference_mode():
            selective_scan(**inputs, backend="torch")
        selective_scan(**detached(inputs), backend="torch")
    monkeypatch.setattr(scan_torch, "_selective_scan_inference", refuse)
    selective_scan(**inputs, backend="torch").sum().backward()
    assert inputs["u"].grad is not None


def test_inference_reads_the_lobes_layout():
    """Channel-last transposed views (as lobes/mamba.py passes them); y comes back in that layout."""
    batch, channels, state, length, rank = 3, 8, 4, 37, 2
    g = torch.Generator().manual_seed(1)
    x, z, dt = (torch.randn(batch, length, channels, generator=g) for _ in range(3))
    _, B, C = torch.split(torch.randn(batch, length, rank + 2 * state, generator=g), [rank, state, state], dim=-1)
    inputs = dict(u=x.transpose(1, 2), delta=dt.transpose(1, 2), A=-1 - 4 * torch.rand(channels, state, generator=g),
                  B=B.transpose(1, 2), C=C.transpose(1, 2), D=torch.randn(channels, generator=g), z=z.transpose(1, 2),
                  delta_bias=torch.randn(channels, generator=g), initial_state=None)
    for reverse in (False, True):
        (y, last), (y_ref, last_ref) = scan_both(inputs, reverse)
        assert y.transpose(1, 2).is_contiguous()
        assert_close(y, y_ref, torch.float32, "output")
        assert_close(last, last_ref, torch.float32, "last state")


@pytest.mark.parametrize("reverse", [False, True])
def test_inference_bf16_inputs_and_autocast(reverse):
    """bf16 inputs give a bf16 output; bf16 autocast does not lower the scan's fp32 arithmetic."""
    inputs = detached(make_inputs(2, 8, 16, 200, dtype=torch.bfloat16, with_initial=True))
    (y, last), (y_ref, last_ref) = scan_both(inputs, reverse)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16, "output")
    assert_close(last, last_ref, torch.float32, "last state")

    inputs = detached(make_inputs(2, 8, 4, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, last = scan(inputs, reverse, "torch")
    y_ref, last_ref = scan(inputs, reverse, "reference")
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(last, last_ref, torch.float32, "last state")


def test_inference_softplus_is_softplus_to_an_absolute_1e7():
    """The inference path's vectorised softplus (the Triton kernels' formula) against torch's, in float64,
    from far below the point where softplus underflows to far above; the input is not modified."""
    x = torch.cat([torch.linspace(-40, 40, 100_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    before = x.clone()
    out = scan_torch._softplus_exp2(x)
    expected = torch.nn.functional.softplus(x.double())
    assert torch.equal(x, before)
    torch.testing.assert_close(out.double(), expected, rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_empty_batch_gives_empty_outputs(grad, reverse):
    """Batch 0 gives empty outputs of the reference's shapes and dtypes, with gradients or without."""
    inputs = make_inputs(0, 8, 4, 10, groups=2, with_initial=True)
    if not grad:
        inputs = detached(inputs)
    kwargs = dict(delta_softplus=True, return_last_state=True, reverse=reverse, output_scale=0.5,
                  output_add=torch.zeros(0, 8, 10))
    with torch.set_grad_enabled(grad):
        y, last = selective_scan(**inputs, backend="torch", **kwargs)
        y_ref, last_ref = selective_scan(**inputs, backend="reference", **kwargs)
    for actual, expected in ((y, y_ref), (last, last_ref)):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert y.shape == (0, 8, 10) and last.shape == (0, 8, 4)
