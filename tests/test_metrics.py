"""Separation metrics against independent oracles: SDR against mir_eval's BSS-eval, SI-SNR against its definition."""

import itertools

import numpy as np
import pytest
import torch
from mir_eval.separation import bss_eval_sources

from speechbrain_mamba.separation.metrics import separation_scores, si_snr

RATE = 8000
pytestmark = pytest.mark.filterwarnings("ignore:mir_eval.separation.bss_eval_sources:FutureWarning")


def speech_like(rng: np.random.Generator, length: int) -> np.ndarray:
    """Band-limited noise with a syllable-rate envelope."""
    noise = rng.standard_normal(length + 64)
    taps = np.hanning(rng.integers(4, 16))
    wave = np.convolve(noise, taps / taps.sum(), mode="valid")[:length]
    t = np.arange(length) / RATE
    return wave * (0.3 + np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, np.pi)) ** 2)


def utterance(seed: int, num_spks: int, length: int = RATE):
    """Sources [spks, T], the mixture, and estimates [spks, T] that are the sources slightly filtered, with
    noise and some leakage of the other sources, in a shuffled order; and that order."""
    rng = np.random.default_rng(seed)
    sources = np.stack([speech_like(rng, length) * rng.uniform(0.5, 2) for _ in range(num_spks)])
    mixture = sources.sum(0)
    estimates = []
    for i, source in enumerate(sources):
        filtered = np.convolve(source, [1.0, rng.uniform(0.1, 0.3), rng.uniform(-0.1, 0.1)], mode="full")[:length]
        leakage = sum(rng.uniform(0.05, 0.2) * sources[j] for j in range(num_spks) if j != i)
        estimates.append(filtered + leakage + 0.05 * np.std(source) * rng.standard_normal(length))
    order = rng.permutation(num_spks)
    while num_spks > 1 and (order == np.arange(num_spks)).all():
        order = rng.permutation(num_spks)
    return sources, mixture, np.stack(estimates)[order], order


def oracle_si_snr(estimate: np.ndarray, target: np.ndarray) -> float:
    """SI-SNR (dB) from its definition: zero-mean, project the estimate on the target."""
    estimate, target = estimate - estimate.mean(), target - target.mean()
    projection = (estimate @ target) / (target @ target) * target
    residual = estimate - projection
    return float(10 * np.log10((projection @ projection) / (residual @ residual)))


UTTERANCES = [(0, 2), (1, 2), (2, 3)]  # (seed, number of speakers): 1 s at 8 kHz each


@pytest.mark.parametrize("seed, num_spks", UTTERANCES)
def test_scores_match_mir_eval_and_the_si_snr_definition(seed, num_spks):
    sources, mixture, estimates, order = utterance(seed, num_spks)
    scores = separation_scores(
        torch.from_numpy(mixture), torch.from_numpy(sources.T.copy()), torch.from_numpy(estimates.T.copy())
    )

    # SDR: mir_eval's BSS-eval v3 (512-tap distortion filter), finding the permutation itself.
    sdr, _, _, perm = bss_eval_sources(sources, estimates, compute_permutation=True)
    assert (order[perm] == np.arange(num_spks)).all(), "mir_eval did not undo the shuffle"
    sdr_mixture, _, _, _ = bss_eval_sources(sources, np.stack([mixture] * num_spks), compute_permutation=False)
    assert scores["sdr"] == pytest.approx(sdr.mean(), abs=1e-3)
    assert scores["sdr_i"] == pytest.approx(sdr.mean() - sdr_mixture.mean(), abs=1e-3)

    # SI-SNR: the best permutation by brute force, from the definition.
    best = max(
        np.mean([oracle_si_snr(estimates[e], sources[t]) for t, e in enumerate(p)])
        for p in itertools.permutations(range(num_spks))
    )
    mixture_si_snr = np.mean([oracle_si_snr(mixture, source) for source in sources])
    assert scores["si-snr"] == pytest.approx(best, abs=1e-6)
    assert scores["si-snr_i"] == pytest.approx(best - mixture_si_snr, abs=1e-6)
    assert 5 < scores["si-snr"] < 30 and scores["si-snr_i"] > 0  # a meaningful, not degenerate, case


def test_scores_averaged_over_utterances_match_mir_eval():
    """What test_results.csv's avg row holds: the mean over utterances of the per-utterance means."""
    ours, theirs = [], []
    for seed, num_spks in UTTERANCES[:2]:
        sources, mixture, estimates, _ = utterance(seed, num_spks)
        scores = separation_scores(
            torch.from_numpy(mixture), torch.from_numpy(sources.T.copy()), torch.from_numpy(estimates.T.copy())
        )
        ours.append(scores["sdr"])
        theirs.append(bss_eval_sources(sources, estimates)[0].mean())
    assert np.mean(ours) == pytest.approx(np.mean(theirs), abs=1e-3)


def test_si_snr_is_scale_and_offset_invariant_and_matches_the_definition():
    rng = np.random.default_rng(5)
    target = speech_like(rng, 4000)
    estimate = target + 0.1 * rng.standard_normal(4000)
    value = si_snr(torch.from_numpy(estimate), torch.from_numpy(target)).item()
    assert value == pytest.approx(oracle_si_snr(estimate, target), abs=1e-6)
    scaled = si_snr(torch.from_numpy(3.0 * estimate + 0.5), torch.from_numpy(target)).item()
    assert scaled == pytest.approx(value, abs=1e-6)
