"""A fast drop-in for ``nn.GroupNorm(1, C)``, the "ln" norm of Dual_Path_Model.

On CUDA, ``GroupNorm`` with one group reduces each sample in one thread block,
so at batch 1 the whole normalisation is serial: it took 62% of a DPMamba-M
inference on an H100 (speechbrain.md). :func:`speechbrain_mamba.ops.single_group_norm`
spreads the statistics over the whole device (Triton kernels on CUDA, two passes of
PyTorch reductions elsewhere), reads any memory layout in place and can add the
residual that follows the norm in the same pass.
"""

from typing import Optional

import torch
import torch.nn as nn

from speechbrain_mamba.ops.norm import single_group_norm


class SingleGroupNorm(nn.Module):
    """``nn.GroupNorm(1, num_channels)``: same result, same ``weight``/``bias`` keys.

    Normalises each sample over all its channels and positions, then applies a
    per-channel affine map. Statistics are computed in fp32; the output has the
    input's dtype.

    Arguments
    ---------
    num_channels : int
        Size of dimension 1 of the input [batch, channels, *].
    eps : float
        Added to the variance.
    affine : bool
        Learn a per-channel scale (``weight``) and shift (``bias``).

    Example
    -------
    >>> norm = SingleGroupNorm(8, eps=1e-8)
    >>> reference = torch.nn.GroupNorm(1, 8, eps=1e-8)
    >>> norm.load_state_dict(reference.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 8, 5, 3)
    >>> torch.allclose(norm(x), reference(x), atol=1e-5)
    True
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [batch, num_channels, *] -> same shape and dtype; ``+ residual`` (same shape) if given."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"SingleGroupNorm expects [batch, {self.num_channels}, ...]; got {tuple(x.shape)}."
            )
        return single_group_norm(x, self.weight, self.bias, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


def replace_single_group_norms(module: nn.Module) -> nn.Module:
    """Swaps every ``nn.GroupNorm`` with one group inside ``module`` for a
    :class:`SingleGroupNorm` carrying the same parameters; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm) and child.num_groups == 1:
            fast = SingleGroupNorm(child.num_channels, child.eps, child.affine)
            if child.affine:  # keep the very Parameters: device, dtype and values
                fast.weight, fast.bias = child.weight, child.bias
            setattr(module, name, fast)
        else:
            replace_single_group_norms(child)
    return module
