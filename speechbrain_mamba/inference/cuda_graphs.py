"""Replaying captured CUDA graphs of a separation forward, one per input shape.

A DPMamba forward launches about 1800 kernels; on short inputs the GPU waits
for the host to launch them (benchmarks/results/profile_dpmamba_m: 1 s of audio,
83 ms wall for 19 ms of GPU work on an H100). A CUDA graph launches the whole
recorded sequence at once. It is recorded for fixed shapes, so graphs are kept
per input shape, which suits chunked inference (every chunk but the last has
the same length) and services that pad requests to a few lengths.
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)


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
        key = (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
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
        # Autocast's cache of cast weights would outlive the capture: record the casts instead.
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        with autocast, torch.cuda.graph(graph):
            static_output = self.function(static_input)
        return _Captured(graph, static_input, static_output)

    def clear(self) -> None:
        """Drops every captured graph (and the memory they hold)."""
        self._graphs.clear()
