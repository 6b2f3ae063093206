"""The selective scan behind one function, with interchangeable backends."""

from speechbrain_mamba.ops.selective_scan import BACKEND_ENV_VAR, BACKENDS, resolve_backend, selective_scan

__all__ = ["BACKEND_ENV_VAR", "BACKENDS", "resolve_backend", "selective_scan"]
