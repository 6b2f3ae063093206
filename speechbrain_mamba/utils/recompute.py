"""Selective recomputation: intermediates of a forward pass that the backward pass rebuilds instead of storing.

``torch.utils.checkpoint`` runs a whole region again in the backward pass. In a
Mamba block that would repeat the selective scan, the block's dearest forward
kernel, although its backward only needs the scan's inputs and a few stored
states. :class:`RecomputedActivations` drops only the tensors that the forward
code marks as cheap to rebuild (projections, convolution outputs); the autograd
graph is the one the forward pass built, and every other saved tensor is kept.
"""

from typing import Callable, Dict, List, Optional

import torch

Mark = Callable[[str, torch.Tensor], torch.Tensor]


def keep(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The ``mark`` of a forward pass that recomputes nothing: returns ``tensor``."""
    return tensor


class RecomputedActivations:
    """Saved-tensor hooks that store marked tensors as a name and rebuild them in the backward pass.

    Inside the ``with`` block, the forward code passes each cheap intermediate
    through ``mark(name, tensor)`` before an op can save it. Whatever autograd
    saves of a marked tensor (the tensor or a view of it) is stored as the
    name and the view's geometry. When the backward pass first needs one of
    them, ``recompute(mark)`` runs under ``no_grad``, in the forward pass's
    autocast state, and must mark the same names on tensors of the same
    layout (normally: the same forward code, stopped before the expensive
    part); all of them are rebuilt at once and released after their last use.
    A marked tensor must not be modified in place after it is marked.

    Arguments
    ---------
    recompute : callable
        Reruns the cheap part of the forward code, calling its ``mark``
        argument on each intermediate exactly as the forward pass did.
    device_type : str
        Device type whose autocast state is restored for the recomputation.

    Example
    -------
    >>> weight = torch.randn(8, 8, requires_grad=True)
    >>> x = torch.randn(4, 8)
    >>> def cheap(mark):
    ...     return mark("projected", x @ weight)
    >>> with RecomputedActivations(cheap, "cpu") as mark:
    ...     loss = cheap(mark).tanh().sum()  # tanh saves its output; nothing else is stored
    >>> loss.backward()
    >>> torch.allclose(weight.grad, x.T @ (1 - (x @ weight).tanh() ** 2))
    True
    """

    def __init__(self, recompute: Callable[[Mark], object], device_type: str):
        self._recompute = recompute
        self._device_type = device_type
        self._autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        self._names: Dict[int, str] = {}
        # The marked tensors stay referenced until the forward pass ends, so that no other tensor saved
        # in it can take a freed one's address (addresses identify marked storages).
        self._marked: List[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._rebuilt: Optional[Dict[str, torch.Tensor]] = None
        self._stored = 0  # handles given out by the forward pass
        self._unused = 0  # handles of the current rebuild not yet used

    def __enter__(self) -> Mark:
        self._hooks.__enter__()
        return self._mark

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)
        self._names.clear()
        self._marked.clear()

    def _mark(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel():
            self._names[tensor.untyped_storage().data_ptr()] = name
            self._marked.append(tensor)
        return tensor

    def _pack(self, tensor: torch.Tensor):
        name = self._names.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if name is None:
            # Detached: a node that saves its own output would otherwise hold itself through the
            # output's grad_fn, a cycle that keeps the graph alive (autograd keeps that link itself).
            return tensor.detach()
        self._stored += 1
        return name, tensor.size(), tensor.stride(), tensor.storage_offset()

    def _unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if self._rebuilt is None:
            self._rebuilt = self._rebuild()
            self._unused = self._stored
        name, size, stride, offset = packed
        tensor = self._rebuilt[name].as_strided(size, stride, offset)
        self._unused -= 1
        if self._unused == 0:  # every handle used: the rebuilt tensors live on only where they are used
            self._rebuilt = None
        return tensor

    def _rebuild(self) -> Dict[str, torch.Tensor]:
        rebuilt: Dict[str, torch.Tensor] = {}

        def collect(name: str, tensor: torch.Tensor) -> torch.Tensor:
            rebuilt[name] = tensor
            return tensor

        enabled, dtype = self._autocast
        with torch.no_grad(), torch.autocast(self._device_type, dtype=dtype, enabled=enabled):
            self._recompute(collect)
        return rebuilt
