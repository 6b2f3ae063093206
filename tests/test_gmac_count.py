"""The GMAC count of benchmarks/separation_models.py: the Mamba mixer's scan and convolution by their formulas."""

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from speechbrain_mamba.lobes import BiMamba

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import separation_models  # noqa: E402  (registers the counted ops)


def test_counted_ops_count_a_bimamba_scan_and_convolution_and_change_no_output():
    torch.manual_seed(0)
    mixer = BiMamba(d_model=8, d_state=4, d_conv=3)  # E = 16 channels, N = 4 states, K = 3 taps
    hidden = torch.randn(2, 10, 8)
    batch, length, channels, states, taps = 2, 10, 16, 4, 3
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), separation_models.counted_ops(), counter:
        counted = mixer(hidden)
    counts = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    scan = sum(count for op, count in counts.items() if "selective_scan" in op)
    conv = sum(count for op, count in counts.items() if "causal_conv1d_silu" in op)
    # Two directions: 9 B E N L for the scan, B E L each for softplus, D skip and gate; 2 B L E K for the filter.
    assert scan == 2 * (9 * batch * channels * states * length + 3 * batch * channels * length)
    assert conv == 2 * (2 * batch * length * channels * taps)
    with torch.no_grad():
        torch.testing.assert_close(counted, mixer(hidden), rtol=0, atol=0)
