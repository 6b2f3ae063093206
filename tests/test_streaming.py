"""Streaming: Mamba.step / MambaStack.step and SepMambaStreamer against the offline forward."""

import pytest
import torch

from speechbrain_mamba.lobes import BiMamba, Mamba, MambaStack, SepMamba, SepMambaStreamer


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: streaming runs many tiny ops, which two threads on a busy 2-core machine slow ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _split(x: torch.Tensor, sizes, dim: int):
    """Consecutive pieces of x along dim, of the given sizes (the rest as a last piece)."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(x.narrow(dim, start, min(size, x.shape[dim] - start)))
        start += pieces[-1].shape[dim]
    if start < x.shape[dim]:
        pieces.append(x.narrow(dim, start, x.shape[dim] - start))
    return pieces


@pytest.mark.parametrize("sizes", [[1] * 9, [5, 1, 17], [4, 4, 4, 4], [40]])
def test_mamba_step_continues_the_sequence(sizes):
    mixer = Mamba(16)
    x = torch.randn(2, 40, 16)
    state, outputs = None, []
    for piece in _split(x, sizes, dim=1):
        out, state = mixer.step(piece, state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), mixer(x), rtol=1e-5, atol=1e-5)
    assert state.conv.shape == (2, 32, 3) and state.ssm.shape == (2, 32, 16)


def test_mamba_stack_step_continues_the_sequence():
    stack = MambaStack(16, num_layers=3, bidirectional=False, norm="layernorm", final_norm=False)
    x = torch.randn(1, 33, 16)
    state, outputs = None, []
    for piece in _split(x, [2, 1, 11], dim=1):
        out, state = stack.step(piece, state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), stack(x), rtol=1e-5, atol=1e-5)
    assert len(state) == 3


@pytest.mark.parametrize("mixer", [Mamba(8, reverse=True), BiMamba(8)], ids=["reverse", "bimamba"])
def test_step_refuses_non_causal_mixers(mixer):
    with pytest.raises(ValueError, match="causal"):
        mixer.step(torch.randn(1, 4, 8))


def _stream(streamer: SepMambaStreamer, mixture: torch.Tensor, sizes) -> torch.Tensor:
    outputs = [streamer(piece) for piece in _split(mixture, sizes, dim=-1)]
    return torch.cat(outputs + [streamer.flush()], dim=1)


@pytest.fixture(scope="module")
def causal_model():
    torch.manual_seed(1)
    return SepMamba(dim=8, num_layers=1, num_spks=3, causal=True).eval()


# Chunk sizes: multiples of the stride product 8 and not, single samples, empty chunks, irregular mixes.
CHUNKINGS = {
    "7": [7] * 200,
    "13": [13] * 100,
    "80": [80] * 20,
    "irregular": [1, 0, 3, 105, 1, 1, 0, 50, 2, 333, 9, 64],
    "whole": [10_000],
}


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_streaming_matches_offline(causal_model, chunking):
    length = 1001  # odd: neither the chunk sizes nor the stride product divide it
    mixture = torch.randn(2, length)
    with torch.no_grad():
        offline = causal_model(mixture)
    streamed = _stream(SepMambaStreamer(causal_model), mixture, CHUNKINGS[chunking])
    assert streamed.shape == offline.shape == (2, length, 3)
    torch.testing.assert_close(streamed, offline, rtol=1e-4, atol=1e-5)


def test_streaming_the_shortest_input(causal_model):
    mixture = torch.randn(1, causal_model.min_length)
    with torch.no_grad():
        offline = causal_model(mixture)
    torch.testing.assert_close(_stream(SepMambaStreamer(causal_model), mixture, [1, 1, 2, 3, 90]), offline,
                               rtol=1e-4, atol=1e-5)


def test_outputs_are_emitted_as_soon_as_the_lookahead_allows(causal_model):
    """After R samples the streamer has emitted every output t whose inputs (up to t + look-ahead) are in.

    Output t needs input up to 8 * floor(t / 8) + 105 (see SepMamba's docstring), so after R >= 106
    samples the outputs 0 .. 8 * floor((R - 106) / 8) + 7 are final: no buffering beyond the look-ahead.
    """
    streamer = SepMambaStreamer(causal_model)
    assert streamer.lookahead == 105
    received = emitted = 0
    for size in [50, 55, 1, 7, 8, 100, 3, 300]:
        emitted += streamer(torch.randn(1, size)).shape[1]
        received += size
        expected = 8 * ((received - 106) // 8 + 1) if received >= 106 else 0
        assert emitted == expected, received


def test_streamer_reset_flush_and_errors(causal_model):
    streamer = SepMambaStreamer(causal_model)
    first, second = torch.randn(1, 500), torch.randn(1, 700)
    _stream(streamer, first, [100] * 5)  # flush resets: the next stream is independent of the first
    with torch.no_grad():
        torch.testing.assert_close(_stream(streamer, second, [64] * 11), causal_model(second),
                                   rtol=1e-4, atol=1e-5)
    streamer(torch.randn(1, 105))
    with pytest.raises(ValueError, match="at least 106 samples"):
        streamer.flush()
    streamer.reset()
    streamer(torch.randn(2, 10))
    with pytest.raises(ValueError, match="batch size 2"):
        streamer(torch.randn(1, 10))
    with pytest.raises(ValueError, match="causal"):
        SepMambaStreamer(SepMamba(dim=8, num_layers=1))
