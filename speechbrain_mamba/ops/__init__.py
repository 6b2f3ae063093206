"""The selective scan behind one function, with interchangeable backends, the mixer's causal convolution and
the models' norms."""

from speechbrain_mamba.ops.causal_conv import causal_conv1d_silu
from speechbrain_mamba.ops.norm import layer_norm, rms_norm, single_group_norm
from speechbrain_mamba.ops.selective_scan import BACKEND_ENV_VAR, BACKENDS, resolve_backend, selective_scan

__all__ = [
    "BACKEND_ENV_VAR", "BACKENDS", "causal_conv1d_silu", "layer_norm", "resolve_backend", "rms_norm", "selective_scan",
    "single_group_norm",
]
