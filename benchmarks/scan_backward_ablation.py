"""Where the frame-by-frame backward scan kernel's time goes: ablations on DPMamba-M's shapes.

Times ``_backward`` of ``speechbrain_mamba/ops/scan_triton.py`` alone (the forward pass and its chunk
states are made once, outside the timing) with ``triton.testing.do_bench`` (median), next to the forward
pass, for:

- settings of ``_scan_bwd_sequential_kernel`` (``BACKWARD_CONFIG`` fields): how its recomputing walk
  loads and unrolls frames, channels per program and warps;
- ablations, copies of the module with one part of that kernel's source removed. Their gradients are
  wrong; only their time means something:

  - ``no-recompute``: the walks that recompute states (those that find the states entering a chunk's
    parts and those that park a part's states in the scratch slot) are skipped;
  - ``no-dBdC``: the channel blocks' shares of ``dB`` and ``dC`` are not stored (so the two sums over
    the channels that make them are not computed either);
  - ``no-du-ddelta``: ``du`` and ``ddelta`` are not stored (``dz`` still is).

The timed ``_backward`` includes the caller's sum of the dB/dC shares over channel blocks.

Shapes and inputs are those of ``gpu_scan_kernels.py`` (channel-last, as the Mamba mixer passes them).

Usage (from the repository root, on a GPU)::

    python benchmarks/scan_backward_ablation.py
"""
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utils import load_module  # noqa: E402
from gpu_scan_kernels import header, make_inputs  # noqa: E402
from speechbrain_mamba.ops import scan_triton  # noqa: E402

SHAPES = [("intra-4s", 33, 512, 250), ("inter-4s", 250, 512, 33), ("intra-60s", 481, 512, 250),
          ("inter-60s", 250, 512, 481)]
# name -> (source text removed from _scan_bwd_sequential_kernel, its replacement)
ABLATIONS = {
    "no-recompute": ("    for step in range(0, (count + UNROLL - 1) // UNROLL):\n",
                     "    for step in range(0, 0):\n"),
    "no-dBdC": ("                tl.store(dB_part_ptr + part_seq + t * N, tl.sum(g * dtu, axis=0), "
                "mask=n_mask & valid)\n"
                "                tl.store(dC_part_ptr + part_seq + t * N, tl.sum(h * dout[:, None], axis=0), "
                "mask=n_mask & valid)\n", ""),
    "no-du-ddelta": ("                tl.store(du_row + t * sdu_l, grad_u.to(du_ptr.dtype.element_ty), mask=valid)\n"
                     "                tl.store(dd_row + t * sdd_l, grad_delta.to(ddelta_ptr.dtype.element_ty), "
                     "mask=valid)\n", ""),
}
SETTINGS = {
    "recompute 1 ahead, not unrolled": dict(sequential_prefetch=1, sequential_unroll=1),  # as at 4995b21
    "recompute 4 ahead, 4 unrolled": dict(sequential_unroll=4),
    "8 channels": dict(sequential_block_e=8),
    "32 channels, 2 warps": dict(sequential_block_e=32, sequential_num_warps=2),
}


def ablated_module(name: str, folder: Path) -> ModuleType:
    """A copy of scan_triton with one ablation applied (Triton reads kernels' source from their file)."""
    old, new = ABLATIONS[name]
    source = Path(scan_triton.__file__).read_text()
    if source.count(old) != 1:
        raise RuntimeError(f"ablation {name}: the kernel source it removes was not found once; update ABLATIONS")
    path = folder / f"scan_{name.replace('-', '_')}.py"
    path.write_text(source.replace(old, new))
    return load_module(path)


def times(module: ModuleType, inputs: dict, backward_fields: dict, time_forward: bool = False,
          forward_fields: Optional[dict] = None) -> tuple:
    """(forward ms or None, backward ms, stored chunk states in bytes) of ``module``'s ``_forward`` /
    ``_backward`` on ``inputs``; ``*_fields`` replace fields of the default configs."""
    import triton.testing

    x = {name: value.detach() for name, value in inputs.items()}
    B, C = x["B"].unsqueeze(1), x["C"].unsqueeze(1)
    fp32 = x["u"].dtype == torch.float32
    forward_config = module.replace(module.FORWARD_CONFIG_FP32 if fp32 else module.FORWARD_CONFIG,
                                    **(forward_fields or {}))
    backward_config = module.replace(module.BACKWARD_CONFIG, **backward_fields)

    def forward():
        return module._forward(x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"], None, True,
                               False, 1.0, None, True, forward_config)

    _, _, chunks, plan = forward()
    dy = torch.randn_like(x["u"])

    def backward():
        module._backward(x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"], None, dy, None, chunks,
                         plan, True, False, 1.0, False, backward_config)

    backward()
    bench = dict(warmup=5, rep=40, return_mode="median")
    forward_ms = triton.testing.do_bench(forward, **bench) if time_forward else None
    return forward_ms, triton.testing.do_bench(backward, **bench), chunks.numel() * chunks.element_size()


def main() -> None:
    print(header(), flush=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        ablated = {name: ablated_module(name, Path(folder)) for name in ABLATIONS}
        for dtype in (torch.float32, torch.bfloat16):
            for shape, batch, channels, length in SHAPES:
                inputs = make_inputs(batch, channels, length, dtype, False)
                forward_ms, backward_ms, _ = times(scan_triton, inputs, {}, time_forward=True)
                cells = [f"forward {forward_ms:.3f} ms", f"backward {backward_ms:.3f} ms"]
                for name, fields in SETTINGS.items():
                    cells.append(f"{name} {times(scan_triton, inputs, fields)[1]:.3f}")
                for name, module in ablated.items():
                    ms = times(module, inputs, {})[1]
                    cells.append(f"{name} {ms:.3f} ({100 * (ms / backward_ms - 1):+.0f} % time)")
                print(f"[{time.monotonic() - start:.0f}s] {str(dtype)[6:]} {shape}: " + " | ".join(cells),
                      flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
