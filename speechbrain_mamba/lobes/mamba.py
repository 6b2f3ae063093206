"""Mamba mixers and the Mamba stack, as SpeechBrain lobes.

Parameter names and initialisation follow mamba-ssm's ``Mamba`` (Mamba-1) and
Vision Mamba's "v2" bidirectional layout, so checkpoints of models built on
those modules (DPMamba, Mamba-TasNet) load into these classes. Every module runs
on any device: the selective scan picks its backend (see
:func:`speechbrain_mamba.ops.selective_scan`).
"""

import math
import numbers
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from speechbrain_mamba.ops import causal_conv1d_silu, layer_norm, resolve_backend, rms_norm, selective_scan
from speechbrain_mamba.utils.recompute import Mark, RecomputedActivations, keep


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class MambaState(NamedTuple):
    """What a causal :class:`Mamba` carries from one chunk to the next.

    ``conv``: the last ``d_conv - 1`` inputs of the depthwise convolution,
    [batch, d_inner, d_conv - 1]; ``ssm``: the SSM state after the last frame,
    [batch, d_inner, d_state], fp32.
    """

    conv: torch.Tensor
    ssm: torch.Tensor


class _ScanInputs(NamedTuple):
    """One direction's scan inputs ([B, L, *] channel-last), the backend that scans them, and (streaming)
    the convolution's new state. ``dt``, ``B`` and ``C`` are None until :meth:`Mamba._project` makes them."""

    u: torch.Tensor
    backend: str
    conv_state: Optional[torch.Tensor]
    dt: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    C: Optional[torch.Tensor] = None


def _in_autocast_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the dtype autocast would cast it to for a matmul (itself outside autocast)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return tensor.to(torch.get_autocast_dtype(device))
    return tensor


class Mamba(nn.Module):
    """Unidirectional (causal) Mamba mixer, as mamba-ssm's ``Mamba``.

    ``in_proj`` splits the input into ``x`` and the gate ``z``; ``x`` goes
    through a causal depthwise convolution, SiLU and the selective scan whose
    ``dt``, ``B``, ``C`` are projected from it; the gated result goes through
    ``out_proj``. ``A_log``, ``D`` and the dt bias are used in fp32 under
    autocast.

    Arguments
    ---------
    d_model : int
        Input and output feature size.
    d_state : int
        State size N of the SSM.
    d_conv : int
        Kernel size of the depthwise convolution.
    expand : int
        Inner size is ``expand * d_model``.
    dt_rank : int, optional
        Rank of the dt projection; default (None) ``ceil(d_model / 16)``.
    dt_min, dt_max : float
        Range of the initial step sizes (log-uniform).
    dt_init_floor : float
        Lower bound of the initial step sizes.
    conv_bias : bool
        Bias in the depthwise convolution.
    bias : bool
        Bias in ``in_proj`` and ``out_proj``.
    scan_backend : str, optional
        Selective-scan backend (default: automatic, see ``selective_scan``).
    reverse : bool
        Run anti-causally (last frame first): the same as flipping the
        sequence in time before and after, without copying it.

    Example
    -------
    >>> mixer = Mamba(d_model=16)
    >>> x = torch.randn(2, 50, 16)
    >>> mixer(x).shape
    torch.Size([2, 50, 16])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: Optional[str] = None,
        reverse: bool = False,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            _check_positive_int(name, value)
        if dt_rank is not None:
            _check_positive_int("dt_rank", dt_rank)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.conv_bias = conv_bias
        self.scan_backend = scan_backend
        self.reverse = reverse

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._add_direction("")

    def _add_direction(self, suffix: str) -> None:
        """Creates one direction's conv1d, x_proj, dt_proj, A_log and D (names + suffix)."""
        inner, rank, state = self.d_inner, self.dt_rank, self.d_state
        conv = nn.Conv1d(
            inner, inner, self.d_conv, groups=inner, padding=self.d_conv - 1, bias=self.conv_bias
        )
        setattr(self, "conv1d" + suffix, conv)
        setattr(self, "x_proj" + suffix, nn.Linear(inner, rank + 2 * state, bias=False))
        setattr(self, "dt_proj" + suffix, nn.Linear(rank, inner, bias=True))
        # Vision Mamba names the backward state matrix A_b_log (not A_log_b).
        a_name = "A_log" if not suffix else f"A{suffix}_log"
        setattr(self, a_name, nn.Parameter(torch.empty(inner, state)))
        setattr(self, "D" + suffix, nn.Parameter(torch.empty(inner)))
        self._reset_direction(suffix)

    @torch.no_grad()
    def _reset_direction(self, suffix: str) -> None:
        """mamba-ssm's initialisation of one direction's SSM parameters."""
        dt_min, dt_max, floor = self.dt_range
        dt_proj = getattr(self, "dt_proj" + suffix)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(dt_proj.weight, -bound, bound)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=floor)
        dt_proj.bias.copy_(_inverse_softplus(dt))
        dt_proj.bias._no_reinit = True
        A_log = getattr(self, "A_log" if not suffix else f"A{suffix}_log")
        A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(A_log))
        A_log._no_weight_decay = True
        D = getattr(self, "D" + suffix)
        D.fill_(1.0)
        D._no_weight_decay = True

    def _directions(self) -> Tuple[Tuple[str, bool], ...]:
        """(parameter-name suffix, reverse) of each direction, in the order they are scanned."""
        return (("", self.reverse),)

    def _check_input(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(
                f"{type(self).__name__} expects [batch, time, {self.d_model}]; "
                f"got {tuple(hidden.shape)}."
            )

    def _project_half(self, hidden: torch.Tensor, half: int) -> torch.Tensor:
        """One half of ``in_proj`` (0: ``x``, 1: the gate ``z``), computed alone, [B, L, E]."""
        rows = slice(half * self.d_inner, (half + 1) * self.d_inner)
        bias = self.in_proj.bias
        return F.linear(hidden, self.in_proj.weight[rows], None if bias is None else bias[rows])

    def _project_in(self, hidden: torch.Tensor, mark: Mark = keep) -> Tuple[torch.Tensor, torch.Tensor]:
        """``in_proj``, split into ``x`` and the gate ``z``, both [B, L, E] views."""
        self._check_input(hidden)
        if mark is not keep:
            # Autocast's own cast, made here so that the copy in_proj saves can be marked too.
            hidden = mark("in_proj_input", _in_autocast_dtype(hidden))
        x, z = mark("xz", self.in_proj(hidden)).chunk(2, dim=-1)
        return x, z

    def scan_inputs(
        self, hidden: torch.Tensor, mark: Mark = keep, project: bool = True
    ) -> Tuple[torch.Tensor, List[_ScanInputs]]:
        """Everything before the scans: ``in_proj``, then each direction's convolution and projections.

        :class:`MambaBlock` runs it again in the backward pass when it
        recomputes the projections.

        Arguments
        ---------
        hidden : torch.Tensor
            The mixer's input, [batch, time, d_model].
        mark : callable
            Called as ``mark(name, tensor)`` on every intermediate that the
            backward pass can rebuild (see
            :class:`~speechbrain_mamba.utils.recompute.RecomputedActivations`);
            by default nothing is marked.
        project : bool
            Also make each direction's ``x_proj`` and ``dt`` projections; if
            False the inputs stop after the convolution (``dt``, ``B``, ``C``
            None) and :meth:`_project` completes them.

        Returns
        -------
        The gate ``z`` [batch, time, E] and, per direction, its scan inputs.
        """
        if torch.is_grad_enabled() or mark is not keep:
            x, z = self._project_in(hidden, mark)
        else:
            # Without gradients, x's half of in_proj is made, convolved and freed before z's half: the scans
            # then run without the x half alive (one [B, L, E] tensor less at the peak).
            self._check_input(hidden)
            x, z = self._project_half(hidden, 0), None
        convolved = [self._convolve(x, suffix, reverse, mark) for suffix, reverse in self._directions()]
        del x
        if z is None:
            z = self._project_half(hidden, 1)
        if not project:
            return z, convolved
        return z, [self._project(inputs, suffix, mark) for inputs, (suffix, _) in zip(convolved, self._directions())]

    def _convolve(
        self,
        x: torch.Tensor,
        suffix: str,
        reverse: bool,
        mark: Mark = keep,
        state: Optional[MambaState] = None,
        streaming: bool = False,
    ) -> _ScanInputs:
        """One direction's convolution and SiLU, ``x``: [B, L, E]; the projections are left to :meth:`_project`.

        Activations stay channel-last (time frames of the projections) from
        ``in_proj`` to ``out_proj``; the scan reads them through transposed
        views and, on CUDA, writes its output in the same layout, so no
        transposing copy is made.

        With ``streaming`` (forward direction only) the convolution continues
        from ``state.conv`` (zeros if ``state`` is None).
        """
        conv = getattr(self, "conv1d" + suffix)
        # Causal conv (anti-causal in reverse: no activation is flipped). Streaming: the
        # previous chunk's last inputs go before the chunk, and their outputs are dropped.
        history = self.d_conv - 1
        conv_state = None
        if streaming:
            if state is None:
                previous = x.new_zeros(x.shape[0], history, x.shape[2])
            else:
                previous = state.conv.to(x.dtype).transpose(1, 2)
            x = torch.cat([previous, x], dim=1)
            conv_state = x[:, x.shape[1] - history :].transpose(1, 2)
        # Resolved once for both ops: the PyTorch scans come with the PyTorch convolution.
        backend = resolve_backend(x, self.scan_backend, None if state is None else state.ssm)
        conv_backend = "torch" if backend in ("torch", "reference") else None
        x = mark("conv" + suffix, causal_conv1d_silu(x, conv.weight, conv.bias, reverse=reverse, backend=conv_backend))
        if streaming:
            x = x[:, history:]
        return _ScanInputs(x, backend, conv_state)

    def _project(self, inputs: _ScanInputs, suffix: str, mark: Mark = keep) -> _ScanInputs:
        """``inputs`` with one direction's ``x_proj`` split into ``dt``, ``B``, ``C`` and ``dt_proj`` applied."""
        x_dbl = mark("x_proj" + suffix, getattr(self, "x_proj" + suffix)(inputs.u))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The dt bias is added in fp32 inside the scan, as mamba-ssm does.
        dt = mark("dt" + suffix, F.linear(dt, getattr(self, "dt_proj" + suffix).weight))
        return inputs._replace(dt=dt, B=B, C=C)

    def _scan(
        self,
        inputs: _ScanInputs,
        z: torch.Tensor,
        suffix: str,
        reverse: bool,
        state: Optional[MambaState] = None,
        streaming: bool = False,
        output_scale: float = 1.0,
        output_add: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, MambaState]]:
        """One direction's selective scan: ``output_scale * y + output_add``, [B, E, L] (a view).

        With ``streaming`` the scan continues from ``state.ssm`` (zeros if
        ``state`` is None), and ``(y, new_state)`` is returned.
        """
        A_log = getattr(self, "A_log" if not suffix else f"A{suffix}_log")
        out = selective_scan(
            inputs.u.transpose(1, 2),
            inputs.dt.transpose(1, 2),
            -torch.exp(A_log.float()),
            inputs.B.transpose(1, 2),
            inputs.C.transpose(1, 2),
            D=getattr(self, "D" + suffix).float(),
            z=z.transpose(1, 2),
            delta_bias=getattr(self, "dt_proj" + suffix).bias.float(),
            delta_softplus=True,
            return_last_state=streaming,
            initial_state=None if state is None else state.ssm,
            reverse=reverse,
            output_scale=output_scale,
            output_add=output_add,
            backend=inputs.backend,
        )
        if not streaming:
            return out
        y, ssm_state = out
        return y, MambaState(inputs.conv_state, ssm_state)

    def forward(self, hidden: torch.Tensor, mark: Mark = keep) -> torch.Tensor:
        """[batch, time, d_model] -> [batch, time, d_model], causal in time (anti-causal if reverse;
        :class:`BiMamba` sees the whole sequence).

        ``mark``: see :meth:`scan_inputs`.
        """
        # Without gradients a direction's projections are made just before its scan and its inputs are freed
        # after it: two [B, L, E] tensors less at BiMamba's peak than with both directions' inputs made first.
        lazy = not torch.is_grad_enabled() and mark is keep
        z, inputs = self.scan_inputs(hidden, mark, project=not lazy)
        directions = self._directions()
        y = None
        for suffix, reverse in directions:
            direction = inputs.pop(0)
            if lazy:
                direction = self._project(direction, suffix)
            # BiMamba: the average of both directions comes out of the second scan (fused in the Triton kernel).
            y = self._scan(direction, z, suffix, reverse, output_scale=1.0 / len(directions), output_add=y)
        return self.out_proj(y.transpose(1, 2))

    def _check_state(self, state: MambaState, batch: int) -> None:
        """Refuses a carried state of another batch size or another mixer, which would otherwise fail deep
        in the convolution or the scan with a message about other tensors."""
        expected = {"conv": (self.d_conv - 1, "d_conv - 1"), "ssm": (self.d_state, "d_state")}
        for name, (size, label) in expected.items():
            shape, got = (batch, self.d_inner, size), tuple(getattr(state, name).shape)
            if got != shape:
                raise ValueError(f"state.{name} must be [batch, d_inner, {label}] = {shape}; got {got}.")

    def step(
        self, hidden: torch.Tensor, state: Optional[MambaState] = None
    ) -> Tuple[torch.Tensor, MambaState]:
        """Streaming forward: one chunk [batch, L, d_model] (L >= 1) after the chunks that gave ``state``.

        Feeding a sequence chunk by chunk, each call with the state the previous
        one returned (None for the first), gives ``forward``'s output on the
        whole sequence (up to float rounding). Only for causal mixers.

        Arguments
        ---------
        hidden : torch.Tensor
            The next chunk, [batch, L, d_model].
        state : MambaState, optional
            Returned by the previous call; None at the start of a sequence.

        Returns
        -------
        The chunk's output [batch, L, d_model] and the state after it.

        Example
        -------
        >>> mixer = Mamba(d_model=16)
        >>> x = torch.randn(2, 50, 16)
        >>> first, state = mixer.step(x[:, :20])
        >>> second, state = mixer.step(x[:, 20:], state)
        >>> torch.allclose(torch.cat([first, second], 1), mixer(x), atol=1e-5)
        True
        """
        if self.reverse or hasattr(self, "conv1d_b"):
            raise ValueError("Mamba.step streams causal mixers only (not reverse=True, not BiMamba).")
        x, z = self._project_in(hidden)
        if state is not None:
            self._check_state(state, hidden.shape[0])
        inputs = self._project(self._convolve(x, "", reverse=False, state=state, streaming=True), "")
        y, state = self._scan(inputs, z, "", reverse=False, state=state, streaming=True)
        return self.out_proj(y.transpose(1, 2)), state


class BiMamba(Mamba):
    """Bidirectional Mamba, Vision Mamba's "v2" layout (used by DPMamba and Mamba-TasNet).

    ``in_proj`` and ``out_proj`` (hence the gate) are shared; the backward
    direction has its own ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``
    and ``D_b`` and runs on the time-reversed sequence (scanned in reverse, not
    flipped). The two directions are averaged before ``out_proj``.

    Arguments
    ---------
    d_model : int
        Input and output feature size.
    **kwargs
        The other arguments of :class:`Mamba`.

    Example
    -------
    >>> mixer = BiMamba(d_model=16)
    >>> x = torch.randn(2, 50, 16)
    >>> mixer(x).shape
    torch.Size([2, 50, 16])
    """

    def __init__(self, d_model: int, **kwargs):
        if kwargs.pop("reverse", False):
            raise ValueError("BiMamba already runs in both directions; reverse=True is for Mamba.")
        super().__init__(d_model, **kwargs)
        self._add_direction("_b")

    def _directions(self) -> Tuple[Tuple[str, bool], ...]:
        return (("", False), ("_b", True))


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, weight only (mamba-ssm's RMSNorm).

    Arguments
    ---------
    d_model : int
        Size of the last dimension.
    eps : float
        Added to the mean square.

    Example
    -------
    >>> norm = RMSNorm(8)
    >>> norm(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises in fp32 (one Triton kernel per pass on CUDA), returns x's dtype."""
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(d_model, eps)`` (same parameters and state-dict keys) that runs on the Triton
    kernels of :func:`speechbrain_mamba.ops.layer_norm` on CUDA (SepMamba's blocks).

    Arguments
    ---------
    d_model : int
        Size of the last dimension.
    eps : float
        Added to the variance.

    Example
    -------
    >>> norm = LayerNorm(8)
    >>> x = torch.randn(2, 5, 8)
    >>> torch.allclose(norm(x), nn.functional.layer_norm(x, (8,), norm.weight, norm.bias), atol=1e-6)
    True
    """

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises in fp32; the output dtype is ``nn.LayerNorm``'s (fp32 under autocast)."""
        return layer_norm(x, self.weight, self.bias, self.eps)


class MambaBlock(nn.Module):
    """Pre-norm residual block: ``residual += hidden``; ``hidden = mixer(norm(residual))``.

    The residual is carried separately between blocks, as mamba-ssm's ``Block``
    does, so a stack ends with ``norm_f(hidden + residual)``.

    Arguments
    ---------
    d_model : int
        Feature size.
    bidirectional : bool
        Use :class:`BiMamba` (True) or causal :class:`Mamba` as the mixer.
    norm : str
        ``"rmsnorm"`` or ``"layernorm"``.
    norm_epsilon : float
        Epsilon of the norm.
    recompute_projections : bool
        In training, do not store the norm's output, the projections and the
        convolutions' outputs for the backward pass: it recomputes them from
        the residual, which the norm keeps anyway (the selective scan is not
        run again; its few stored states are kept). About half of a Mamba
        block's stored activations for about a dozen more kernels per block,
        whose launches cost most where the GPU waits for the host (short
        inputs, batch 1, without CUDA graphs). Same gradients.
    **mixer_kwargs
        Passed to the mixer.

    Example
    -------
    >>> block = MambaBlock(16)
    >>> hidden, residual = block(torch.randn(2, 10, 16))
    >>> hidden.shape, residual.shape
    (torch.Size([2, 10, 16]), torch.Size([2, 10, 16]))
    """

    def __init__(
        self,
        d_model: int,
        bidirectional: bool = True,
        norm: str = "rmsnorm",
        norm_epsilon: float = 1e-5,
        recompute_projections: bool = False,
        **mixer_kwargs,
    ):
        super().__init__()
        _check_bool("recompute_projections", recompute_projections)
        self.norm = _make_norm(norm, d_model, norm_epsilon)
        self.mixer = (BiMamba if bidirectional else Mamba)(d_model, **mixer_kwargs)
        self.recompute_projections = recompute_projections

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the new (hidden, residual)."""
        residual = hidden if residual is None else hidden + residual
        if not (self.recompute_projections and self.training and torch.is_grad_enabled()):
            return self.mixer(self.norm(residual)), residual

        # Values only (no reference to the autograd graph, which holds this closure through its hooks).
        residual_values = residual.detach()

        def recompute(mark: Mark) -> None:
            self.mixer.scan_inputs(self.norm(residual_values), mark)

        with RecomputedActivations(recompute, residual.device.type) as mark:
            return self.mixer(self.norm(residual), mark), residual

    def step(
        self,
        hidden: torch.Tensor,
        residual: Optional[torch.Tensor],
        state: Optional[MambaState] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, MambaState]:
        """Streaming ``forward`` of one chunk (causal mixer): returns (hidden, residual, mixer state)."""
        residual = hidden if residual is None else hidden + residual
        hidden, state = self.mixer.step(self.norm(residual), state)
        return hidden, residual, state


def _mixed(block: MambaBlock, residual: torch.Tensor) -> torch.Tensor:
    """The block's new ``hidden`` for a residual sum that is already made."""
    return block(residual)[0]


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}.")


def _check_positive_int(name: str, value: object) -> None:
    # bool is an int, but True as a size is a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps=eps)
    if kind == "layernorm":
        return LayerNorm(d_model, eps=eps)
    raise ValueError(f"norm={kind!r}: expected 'rmsnorm' or 'layernorm'.")


class MambaStack(nn.Module):
    """A stack of pre-norm Mamba blocks and a final norm (Mamba-TasNet's block stack).

    Maps [batch, time, d_model] to the same shape, which makes it a drop-in
    ``intra_model``/``inter_model`` of SpeechBrain's ``Dual_Path_Model``.
    State-dict keys are ``layers.{i}.norm.*``, ``layers.{i}.mixer.*`` and
    ``norm_f.*``. Each block's ``out_proj`` is scaled by ``1/sqrt(num_layers)``
    at initialisation, as mamba-ssm does for pre-norm residual stacks.

    Arguments
    ---------
    d_model : int
        Feature size.
    num_layers : int
        Number of blocks.
    bidirectional : bool
        BiMamba (v2) mixers if True, causal Mamba mixers otherwise.
    norm : str
        ``"rmsnorm"`` (default) or ``"layernorm"``.
    norm_epsilon : float
        Epsilon of the norms.
    final_norm : bool
        End with ``norm_f(hidden + residual)`` (Mamba-TasNet, DPMamba); without
        it the stack returns ``hidden + residual`` (SepMamba).
    max_inference_frames : int, optional
        Without gradients, run the sequences of a batch through the stack in
        groups of at most this many frames (sequences x time): the same output
        with the activation memory of one group. DPMamba on a 60 s mixture
        passes ~120k frames per intra/inter call, whose projections would
        otherwise all be alive at once. None: never split.
    checkpoint_blocks : bool
        In training, keep only each block's inputs for the backward pass and
        run the block again there (activation checkpointing): less memory for
        about one more forward pass of compute.
    recompute_projections : bool
        In training, recompute each block's norm, projections and
        convolutions in the backward pass instead of storing their outputs
        (see :class:`MambaBlock`); no effect with ``checkpoint_blocks``, which
        recomputes the whole block.
    **mixer_kwargs
        Passed to every mixer (``d_state``, ``d_conv``, ``expand``, ``scan_backend``, ``reverse``...).

    Example
    -------
    >>> from speechbrain.lobes.models.dual_path import Dual_Path_Model
    >>> masknet = Dual_Path_Model(
    ...     16, 16, MambaStack(16), MambaStack(16), num_layers=2, K=10,
    ...     linear_layer_after_inter_intra=False,
    ... )
    >>> masknet(torch.randn(3, 16, 40)).shape
    torch.Size([2, 3, 16, 40])
    """

    def __init__(
        self,
        d_model: int,
        num_layers: int = 1,
        bidirectional: bool = True,
        norm: str = "rmsnorm",
        norm_epsilon: float = 1e-5,
        final_norm: bool = True,
        max_inference_frames: Optional[int] = 2**16,
        checkpoint_blocks: bool = False,
        recompute_projections: bool = False,
        **mixer_kwargs,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MambaStack needs num_layers >= 1; got {num_layers}.")
        for name, flag in (("bidirectional", bidirectional), ("final_norm", final_norm),
                           ("checkpoint_blocks", checkpoint_blocks), ("recompute_projections", recompute_projections)):
            _check_bool(name, flag)
        if max_inference_frames is not None:
            _check_positive_int("max_inference_frames", max_inference_frames)
        self.layers = nn.ModuleList(
            MambaBlock(
                d_model, bidirectional, norm, norm_epsilon,
                recompute_projections=recompute_projections and not checkpoint_blocks, **mixer_kwargs,
            )
            for _ in range(num_layers)
        )
        self.norm_f = _make_norm(norm, d_model, norm_epsilon) if final_norm else None
        self.max_inference_frames = max_inference_frames
        self.checkpoint_blocks = checkpoint_blocks
        with torch.no_grad():
            for layer in self.layers:
                layer.mixer.out_proj.weight /= math.sqrt(num_layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, time, d_model] -> [batch, time, d_model]."""
        limit = self.max_inference_frames
        batch, time = hidden.shape[:2]
        if limit and not torch.is_grad_enabled() and batch > 1 and batch * time > limit:
            group = max(1, limit // time)
            # Each group's last sum is written into its rows of the output (no concatenating copy).
            out = torch.empty_like(hidden)
            for rows, part in zip(out.split(group), hidden.split(group)):
                self._blocks(part, out=rows)
        else:
            out = self._blocks(hidden)
        return out if self.norm_f is None else self.norm_f(out)

    def _blocks(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The blocks, then ``hidden + residual`` (into ``out`` if given); no final norm.

        Each block's residual sum is made here, and the previous ``hidden`` and
        ``residual`` are released before its mixer runs: without gradients their
        memory is free for the mixer's activations, and a checkpointed block
        keeps one input (the sum) instead of two.
        """
        residual = None
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            # A block given only its residual sum mixes it: layer(sum) = (mixer(norm(sum)), sum).
            residual = hidden if residual is None else hidden + residual
            hidden = None
            if recompute:
                # A block draws no random numbers: no RNG state to save and restore.
                hidden = checkpoint(_mixed, layer, residual, use_reentrant=False, preserve_rng_state=False)
            else:
                hidden = _mixed(layer, residual)
        return torch.add(hidden, residual, out=out)

    def step(
        self, hidden: torch.Tensor, states: Optional[List[MambaState]] = None
    ) -> Tuple[torch.Tensor, List[MambaState]]:
        """Streaming forward of a causal stack: one chunk [batch, L, d_model] (L >= 1).

        ``states`` (one :class:`MambaState` per block) is what the previous call
        returned, None at the start of a sequence. Chunk by chunk, the outputs
        are ``forward``'s on the whole sequence.

        Arguments
        ---------
        hidden : torch.Tensor
            The next chunk, [batch, L, d_model].
        states : list of MambaState, optional
            Returned by the previous call.

        Returns
        -------
        The chunk's output [batch, L, d_model] and the blocks' states after it.

        Example
        -------
        >>> stack = MambaStack(16, num_layers=2, bidirectional=False)
        >>> x = torch.randn(1, 30, 16)
        >>> first, states = stack.step(x[:, :7])
        >>> second, states = stack.step(x[:, 7:], states)
        >>> torch.allclose(torch.cat([first, second], 1), stack(x), atol=1e-5)
        True
        """
        if states is None:
            states = [None] * len(self.layers)
        elif len(states) != len(self.layers):
            raise ValueError(
                f"states must hold one MambaState per block ({len(self.layers)}); got {len(states)}."
            )
        residual, new_states = None, []
        for layer, state in zip(self.layers, states):
            hidden, residual, state = layer.step(hidden, residual, state)
            new_states.append(state)
        hidden = hidden + residual
        return (hidden if self.norm_f is None else self.norm_f(hidden)), new_states
