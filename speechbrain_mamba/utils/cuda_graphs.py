"""Replaying captured CUDA graphs of a separation forward (inference) or forward + backward (training).

A DPMamba forward launches about 1800 kernels; on short inputs the GPU waits
for the host to launch them (benchmarks/results/profile_dpmamba_m: 1 s of audio,
83 ms wall for 19 ms of GPU work on an H100), and a 4 s training step keeps
the GPU busy for a third of its time. A CUDA graph launches the whole recorded
sequence at once. It is recorded for fixed shapes, so graphs are kept per input
shape, which suits chunked inference (every chunk but the last has the same
length), services that pad requests to a few lengths, and training on segments
cropped to ``training_signal_len``.
"""

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)


def _graph_key(x: torch.Tensor) -> Tuple:
    """What a recorded graph is specific to: the input's shape, dtype and device, and the autocast state."""
    return (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


def _autocast_without_cache() -> torch.autocast:
    """The current CUDA autocast state with its cache of cast weights off: the cache would outlive a
    capture, so the casts are recorded in the graph instead."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: torch.Tensor


class CUDAGraphCache:
    """Calls ``function(x)`` through a CUDA graph captured for ``x``'s shape.

    The first call with a new (shape, dtype, device, autocast) key runs the
    function ``warmup`` times on a side stream (compiling any Triton kernel),
    then captures it; later calls copy the input into the graph's static input,
    replay, and return a copy of the static output. At most ``max_graphs``
    graphs are kept (least recently used dropped), each holding the memory of
    one forward. Calls outside CUDA, or that need gradients, run ``function``
    directly. The function must be free of host synchronisation and of
    data-dependent control flow (our separation forwards are); if a capture
    fails (e.g. SpeechBrain's stock ``Dual_Path_Model`` copies CPU tensors),
    a warning says why and every later call runs eagerly (``capture_error``).

    Arguments
    ---------
    function : callable
        Maps one tensor to one tensor, e.g. ``lambda mix: separate_mixture(modules, mix, 2)``.
    max_graphs : int
        Number of input shapes whose graphs are kept.
    warmup : int
        Eager runs before a capture.

    Example
    -------
    >>> graphed = CUDAGraphCache(lambda x: 2 * x)
    >>> graphed(torch.ones(3))  # on the CPU: called directly
    tensor([2., 2., 2.])
    """

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 4, warmup: int = 2):
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup must be >= 1; got {max_graphs} and {warmup}.")
        self.function = function
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: "OrderedDict[Tuple, _Captured]" = OrderedDict()
        self.capture_error: Optional[str] = None

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or torch.is_grad_enabled() or self.capture_error is not None:
            return self.function(x)
        key = _graph_key(x)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(x)
            except RuntimeError as error:  # e.g. a host-to-device copy inside the function
                self.capture_error = str(error).split("\n")[0]
                logger.warning("CUDA graphs are off: capturing the forward failed (%s); running it eagerly.",
                               self.capture_error)
                return self.function(x)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            captured.static_input.copy_(x)
        captured.graph.replay()
        return captured.static_output.clone()

    def _capture(self, x: torch.Tensor) -> _Captured:
        static_input = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.function(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with _autocast_without_cache(), torch.cuda.graph(graph):
            static_output = self.function(static_input)
        return _Captured(graph, static_input, static_output)

    def clear(self) -> None:
        """Drops every captured graph (and the memory they hold)."""
        self._graphs.clear()


class _GraphTarget(torch.nn.Module):
    """A fresh module around ``module`` for each capture: ``make_graphed_callables``
    replaces the ``forward`` of the module it is given."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class TrainingCUDAGraphs:
    """Calls ``module(x)`` in training through CUDA graphs of its forward and backward, per input shape.

    Built on ``torch.cuda.make_graphed_callables``: each graphed shape replays
    one recorded forward, and its backward replays one recorded backward that
    returns the gradients of the input and of every parameter of ``module``,
    which autograd then accumulates into ``.grad`` as usual (so the loss,
    gradient accumulation, clipping and the optimizer stay eager and
    unchanged). A shape is captured once it has been seen ``min_calls`` times
    (so a rare shape, e.g. a last short batch, does not cost a capture), for at
    most ``max_graphs`` shapes; other calls run ``module`` eagerly, as do calls
    off CUDA, without gradients, or with any part of ``module`` in eval mode. Each graph
    holds one training step's activations for as long as it is kept.

    ``module`` must be free of host synchronisation and data-dependent control
    flow in its forward and backward (our separation models are), and draw no
    random numbers outside PyTorch's CUDA generator. When a shape is captured,
    no autograd graph of an earlier step may still be alive (drop the loss of
    the previous step): the gradient accumulators it keeps were created on the
    default stream, which a capture may not wait on. A capture that fails
    (e.g. SpeechBrain's stock ``Dual_Path_Model`` copies CPU tensors) raises a
    ``RuntimeError`` saying so, since it can leave CUDA's random generator
    unusable for the rest of the process. The outputs of a graphed call are
    overwritten by the next call of the same shape: finish the backward of one
    step before the next forward. The parameters' gradients of a replayed
    backward are the graph's own buffers (autograd keeps them as ``.grad``
    when ``.grad`` is None), so release them with ``zero_grad(set_to_none=True)``
    after each optimizer step and do not accumulate two backward passes into
    ``.grad``: the second replay would overwrite the first. A graph also keeps
    the parameters' storage and which of them require gradients as they were
    at capture: replacing ``param.data`` or (un)freezing parameters needs a new
    ``TrainingCUDAGraphs``. Not for DDP-wrapped modules (DDP's reducer expects
    its own forward).

    Arguments
    ---------
    module : torch.nn.Module
        Maps one tensor to one tensor, e.g. :class:`~speechbrain_mamba.separation.separator.SeparationForward`.
    max_graphs : int
        Number of input shapes that get graphs.
    min_calls : int
        Calls of a shape before it is captured.
    warmup : int
        Eager forward + backward runs (on a side stream) before each capture.

    Example
    -------
    >>> graphed = TrainingCUDAGraphs(torch.nn.Linear(3, 2))
    >>> graphed(torch.ones(4, 3)).shape  # on the CPU: the module is called directly
    torch.Size([4, 2])
    """

    def __init__(self, module: torch.nn.Module, max_graphs: int = 2, min_calls: int = 2, warmup: int = 3):
        if max_graphs < 1 or min_calls < 1 or warmup < 1:
            raise ValueError(f"max_graphs, min_calls and warmup must be >= 1; got {max_graphs}, {min_calls} and "
                             f"{warmup}.")
        self.module = module
        self.max_graphs = max_graphs
        self.min_calls = min_calls
        self.warmup = warmup
        self._graphed: Dict[Tuple, torch.nn.Module] = {}
        self._calls: Counter = Counter()

    def __len__(self) -> int:
        return len(self._graphed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Graphs are recorded in training mode: a module in eval mode anywhere inside runs eagerly (checked
        # last: it walks every submodule).
        if not (x.is_cuda and torch.is_grad_enabled() and all(m.training for m in self.module.modules())):
            return self.module(x)
        key = _graph_key(x)
        graphed = self._graphed.get(key)
        if graphed is None:
            if len(self._graphed) >= self.max_graphs:  # full: no shape is counted any more
                return self.module(x)
            self._calls[key] += 1
            if self._calls[key] < self.min_calls:
                return self.module(x)
            try:
                with _autocast_without_cache():
                    graphed = torch.cuda.make_graphed_callables(
                        _GraphTarget(self.module), (x.detach().clone().requires_grad_(x.requires_grad),),
                        num_warmup_iters=self.warmup, allow_unused_input=True)
            except RuntimeError as error:  # e.g. a host-to-device copy inside the module
                # A failed capture can leave the CUDA random generator unusable: no eager fallback.
                raise RuntimeError(
                    f"Capturing the training step in a CUDA graph failed ({str(error).splitlines()[0]}). The "
                    "module must not copy between host and device or synchronise, and no autograd graph of an "
                    "earlier step (e.g. a kept loss tensor) may be alive; otherwise train without CUDA graphs "
                    "(cuda_graphs: False).") from error
            self._graphed[key] = graphed
            logger.info("Captured the training forward and backward for inputs of shape %s (%d of at most %d).",
                        tuple(x.shape), len(self._graphed), self.max_graphs)
        return graphed(x)
