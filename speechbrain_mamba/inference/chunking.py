"""Separating long recordings in overlapping chunks with a consistent speaker order."""

import itertools
import math
from typing import Callable, List

import torch


def best_permutation(reference: torch.Tensor, estimate: torch.Tensor) -> List[int]:
    """The order of ``estimate``'s sources that best matches ``reference``'s.

    Maximises the summed inner products ``<reference[:, i], estimate[:, p[i]]>``
    over all permutations ``p``, which is minimising the squared error
    ``||reference - estimate[:, p]||^2``. Unnormalised on purpose: a source that
    is silent in the overlap (or only holds leakage of another speaker) then
    weighs nothing, where a normalised correlation would let it vote.

    Arguments
    ---------
    reference : torch.Tensor
        [time, num_spks], the order to follow.
    estimate : torch.Tensor
        [time, num_spks], the same time span from another chunk.

    Returns
    -------
    List[int]
        ``p`` such that ``estimate[:, p]`` is in ``reference``'s order.

    Example
    -------
    >>> sources = torch.randn(100, 3)
    >>> best_permutation(sources, sources[:, [2, 0, 1]])
    [1, 2, 0]
    """
    scores = reference.double().T @ estimate.double()  # [i, j] = <reference_i, estimate_j>
    num_spks = scores.shape[0]
    permutations = itertools.permutations(range(num_spks))
    return list(max(permutations, key=lambda p: sum(scores[i, p[i]] for i in range(num_spks))))


def separate_in_chunks(
    separate: Callable[[torch.Tensor], torch.Tensor], mixture: torch.Tensor, chunk_length: int, overlap: int
) -> torch.Tensor:
    """Separates a long mixture chunk by chunk: bounded model memory, one speaker order throughout.

    Chunks of ``chunk_length`` samples start every ``chunk_length - overlap``
    samples (the last one is shorter, still longer than ``overlap``); a
    mixture no longer than one chunk is separated in one call. The sources of
    each chunk are put in the order of the previous chunk's by
    :func:`best_permutation` on their ``overlap`` common samples, then
    cross-faded over them (weights ``sin^2``/``cos^2``, which sum to one).
    The model sees one chunk at a time; the mixture and the estimates of the
    whole recording stay in memory (4 bytes per sample per signal).

    The speaker order is that of the first chunk. It can only be followed
    across an overlap where someone speaks: keep the overlap long enough
    (seconds) for the recording.

    Arguments
    ---------
    separate : Callable[[torch.Tensor], torch.Tensor]
        [time] mixture -> [time, num_spks] estimates (the model).
    mixture : torch.Tensor
        [time] waveform.
    chunk_length : int
        Samples per chunk; 0 separates the whole mixture at once.
    overlap : int
        Samples shared by consecutive chunks, at least 1 and at most ``chunk_length // 2``.

    Returns
    -------
    torch.Tensor
        [time, num_spks] estimates, on the device and dtype ``separate`` returns.

    Example
    -------
    >>> sources = torch.randn(400, 2)
    >>> mixture = torch.arange(400.0)  # lets the oracle below see where its chunk starts
    >>> orders = iter([[0, 1], [1, 0], [1, 0], [0, 1]])
    >>> def oracle(chunk):  # the right sources, in any order
    ...     start = int(chunk[0])
    ...     return sources[start : start + len(chunk)][:, next(orders)]
    >>> torch.allclose(separate_in_chunks(oracle, mixture, chunk_length=160, overlap=60), sources)
    True
    """
    length = mixture.shape[0]
    if chunk_length <= 0 or length <= chunk_length:
        return separate(mixture)
    if not 1 <= overlap <= chunk_length // 2:
        raise ValueError(f"overlap must be in [1, chunk_length // 2] = [1, {chunk_length // 2}] samples, not {overlap}")
    hop = chunk_length - overlap
    fade_in = torch.sin(0.5 * math.pi * (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap) ** 2
    output = previous_tail = None
    for start in range(0, length - overlap, hop):
        end = min(start + chunk_length, length)
        estimate = separate(mixture[start:end])
        if output is None:
            output = estimate.new_zeros(length, estimate.shape[1])
            fade_in = fade_in.to(estimate)[:, None]
        else:
            estimate = estimate[:, best_permutation(previous_tail, estimate[:overlap])]
            estimate[:overlap] = (1 - fade_in) * previous_tail + fade_in * estimate[:overlap]
        if end == length:
            output[start:end] = estimate
        else:
            output[start : end - overlap] = estimate[:-overlap]
            previous_tail = estimate[-overlap:]
    return output
