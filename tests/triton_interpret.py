"""Run a module's Triton kernels on the CPU, through Triton's interpreter, inside a normal test session.

Triton reads ``TRITON_INTERPRET`` when its ``@triton.jit`` decorators run (its
own library functions included), so :func:`interpreted` imports fresh copies of
triton and of the kernel module with the variable set, and afterwards puts back
the modules it found and the variable (a GPU test later in the same session then
compiles the kernels for real).
"""

import contextlib
import importlib
import os
import sys
from types import ModuleType
from typing import Callable, Dict, Iterator, Sequence


def _take_modules(module_name: str) -> Dict[str, ModuleType]:
    """Removes ``module_name`` and triton's Python modules from ``sys.modules`` and returns them.

    The compiled extension (``triton._C``) stays: it cannot be loaded twice.
    """
    names = [n for n in sys.modules if n == module_name or n == "triton"
             or (n.startswith("triton.") and not n.startswith("triton._C"))]
    return {n: sys.modules.pop(n) for n in names}


@contextlib.contextmanager
def interpreted(module_name: str, forget: Sequence[Callable] = ()) -> Iterator[ModuleType]:
    """Yields a fresh import of ``module_name`` whose Triton kernels run in the interpreter.

    Arguments
    ---------
    module_name : str
        Dotted name of the module that defines the kernels (it must import
        triton itself; modules that merely call it keep their references).
    forget : sequence of functools.lru_cache functions
        Loaders that cache whichever copy of the module they imported first
        (e.g. ``load_triton_conv``): cleared on entry and on exit, so that
        each side gets its own copy.

    Example
    -------
    >>> with interpreted("speechbrain_mamba.ops.causal_conv_triton") as kernels:  # doctest: +SKIP
    ...     out = kernels.causal_conv1d_silu_triton(torch.randn(1, 5, 4), torch.randn(4, 1, 4), None)
    """
    for loader in forget:
        loader.cache_clear()
    saved_env, saved_modules = os.environ.get("TRITON_INTERPRET"), _take_modules(module_name)
    os.environ["TRITON_INTERPRET"] = "1"
    package_name, _, attribute = module_name.rpartition(".")
    try:
        yield importlib.import_module(module_name)
    finally:
        for loader in forget:
            loader.cache_clear()
        _take_modules(module_name)
        sys.modules.update(saved_modules)
        # The fresh import also set the package's attribute: point it back as well.
        package = sys.modules.get(package_name)
        if package is not None:
            if module_name in saved_modules:
                setattr(package, attribute, saved_modules[module_name])
            elif hasattr(package, attribute):
                delattr(package, attribute)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
