"""The Triton scan's kernel logic on the CPU, through Triton's interpreter (``TRITON_INTERPRET=1``).

The fixture imports a fresh copy of the kernel module with the interpreter on
(``tests/triton_interpret.py``) and puts the real one back afterwards. Tiles
are tiny (2 channels x 8 frames) so that a few frames already cross chunk and
segment boundaries.
"""

import importlib.util

import pytest
import torch

from speechbrain_mamba.ops.scan_reference import selective_scan_reference
from test_selective_scan import assert_close, make_inputs
from triton_interpret import interpreted


@pytest.fixture(scope="module")
def kernels():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    with interpreted("speechbrain_mamba.ops.scan_triton") as module:
        yield module


def scan(kernels, backend, inputs, reverse, softplus=True, segments=False, sequential=False,
         sequential_backward=None, y_loss=True, state_loss=True, output_scale=1.0, prefetch=4, unroll=8,
         split=False, segment_chunks=1, sequential_block_l=8, scratch_l=64):
    """Output, last state and the gradients of a weighted loss for one backend.

    ``sequential``: the frame-by-frame kernels run the forward pass and, unless
    ``sequential_backward`` says otherwise, the backward pass, loading frames
    ``prefetch`` ahead and unrolling ``unroll`` of them. ``split``: the
    frame-by-frame kernels over segments of ``segment_chunks`` chunks (the
    backward one unless ``sequential_backward`` is False: the chunked one,
    over the same segments). ``sequential_block_l``: the frame-by-frame kernels'
    chunk when they run both passes; ``scratch_l``: the frames of a chunk whose states
    the frame-by-frame backward kernel parks at once (64 here: whole chunks, unlike the
    library's default of 8).
    ``inputs`` may hold an ``output_add``."""
    B, C = inputs["B"], inputs["C"]
    B, C = (B if B.dim() == 4 else B.unsqueeze(1)), (C if C.dim() == 4 else C.unsqueeze(1))
    args = (inputs["u"], inputs["delta"], inputs["A"], B, C, inputs["D"], inputs["z"], inputs["delta_bias"],
            softplus, inputs["initial_state"], reverse, output_scale, inputs.get("output_add"))
    if backend == "triton":
        def config(frame_by_frame, split_time):
            return kernels.ScanConfig(block_e=2, block_l=8, num_warps=1, min_programs=10**6 if segments else 0,
                                      min_segment_chunks=segment_chunks, sequential_min_rows=int(frame_by_frame),
                                      sequential_block_l=sequential_block_l, sequential_block_e=2,
                                      sequential_prefetch=prefetch, sequential_unroll=unroll,
                                      sequential_scratch_l=scratch_l,
                                      sequential_split_programs=10**6 if split_time else 0)

        backward = sequential if sequential_backward is None else sequential_backward
        y, last = kernels.selective_scan_triton(
            *args, forward_config=config(sequential, split),
            backward_config=config(backward, split and sequential_backward is not False))
    else:
        y, last = selective_scan_reference(*args)
    loss = 0.0
    if y_loss:
        loss = loss + (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum()
    if state_loss:
        loss = loss + last.pow(2).sum()
    names = [n for n, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    # The loop leaves inputs that the loss does not reach without a gradient; the kernel gives zeros.
    grads = [torch.zeros_like(inputs[n]) if g is None else g for n, g in zip(names, grads)]
    return y, last, dict(zip(names, grads))


def check_against_reference(kernels, inputs, reverse, dtype=torch.float32, **options):
    kernel_options = ("segments", "sequential", "sequential_backward", "prefetch", "unroll", "split", "segment_chunks",
                      "sequential_block_l", "scratch_l")
    y_ref, last_ref, grads_ref = scan(kernels, "reference", inputs, reverse, **{
        k: v for k, v in options.items() if k not in kernel_options})
    y, last, grads = scan(kernels, "triton", inputs, reverse, **options)
    assert y.dtype == inputs["u"].dtype and last.dtype == torch.float32
    assert_close(y, y_ref, dtype, "output")
    assert_close(last, last_ref, torch.float32, "last state")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close(grads[name], grads_ref[name], dtype, f"grad {name}")


CASES = [
    # batch, channels, state, length, groups, D, z, bias, initial, reverse, segments
    (2, 4, 4, 19, None, True, True, True, False, False, False),
    (2, 4, 4, 19, None, True, True, True, True, True, False),
    (2, 4, 4, 1, None, True, True, True, True, False, False),
    (1, 4, 4, 1, None, True, True, True, False, True, False),
    (1, 4, 3, 16, 2, False, False, False, False, True, False),
    (1, 8, 4, 13, 4, True, False, True, True, False, False),
    (1, 4, 4, 29, None, True, True, True, True, False, True),
    (1, 4, 4, 29, 2, True, True, True, True, True, True),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"b{c[0]}e{c[1]}n{c[2]}L{c[3]}g{c[4]}-D{c[5]:d}z{c[6]:d}bias{c[7]:d}"
                                 f"h0{c[8]:d}rev{c[9]:d}seg{c[10]:d}")
@pytest.mark.parametrize("forward_kernel", ["chunked", "sequential"])
def test_triton_matches_reference(kernels, case, forward_kernel):
    """``sequential``: the frame-by-frame kernels, forward and backward."""
    batch, channels, state, length, groups, with_D, with_z, with_bias, with_initial, reverse, segments = case
    if segments and forward_kernel == "sequential":
        pytest.skip("test_frame_by_frame_kernels_over_segments_of_time splits the frame-by-frame kernels")
    inputs = make_inputs(batch, channels, state, length, groups, with_D=with_D, with_z=with_z,
                         with_bias=with_bias, with_initial=with_initial)
    check_against_reference(kernels, inputs, reverse, segments=segments, sequential=forward_kernel == "sequential")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("forward_sequential", [False, True])
def test_one_kind_of_kernel_forward_the_other_backward(kernels, reverse, forward_sequential):
    """Both backward kernels read the chunk-entering states that either forward kernel stores."""
    inputs = make_inputs(2, 4, 4, 19, 2, with_initial=True)
    check_against_reference(kernels, inputs, reverse, sequential=forward_sequential,
                            sequential_backward=not forward_sequential)


@pytest.mark.parametrize("initial", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("forward_sequential", [False, True])
def test_longer_frame_by_frame_chunks_than_the_chunked_kernels(kernels, forward_sequential, reverse, initial):
    """With enough rows the frame-by-frame kernels run both passes in chunks of ``sequential_block_l``
    (16 here) instead of ``block_l`` (8); either backward kernel reads the states stored at the forward
    pass's chunk, the first chunk's from the initial state."""
    inputs = make_inputs(2, 4, 4, 45, 2, with_initial=initial)
    check_against_reference(kernels, inputs, reverse, sequential=forward_sequential, sequential_backward=True,
                            sequential_block_l=16)
    check_against_reference(kernels, inputs, reverse, sequential=True, sequential_backward=False,
                            sequential_block_l=16)


@pytest.mark.parametrize("scratch_l, split", [(1, False), (4, False), (8, False), (4, True)])
@pytest.mark.parametrize("initial", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("reverse", [False, True])
def test_backward_takes_chunks_in_scratch_parts(kernels, scratch_l, split, reverse, initial):
    """The frame-by-frame backward kernel takes each chunk (16 frames; split in time, 8 frames in
    segments of 2 chunks) in parts of ``scratch_l`` frames, each from the state a first walk left for
    it; 45 frames end in a part of one frame, shorter than the 2 frames unrolled. One-frame parts unroll
    one frame."""
    inputs = make_inputs(2, 4, 4, 45, 2, with_initial=initial)
    check_against_reference(kernels, inputs, reverse, sequential=not split, sequential_block_l=16,
                            scratch_l=scratch_l, unroll=2, split=split, segment_chunks=2)


@pytest.mark.parametrize("length, block_l, sequential, stored", [
    (19, 8, False, 2), (16, 8, False, 1), (8, 8, False, 0), (1, 8, False, 0),
    (45, 16, True, 2), (16, 16, True, 0), (34, 64, True, 0), (250, 64, True, 3),
])
def test_the_state_entering_the_first_chunk_is_not_stored(kernels, length, block_l, sequential, stored):
    """The forward pass keeps ``ceil(L / chunk) - 1`` chunk-entering states: none for DPMamba's 34-frame
    inter-chunk sequences in chunks of 64 frames, 3 for its 250-frame intra-chunk ones."""
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(1, 4, 4, length).items()}
    config = kernels.ScanConfig(block_e=2, block_l=block_l if not sequential else 8, num_warps=1, min_programs=0,
                                sequential_min_rows=int(sequential), sequential_block_l=block_l, sequential_block_e=2)
    _, _, chunks, plan = kernels._forward(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1), inputs["D"],
        inputs["z"], inputs["delta_bias"], None, True, False, 1.0, None, True, config)
    assert plan.block_l == block_l
    assert chunks.shape == (1, 4, stored, 4)


@pytest.mark.parametrize("prefetch, unroll", [(1, 8), (3, 2), (11, 4)])
@pytest.mark.parametrize("reverse", [False, True])
def test_frames_loaded_ahead_across_chunks(kernels, reverse, prefetch, unroll):
    """The frame-by-frame kernels load frames ``prefetch`` ahead (beyond the 8-frame chunk too, and
    beyond the sequence's ends) and unroll ``unroll`` frames per step: the same results."""
    inputs = make_inputs(2, 4, 4, 21, 2, with_initial=True)
    inputs["output_add"] = torch.randn(2, 4, 21).requires_grad_()
    check_against_reference(kernels, inputs, reverse, sequential=True, prefetch=prefetch, unroll=unroll,
                            output_scale=0.5)


@pytest.mark.parametrize("backward_kernel", ["frame-by-frame", "chunked"])
@pytest.mark.parametrize("case", [c for c in CASES if c[3] > 1], ids=lambda c: f"L{c[3]}g{c[4]}h0{c[8]:d}rev{c[9]:d}")
def test_frame_by_frame_kernels_over_segments_of_time(kernels, case, backward_kernel):
    """Few long sequences (SepMamba): the frame-by-frame forward kernel over segments of 8 frames, each
    started from the state the earlier segments' summaries (end state, total decay) give; the backward
    kernel over the same segments, each started from the adjoint the later segments' summaries give."""
    batch, channels, state, length, groups, with_D, with_z, with_bias, with_initial, reverse, _ = case
    inputs = make_inputs(batch, channels, state, length, groups, with_D=with_D, with_z=with_z,
                         with_bias=with_bias, with_initial=with_initial)
    check_against_reference(kernels, inputs, reverse, split=True,
                            sequential_backward=False if backward_kernel == "chunked" else None)


@pytest.mark.parametrize("reverse", [False, True])
def test_segments_of_several_chunks_with_an_added_output(kernels, reverse):
    """Segments of 2 chunks (chunk states stored inside a segment), a length that is no multiple of the
    chunk, BiMamba's scale and added tensor, other prefetch/unroll settings, both backward kernels; and
    without autograd (no chunk states stored) the same output."""
    inputs = make_inputs(2, 4, 4, 45, 2, with_initial=True)
    inputs["output_add"] = torch.randn(2, 4, 45).requires_grad_()
    options = dict(split=True, segment_chunks=2, output_scale=0.5, prefetch=3, unroll=2)
    check_against_reference(kernels, inputs, reverse, **options)
    check_against_reference(kernels, inputs, reverse, sequential_backward=False, **options)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
            inputs["delta_bias"], True, inputs["initial_state"], reverse, 0.5, inputs["output_add"])
    config = kernels.ScanConfig(block_l=8, min_segment_chunks=2, sequential_min_rows=0, sequential_block_e=2,
                                sequential_split_programs=10**6)
    with torch.no_grad():
        y_ref, _ = selective_scan_reference(*args)
        y, _ = kernels.selective_scan_triton(*args, forward_config=config)
    assert_close(y, y_ref, torch.float32, "output without autograd")


def test_kernel_choice_and_config_checks(kernels):
    """Host-side choices: segments for few programs, half the channels per program below the row threshold;
    tile sizes that would skip frames are refused."""
    assert kernels._segments(programs=8, num_chunks=500, min_programs=2048, min_segment_chunks=4) == (4, 125)
    assert kernels._segments(programs=4096, num_chunks=500, min_programs=2048, min_segment_chunks=4) == (500, 1)
    config = kernels.ScanConfig(sequential_block_e=32, sequential_wide_min_rows=32768)
    assert kernels._sequential_block_e(33, 512, 512, config) == 16  # DPMamba-M's 4 s intra-chunk scan
    assert kernels._sequential_block_e(250, 512, 512, config) == 32
    assert kernels._sequential_block_e(250, 512, 8, config) == 8  # a B/C group of 8 channels
    for bad in (dict(sequential_unroll=3), dict(block_l=24), dict(sequential_block_l=48), dict(sequential_prefetch=0)):
        with pytest.raises(ValueError, match="ScanConfig"):
            kernels.ScanConfig(**bad)


@pytest.mark.parametrize("reverse", [False, True])
def test_strided_inputs_as_the_mamba_mixer_passes_them(kernels, reverse):
    """delta and z with channels contiguous, B and C as views of one projection: read in place."""
    batch, channels, state, length = 2, 4, 4, 11
    g = torch.Generator().manual_seed(3)
    xz = torch.randn(batch, length, 2 * channels, generator=g).transpose(1, 2)
    proj = torch.randn(batch, length, 2 * state, generator=g).transpose(1, 2)
    inputs = make_inputs(batch, channels, state, length)
    inputs.update(
        u=torch.randn(batch, length, channels, generator=g).transpose(1, 2).requires_grad_(),
        delta=(0.5 * xz[:, :channels]).requires_grad_(), z=xz[:, channels:].requires_grad_(),
        B=proj[:, :state].requires_grad_(), C=proj[:, state:].requires_grad_(),
    )
    assert inputs["delta"].stride(-1) != 1 and inputs["z"].stride(-1) != 1 and inputs["B"].stride(-1) != 1
    check_against_reference(kernels, inputs, reverse)
    check_against_reference(kernels, inputs, reverse, sequential=True)
    # Channel-last in, channel-last out: whole frames are written, as the next projection reads them.
    y, _, grads = scan(kernels, "triton", inputs, reverse, sequential=True)
    assert y.stride(1) == 1 and grads["u"].stride(1) == 1 and grads["z"].stride(1) == 1


@pytest.mark.parametrize("sequential", [False, True])
def test_output_scale_and_add_as_bimamba_averages_its_directions(kernels, sequential):
    """The reverse scan's output halved and added to a channel-last tensor, in the kernel's last step."""
    inputs = make_inputs(2, 4, 4, 19, 2, with_initial=True)
    g = torch.Generator().manual_seed(5)
    inputs["output_add"] = torch.randn(2, 19, 4, generator=g).transpose(1, 2).requires_grad_()
    check_against_reference(kernels, inputs, True, sequential=sequential, output_scale=0.5)
    check_against_reference(kernels, inputs, False, sequential=sequential, output_scale=0.5, y_loss=False)


def test_without_softplus_and_with_only_one_output_in_the_loss(kernels):
    inputs = make_inputs(1, 4, 4, 10, with_initial=True)
    inputs["delta"] = inputs["delta"].detach().abs().requires_grad_()
    check_against_reference(kernels, inputs, False, softplus=False, state_loss=False)
    check_against_reference(kernels, inputs, True, y_loss=False)


def test_bf16_inputs(kernels):
    inputs = make_inputs(1, 4, 4, 12, dtype=torch.bfloat16)
    check_against_reference(kernels, inputs, True, dtype=torch.bfloat16)
    check_against_reference(kernels, inputs, False, dtype=torch.bfloat16, sequential=True)


@pytest.mark.parametrize("sequential", [False, True], ids=["chunked", "frame-by-frame"])
@pytest.mark.parametrize("segments", [False, True], ids=["whole", "segments"])
def test_without_autograd_the_kernels_give_autograds_outputs(kernels, sequential, segments):
    """Inputs that need no gradient skip the autograd Function (the host's time per call bounds short
    inputs): the same kernels, the same output and last state, bit for bit."""
    inputs = make_inputs(2, 4, 4, 29, 2, with_initial=True)
    inputs["output_add"] = torch.randn(2, 4, 29)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
            inputs["delta_bias"], True, inputs["initial_state"], True, 0.5, inputs["output_add"])
    many = 10**6
    config = kernels.ScanConfig(
        block_e=2, block_l=8, num_warps=1, min_programs=many if segments and not sequential else 0,
        min_segment_chunks=1, sequential_min_rows=int(sequential and not segments), sequential_block_e=2,
        sequential_split_programs=many if segments and sequential else 0)
    y_grad, last_grad = kernels.selective_scan_triton(*args, forward_config=config)
    assert y_grad.requires_grad
    with torch.no_grad():
        y, last = kernels.selective_scan_triton(*args, forward_config=config)
    assert y.grad_fn is None
    assert torch.equal(y, y_grad.detach()) and torch.equal(last, last_grad.detach())


def test_no_state_is_kept_without_gradients(kernels):
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(1, 4, 4, 9).items()}
    y, last = kernels.selective_scan_triton(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1),
        inputs["D"], inputs["z"], inputs["delta_bias"], True, None, False,
    )
    assert y.grad_fn is None and not last.requires_grad


def test_refuses_cpu_tensors_outside_the_interpreter(kernels, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    inputs = make_inputs(1, 2, 2, 4)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.selective_scan_triton(inputs["u"], inputs["delta"], inputs["A"], inputs["B"].unsqueeze(1),
                                      inputs["C"].unsqueeze(1), None, None, None, True, None, False)
