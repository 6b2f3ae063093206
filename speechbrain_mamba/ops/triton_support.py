"""What the Triton kernels' wrappers share; importing this module does not import Triton."""

import functools
import os
from typing import Optional

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host, in plain integers.

    ``triton.cdiv`` is a constexpr function, several microseconds per host
    call; short inputs are bound by the host's time per kernel launch.

    Arguments
    ---------
    a, b : int
        Dividend and (positive) divisor.

    Returns
    -------
    int
        The quotient rounded up.
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two at least ``n``, on the host (as ``triton.next_power_of_2``, but 1 for 0).

    Arguments
    ---------
    n : int
        A non-negative integer.

    Returns
    -------
    int
        A power of two.
    """
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached: the query costs the host time).

    Arguments
    ---------
    device_index : int
        The CUDA device.

    Returns
    -------
    int
        Its number of SMs, which the kernels' wrappers size their grids by.
    """
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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
        # No offset from the data pointer passes the end of the storage (strides are never negative):
        # the exact reach is summed only for storages of more than 2**31 elements.
        if tensor is None or tensor.untyped_storage().nbytes() <= 2**31 * tensor.element_size():
            continue
        reach = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
        if reach > 2**31 - 1:
            raise ValueError(
                f"backend='triton' indexes with 32-bit offsets; {name} {tuple(tensor.shape)} with strides "
                f"{tensor.stride()} reaches offset {reach} > 2**31 - 1. Use backend='torch' or split the batch."
            )
