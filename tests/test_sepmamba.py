"""SepMamba: exact sizes, shapes, both directions, causality."""

import pytest
import torch

from conftest import load_model_hparams
from speechbrain_mamba.lobes import BidirectionalMambaStack, SepMamba
from speechbrain_mamba.lobes.mamba import MambaStack

# models.md: SepMamba S and M (causal variants are parameter-matched).
EXPECTED = {"sepmamba_s": 7_253_826, "sepmamba_m": 22_249_090, "sepmamba_causal_s": 7_253_826,
            "sepmamba_causal_m": 22_249_090}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count(name):
    model = load_model_hparams(name)["modules"]["model"]
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name]


@pytest.mark.parametrize("length", [106, 1001, 1600])
@pytest.mark.parametrize("num_spks", [2, 3])
def test_output_shape_and_gradients(length, num_spks):
    model = SepMamba(dim=8, num_layers=1, num_spks=num_spks)
    mixture = torch.randn(2, length)
    estimates = model(mixture)
    assert estimates.shape == (2, length, num_spks)
    estimates.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_backward_stack_is_the_forward_computation_on_the_reversed_sequence():
    stack = BidirectionalMambaStack(16, num_layers=2)
    forward_copy = MambaStack(16, 2, bidirectional=False, norm="layernorm", final_norm=False)
    forward_copy.load_state_dict(stack.backward_stack.state_dict())
    x = torch.randn(2, 30, 16)
    expected = stack.forward_stack(x) + forward_copy(x.flip(1)).flip(1)
    torch.testing.assert_close(stack(x), expected, rtol=1e-5, atol=1e-5)


def test_causal_variant_has_no_backward_stack_and_bidirectional_sees_the_future():
    x = torch.randn(1, 40, 16)
    x_changed = x.clone()
    x_changed[:, 30:] = torch.randn(1, 10, 16)  # random: a constant shift would vanish in LayerNorm
    causal = BidirectionalMambaStack(16, num_layers=1, causal=True)
    assert causal.backward_stack is None and len(causal.forward_stack.layers) == 2
    torch.testing.assert_close(causal(x_changed)[:, :30], causal(x)[:, :30], rtol=0, atol=1e-6)
    bidirectional = BidirectionalMambaStack(16, num_layers=1)
    assert not torch.allclose(bidirectional(x_changed)[:, :30], bidirectional(x)[:, :30])


def test_too_short_input_is_refused_clearly():
    with pytest.raises(ValueError, match="at least 106 samples"):
        SepMamba(dim=8, num_layers=1)(torch.randn(1, 100))
