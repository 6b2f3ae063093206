"""Mamba, BiMamba, the Mamba stack and the fast norm against independent oracles."""

import gc
import weakref

import pytest
import torch
from speechbrain.lobes.models.dual_path import Dual_Path_Model

from speechbrain_mamba.lobes import BiMamba, DualPathModel, Mamba, MambaStack, RMSNorm, SingleGroupNorm
from speechbrain_mamba.lobes import mamba as mamba_module
from speechbrain_mamba.utils.recompute import RecomputedActivations

DIRECTION_PARAMS = ["conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D"]


def backward_name(name: str) -> str:
    """Vision Mamba v2 names of the backward direction's parameters."""
    return "A_b_log" if name == "A_log" else name.replace(".", "_b.", 1) if "." in name else name + "_b"


def unidirectional_copy(bimamba: BiMamba, direction: str) -> Mamba:
    """A causal Mamba that holds the shared projections and one direction of ``bimamba``."""
    mamba = Mamba(bimamba.d_model)
    state = {k: v for k, v in bimamba.state_dict().items() if k.startswith(("in_proj", "out_proj"))}
    for name in DIRECTION_PARAMS:
        state[name] = bimamba.state_dict()[name if direction == "forward" else backward_name(name)]
    mamba.load_state_dict(state)
    return mamba


@pytest.mark.parametrize("length", [1, 7, 64])
def test_bimamba_is_forward_plus_backward_on_reversed_sequence(length):
    bimamba = BiMamba(16)
    x = torch.randn(3, length, 16)
    forward = unidirectional_copy(bimamba, "forward")
    backward = unidirectional_copy(bimamba, "backward")
    # out_proj is linear without bias, so averaging before or after it is the same.
    expected = 0.5 * (forward(x) + backward(x.flip(1)).flip(1))
    torch.testing.assert_close(bimamba(x), expected, rtol=1e-5, atol=1e-5)


def test_bimamba_backward_direction_is_used():
    """The trap of Vision Mamba's slow path: the future must influence the past."""
    bimamba = BiMamba(16)
    x = torch.randn(1, 30, 16)
    y = bimamba(x)
    x_changed = x.clone()
    x_changed[:, 20:] += 1.0
    assert not torch.allclose(bimamba(x_changed)[:, :20], y[:, :20])


def test_mamba_is_causal():
    mamba = MambaStack(16, num_layers=2, bidirectional=False)
    x = torch.randn(2, 40, 16)
    x_changed = x.clone()
    x_changed[:, 25:] = torch.randn(2, 15, 16)
    y, y_changed = mamba(x), mamba(x_changed)
    torch.testing.assert_close(y_changed[:, :25], y[:, :25], rtol=0, atol=1e-6)
    assert not torch.allclose(y_changed[:, 25:], y[:, 25:])


def test_mamba_matches_mamba_ssm_formula_with_loop_reference():
    """Mamba.forward equals the mamba-ssm forward written out with the loop scan."""
    mamba = Mamba(8, scan_backend="torch")
    x = torch.randn(2, 12, 8)
    xz = mamba.in_proj(x).transpose(1, 2)
    u, z = xz.chunk(2, dim=1)
    u = torch.nn.functional.silu(mamba.conv1d(u)[..., :12])
    dt, B, C = torch.split(mamba.x_proj(u.transpose(1, 2)), [mamba.dt_rank, 16, 16], dim=-1)
    dt = torch.nn.functional.softplus(mamba.dt_proj(dt)).transpose(1, 2)
    A = -torch.exp(mamba.A_log)
    h = torch.zeros(2, 16, 16)
    ys = []
    for t in range(12):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, t]
        ys.append((h * C[:, None, t]).sum(-1) + mamba.D * u[:, :, t])
    y = torch.stack(ys, -1) * torch.nn.functional.silu(z)
    torch.testing.assert_close(mamba(x), mamba.out_proj(y.transpose(1, 2)), rtol=1e-5, atol=1e-5)


def test_mamba_ssm_initialisation():
    mixer = BiMamba(64)  # d_inner 128, dt_rank 4
    assert mixer.dt_rank == 4 and mixer.d_inner == 128
    for suffix in ("", "_b"):
        dt = torch.nn.functional.softplus(getattr(mixer, "dt_proj" + suffix).bias)
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        bound = mixer.dt_rank**-0.5
        assert getattr(mixer, "dt_proj" + suffix).weight.abs().max() <= bound
        A_log = getattr(mixer, "A_log" if not suffix else "A_b_log")
        torch.testing.assert_close(A_log, torch.log(torch.arange(1.0, 17.0)).expand(128, 16))
        assert torch.equal(getattr(mixer, "D" + suffix), torch.ones(128))
        assert getattr(mixer, "dt_proj" + suffix).bias._no_reinit
        assert A_log._no_weight_decay


def test_stack_rescales_out_proj_by_depth():
    torch.manual_seed(1)
    one = MambaStack(32, num_layers=1).layers[0].mixer.out_proj.weight
    torch.manual_seed(1)
    four = MambaStack(32, num_layers=4).layers[0].mixer.out_proj.weight
    torch.testing.assert_close(four, one / 2)


def test_stack_with_one_block_is_norm_f_of_input_plus_mixer():
    stack = MambaStack(16, num_layers=1)
    with torch.no_grad():
        stack.layers[0].norm.weight.uniform_(0.5, 1.5)
        stack.norm_f.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 16)
    block = stack.layers[0]
    torch.testing.assert_close(stack(x), stack.norm_f(x + block.mixer(block.norm(x))))


def test_stack_runs_a_large_batch_in_groups_without_gradients():
    """Same output as one pass; only without gradients, and only when the batch holds more frames than the limit."""
    stack = MambaStack(16, num_layers=2, max_inference_frames=40)
    x = torch.randn(7, 9, 16)
    with torch.no_grad():
        whole = stack.norm_f(stack._blocks(x))
        calls = []
        hook = stack.layers[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        grouped = stack(x)
    assert calls == [4, 3]  # 40 frames // 9 per sequence = 4 sequences per group
    torch.testing.assert_close(grouped, whole)
    calls.clear()
    stack(x)  # with gradients: one pass, whatever the size
    assert calls == [7]
    hook.remove()


@pytest.mark.parametrize("mixer_class", [Mamba, BiMamba])
def test_mixer_without_gradients_makes_in_proj_halves_apart(mixer_class, monkeypatch):
    """Without gradients, in_proj's x half is made and convolved before its z half, with the same
    output as the whole projection; with gradients in_proj runs once."""
    torch.manual_seed(0)
    mixer = mixer_class(16)
    x = torch.randn(2, 13, 16)
    with_grad = mixer(x)
    calls = []
    linear = mamba_module.F.linear
    monkeypatch.setattr(mamba_module.F, "linear", lambda inp, weight, *a: calls.append(weight.shape[0]) or linear(
        inp, weight, *a))
    with torch.no_grad():
        without_grad = mixer(x)
    inner = mixer.d_inner
    assert calls[0] == inner and calls.count(inner) == 2 + len(mixer._directions())  # x, z, one dt per direction
    torch.testing.assert_close(without_grad, with_grad)


def test_bimamba_without_gradients_frees_a_direction_before_projecting_the_next(monkeypatch):
    """Without gradients the backward direction's dt is made after the forward direction's scan,
    whose convolution output and dt are gone by then (with gradients the convolution output is kept)."""
    torch.manual_seed(0)
    mixer = BiMamba(16)
    x = torch.randn(2, 13, 16)
    scanned = []  # weak references to each scan's u and delta storage
    scan = mamba_module.selective_scan

    def recording_scan(u, delta, *args, **kwargs):
        gc.collect()
        alive = [ref() is not None for refs in scanned for ref in refs]
        scanned.append((weakref.ref(u._base), weakref.ref(delta._base)))
        recording_scan.alive_before.append(alive)
        return scan(u, delta, *args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", recording_scan)
    for grad in (False, True):
        scanned.clear()
        recording_scan.alive_before = []
        with torch.set_grad_enabled(grad):
            mixer(x)
        first_scan, second_scan = recording_scan.alive_before
        assert first_scan == []
        # (u, delta) of the forward direction; with gradients, x_proj keeps u for its weight's gradient.
        assert second_scan == [False, False] if not grad else second_scan[0]


def test_stack_keeps_one_input_per_checkpointed_block():
    """A checkpointed block saves its residual sum only: the previous block's hidden and residual are
    not kept (the sum is made outside the checkpoint)."""
    torch.manual_seed(0)
    stack = MambaStack(16, num_layers=3, checkpoint_blocks=True, final_norm=False)
    x = torch.randn(2, 9, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        stack(x)
    assert saved == [x.shape] * 3


@pytest.mark.parametrize("option, value", [("checkpoint_blocks", "yes"), ("checkpoint_blocks", 1),
                                           ("recompute_projections", None), ("bidirectional", "no"),
                                           ("final_norm", 0),
                                           ("max_inference_frames", 0), ("max_inference_frames", 1.5)])
def test_stack_names_a_bad_option(option, value):
    with pytest.raises(ValueError, match=option):
        MambaStack(16, **{option: value})


def test_stack_with_checkpointed_blocks_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = MambaStack(16, num_layers=3)
    checkpointed = MambaStack(16, num_layers=3, checkpoint_blocks=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 21, 16)
    grads = []
    for stack in (plain, checkpointed):
        inputs = x.clone().requires_grad_()
        loss = (stack(inputs) * torch.linspace(-1, 1, 16)).sum()
        grads.append(torch.autograd.grad(loss, [inputs, *stack.parameters()]))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_recomputed_projections_are_not_stored_and_give_the_same_gradients(monkeypatch, bidirectional, autocast):
    """With recompute_projections, the tensors marked in the forward pass (norm output, in_proj output,
    convolution and projection outputs) are gone once it ends, rebuilt once per block in the backward
    pass, and the gradients are those of the stored activations."""
    torch.manual_seed(0)
    stored = MambaStack(16, num_layers=2, bidirectional=bidirectional)
    recomputed = MambaStack(16, num_layers=2, bidirectional=bidirectional, recompute_projections=True)
    recomputed.load_state_dict(stored.state_dict())
    marked, rebuilds = [], []
    mark, rebuild = RecomputedActivations._mark, RecomputedActivations._rebuild

    def recording_mark(self, name, tensor):
        marked.append((name, weakref.ref(tensor)))
        return mark(self, name, tensor)

    def counting_rebuild(self):
        rebuilds.append(1)
        return rebuild(self)

    monkeypatch.setattr(RecomputedActivations, "_mark", recording_mark)
    monkeypatch.setattr(RecomputedActivations, "_rebuild", counting_rebuild)
    x = torch.randn(2, 21, 16)
    grads = []
    for stack in (stored, recomputed):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (stack(inputs).float() * torch.linspace(-1, 1, 16)).sum()
        if stack is recomputed:
            directions = ["", "_b"] if bidirectional else [""]
            names = ["in_proj_input", "xz"] + [f"{kind}{d}" for d in directions for kind in ("conv", "x_proj", "dt")]
            assert sorted(name for name, _ in marked) == sorted(names * 2)  # two blocks
            gc.collect()
            assert all(ref() is None for _, ref in marked), "a marked tensor outlived the forward pass"
            assert rebuilds == []
        grads.append(torch.autograd.grad(loss, [inputs, *stack.parameters()]))
    assert len(rebuilds) == 2  # once per block
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_forward_pass_without_backward_frees_its_graph(monkeypatch):
    """The recomputation's hooks live in the autograd graph; what they hold must not hold the graph
    (a cycle through it is never collected): a step whose backward is skipped, e.g. on a
    non-finite loss, would leak its activations."""
    alive = []
    enter = RecomputedActivations.__enter__

    def recording_enter(self):
        alive.append(weakref.ref(self))
        return enter(self)

    monkeypatch.setattr(RecomputedActivations, "__enter__", recording_enter)
    stack = MambaStack(16, num_layers=2, recompute_projections=True)
    out = stack(torch.randn(2, 9, 16, requires_grad=True))
    assert len(alive) == 2 and all(ref() is not None for ref in alive)
    del out
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_recomputation_is_off_without_gradients_and_with_checkpointed_blocks(monkeypatch):
    monkeypatch.setattr(RecomputedActivations, "__enter__", lambda self: pytest.fail("recomputation set up"))
    stack = MambaStack(16, num_layers=2, recompute_projections=True)
    with torch.no_grad():
        stack(torch.randn(1, 5, 16))
    stack.eval()
    stack(torch.randn(1, 5, 16))
    assert not any(layer.recompute_projections for layer in MambaStack(16, checkpoint_blocks=True,
                                                                       recompute_projections=True).layers)


def test_stack_state_dict_keys():
    keys = set(MambaStack(16, num_layers=2).state_dict())
    for i in range(2):
        assert f"layers.{i}.norm.weight" in keys
        for name in ["in_proj.weight", "out_proj.weight", *DIRECTION_PARAMS, *map(backward_name, DIRECTION_PARAMS)]:
            assert f"layers.{i}.mixer.{name}" in keys, name
    assert "norm_f.weight" in keys


def test_rms_norm_matches_definition():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_()
    x = torch.randn(3, 4, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_ssm_parameters_stay_fp32_under_autocast(monkeypatch):
    captured = {}
    real_scan = mamba_module.selective_scan

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, **kwargs):
        captured.update(A=A.dtype, D=D.dtype, delta_bias=delta_bias.dtype, u=u.dtype)
        return real_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    mixer = BiMamba(16)
    x = torch.randn(2, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
    assert captured == {"A": torch.float32, "D": torch.float32, "delta_bias": torch.float32, "u": torch.bfloat16}
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), mixer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("shape", [(2, 8, 50), (1, 8, 10, 7), (3, 8, 1)])
def test_single_group_norm_matches_group_norm(shape):
    reference = torch.nn.GroupNorm(1, 8, eps=1e-8)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    fast = SingleGroupNorm(8, eps=1e-8)
    fast.load_state_dict(reference.state_dict())
    x = (3 * torch.randn(*shape) + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fast(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm, skip, linear, batch", [
    ("ln", True, False, 2), ("ln", True, False, 1), ("ln", False, True, 2), ("gln", True, True, 2),
])
def test_dual_path_model_equals_stock_model(norm, skip, linear, batch):
    """Fast norm, channels-innermost layers: the stock model's outputs and gradients."""
    kwargs = dict(num_layers=3, K=10, norm=norm, skip_around_intra=skip, linear_layer_after_inter_intra=linear)
    torch.manual_seed(3)
    stock = Dual_Path_Model(16, 16, MambaStack(16), MambaStack(16), **kwargs)
    ours = DualPathModel(16, 16, MambaStack(16), MambaStack(16), **kwargs)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in ours.modules())
    ours.load_state_dict(stock.state_dict())  # strict: same keys and shapes
    layouts = []
    for layer in ours.dual_mdl:
        layer.register_forward_hook(lambda module, args, out: layouts.append(
            (args[0].permute(0, 3, 2, 1).is_contiguous(), out.permute(0, 3, 2, 1).is_contiguous())))
    x = torch.randn(batch, 16, 45)
    y, y_stock = ours(x), stock(x)
    torch.testing.assert_close(y, y_stock, rtol=1e-4, atol=1e-5)
    # Every layer gets and hands on channels-innermost storage (the chunks are made so, the residual sums keep it).
    assert layouts == [(True, True)] * 3
    weights = torch.randn(y.shape)
    (y * weights).sum().backward()
    (y_stock * weights).sum().backward()
    for (name, param), stock_param in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(param.grad, stock_param.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_single_group_norm_keeps_a_permuted_layout():
    norm = SingleGroupNorm(8)
    x = torch.randn(2, 5, 3, 8).permute(0, 3, 2, 1)  # [B, N, K, S] over channels-innermost storage
    y = norm(x)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, norm(x.contiguous()))


@pytest.mark.parametrize("length", [1, 4, 5, 9, 10, 11, 45])
def test_dual_path_padding_equals_stock_padding(length):
    ours = DualPathModel(4, 4, MambaStack(4), MambaStack(4), K=10)
    x = torch.randn(2, 4, length)
    padded, gap = ours._padding(x, 10)
    stock_padded, stock_gap = Dual_Path_Model._padding(ours, x, 10)
    assert gap == stock_gap
    torch.testing.assert_close(padded, stock_padded, rtol=0, atol=0)


def test_dual_path_model_refuses_shared_intra_inter_instance():
    block = MambaStack(16)
    with pytest.raises(ValueError, match="separate instances"):
        DualPathModel(16, 16, block, block)


def test_mixer_rejects_wrong_feature_size():
    with pytest.raises(ValueError, match=r"expects \[batch, time, 16\]"):
        Mamba(16)(torch.randn(2, 10, 8))


def test_stack_gives_the_reference_gradients_in_two_backward_passes_through_a_retained_graph():
    """The default (torch) scan backend must not spoil the graph for a second backward pass."""
    torch.manual_seed(0)
    x = torch.randn(2, 13, 16)
    grads = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(1)
        stack = MambaStack(16, num_layers=2, scan_backend=backend)
        inputs = x.clone().requires_grad_()
        loss = (stack(inputs) * torch.linspace(-1, 1, 16)).sum()
        grads[backend] = [torch.autograd.grad(loss, [inputs, *stack.parameters()], retain_graph=True)
                          for _ in range(2)]
    for passes in zip(grads["torch"], grads["reference"]):
        for actual, expected in zip(*passes):
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_stack_step_refuses_states_of_another_depth():
    stack = MambaStack(16, num_layers=3, bidirectional=False)
    _, states = MambaStack(16, num_layers=2, bidirectional=False).step(torch.randn(1, 4, 16))
    for wrong in (states, []):
        with pytest.raises(ValueError, match=r"states must hold one MambaState per block \(3\); got"):
            stack.step(torch.randn(1, 4, 16), wrong)


@pytest.mark.parametrize("other, batch, message", [
    ({}, 3, r"state\.conv must be \[batch, d_inner, d_conv - 1\] = \(3, 32, 3\); got \(2, 32, 3\)"),
    ({"d_conv": 2}, 2, r"state\.conv must be .* = \(2, 32, 3\); got \(2, 32, 1\)"),
    ({"d_state": 8}, 2, r"state\.ssm must be \[batch, d_inner, d_state\] = \(2, 32, 16\); got \(2, 32, 8\)"),
    ({"expand": 1}, 2, r"state\.conv must be .* = \(2, 32, 3\); got \(2, 16, 3\)"),
])
def test_mixer_step_refuses_a_state_of_another_batch_or_mixer(other, batch, message):
    _, state = Mamba(16, **other).step(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=message):
        Mamba(16).step(torch.randn(batch, 5, 16), state)


@pytest.mark.parametrize("argument, value", [
    ("d_model", 0), ("expand", 0), ("expand", 1.5), ("expand", 2.0), ("d_state", 0), ("d_state", -1),
    ("d_conv", 0), ("d_conv", True), ("dt_rank", 0), ("dt_rank", 2.5),
])
def test_mixer_names_a_bad_size(argument, value):
    kwargs = {"d_model": 16, argument: value}
    with pytest.raises(ValueError, match=f"{argument} must be a positive int; got {value!r}"):
        Mamba(**kwargs)


def test_mixer_keeps_an_explicit_dt_rank():
    assert Mamba(16, dt_rank=3).x_proj.weight.shape == (3 + 2 * 16, 32)
    assert Mamba(40).dt_rank == 3
