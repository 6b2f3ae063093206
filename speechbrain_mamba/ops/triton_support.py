"""What the Triton kernels' wrappers share; importing this module does not import Triton."""

import os
from typing import Optional

import torch


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_32bit_offsets(**tensors: Optional[torch.Tensor]) -> None:
    """Raises a ValueError naming the first tensor with an element beyond the kernels' 32-bit offsets.

    Arguments
    ---------
    **tensors : torch.Tensor or None
        The kernels' inputs and outputs by name (None is skipped).
    """
    for name, tensor in tensors.items():
        if tensor is None or not tensor.numel():
            continue
        reach = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
        if reach > 2**31 - 1:
            raise ValueError(
                f"backend='triton' indexes with 32-bit offsets; {name} {tuple(tensor.shape)} with strides "
                f"{tensor.stride()} reaches offset {reach} > 2**31 - 1. Use backend='torch' or split the batch."
            )
