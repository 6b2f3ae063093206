"""SepMamba: exact sizes, shapes, both directions, causality."""

import pytest
import torch

from conftest import load_model_hparams
from speechbrain_mamba.lobes import BidirectionalMambaStack, SepMamba
from speechbrain_mamba.lobes.mamba import MambaStack
from test_streaming import one_thread  # noqa: F401 (autouse: one intra-op thread for these small models)

# models.md: SepMamba S and M (causal variants are parameter-matched).
EXPECTED = {"sepmamba_s": 7_253_826, "sepmamba_m": 22_249_090, "sepmamba_causal_s": 7_253_826,
            "sepmamba_causal_m": 22_249_090}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count(name):
    model = load_model_hparams(name)["modules"]["model"]
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [106, 1001, 1600])
@pytest.mark.parametrize("num_spks", [2, 3])
def test_output_shape_and_gradients(length, num_spks, causal):
    model = SepMamba(dim=8, num_layers=1, num_spks=num_spks, causal=causal)
    mixture = torch.randn(2, length)
    estimates = model(mixture)
    assert estimates.shape == (2, length, num_spks)
    torch.testing.assert_close(model(mixture.unsqueeze(1)), estimates)  # [B, 1, T] input too
    estimates.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_recompute_projections_reaches_every_block_with_the_same_gradients():
    """The hparams option reaches all of SepMamba's Mamba blocks; gradients are the stored ones."""
    torch.manual_seed(0)
    stored = SepMamba(dim=8, num_layers=1)
    recomputed = SepMamba(dim=8, num_layers=1, recompute_projections=True)
    recomputed.load_state_dict(stored.state_dict())
    blocks = [m for m in recomputed.modules() if hasattr(m, "recompute_projections")]
    assert len(blocks) == 2 * 5 and all(block.recompute_projections for block in blocks)
    mixture = torch.randn(2, 400)
    grads = []
    for model in (stored, recomputed):
        loss = model(mixture).square().mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert load_model_hparams("sepmamba_m")["recompute_projections"] is False  # the option, off by default


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


def test_lookahead_of_the_strided_convolutions():
    """(k - 1)(1 + s + s^2) input samples: 105 = 13.125 ms at 8 kHz for k = 16, s = 2."""
    model = SepMamba(dim=8, num_layers=1, causal=True)
    assert model.lookahead == 105 == model.min_length - 1
    assert model.lookahead / 8000 * 1000 == 13.125
    assert SepMamba(dim=8, num_layers=1, kernel_size=4, stride=3).lookahead == 3 * (1 + 3 + 9)


def test_causal_sepmamba_sees_exactly_lookahead_samples_ahead():
    """Output up to t is unchanged by input after t + 105; output t changes with input t + 105 (tight).

    Tight for t divisible by 8: the deepest frame floor(t / 8) covers input up to 8 floor(t / 8) + 105.
    At initialisation that path is weak (about 1e-6 per unit of input), hence the large perturbations;
    unaffected outputs are computed from identical numbers and come out bit-identical.
    """
    model = SepMamba(dim=8, num_layers=1, causal=True).eval()
    lookahead, length = model.lookahead, 800
    mixture = torch.randn(1, length)
    with torch.no_grad():
        reference = model(mixture)
        for t in (200, 304, 408):  # multiples of 8
            changed = mixture.clone()
            changed[:, t + lookahead + 1 :] = 100 * torch.randn(1, length - t - lookahead - 1)
            assert torch.equal(model(changed)[:, : t + 1], reference[:, : t + 1])
            nudged = mixture.clone()
            nudged[:, t + lookahead] += 100.0
            difference = (model(nudged) - reference).abs().amax(-1)[0]
            assert float(difference[:t].max()) == 0.0 and float(difference[t]) > 1e-5
    # The same support, exactly, from the gradient of one output sample.
    mixture.requires_grad_()
    model(mixture)[0, 304].sum().backward()
    assert int(mixture.grad[0].nonzero().max()) == 304 + lookahead


def test_bidirectional_sepmamba_sees_the_whole_input():
    model = SepMamba(dim=8, num_layers=1).eval()
    mixture = torch.randn(1, 800)
    changed = mixture.clone()
    changed[:, 700:] = torch.randn(1, 100)
    with torch.no_grad():
        assert not torch.allclose(model(changed)[:, :100], model(mixture)[:, :100])
