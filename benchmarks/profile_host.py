"""Where the host's time goes when a model runs eagerly on the GPU (short inputs are bound by it).

Eager inference of a short mixture takes far longer than its kernels: the CPU
issuing them is the bottleneck (``profile_model.py``'s "GPU busy" share). This
script measures, for one model and length:

- the host cost of each piece of a DPMamba-style model, from the whole step
  down to one scan call: ``N`` calls issued back to back, then one
  synchronisation; when the GPU keeps up, wall time / N is what the host pays
  per call; beside it, the elapsed time of one synchronised call (CUDA events,
  idle gaps included);
- Python's profile of the eager step (cProfile, top functions by own time
  and by cumulative time).

Usage (from the repository root, on a CUDA machine)::

    python benchmarks/profile_host.py --model dpmamba_m --seconds 1 --out benchmarks/results/profile_host
"""

import argparse
import io
import pstats
import sys
from pathlib import Path
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils  # noqa: E402


def host_us_per_call(call: Callable[[], object], calls: int, repeats: int) -> float:
    """Microseconds of wall time per call, ``calls`` issued back to back then one synchronisation; the
    least of ``repeats`` such runs (the host's own noise only ever adds time)."""
    call()
    return 1e3 * min(bench_utils.back_to_back_ms(call, calls) for _ in range(repeats))


def elapsed_us_per_call(call: Callable[[], object], calls: int) -> float:
    """Microseconds between CUDA events around one synchronised call (GPU idle gaps included), averaged."""
    total = 0.0
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        total += start.elapsed_time(end)
    return 1e3 * total / calls


def pieces(modules: torch.nn.ModuleDict, mixture: torch.Tensor) -> List[Tuple[str, Callable[[], object]]]:
    """(name, call) from the whole masknet down to one scan, on the shapes the model sees."""
    from speechbrain_mamba.ops import causal_conv1d_silu, selective_scan

    masknet = modules["masknet"]
    encoded = modules["encoder"](mixture)
    normed = masknet.conv1d(masknet.norm(encoded))
    chunks, _ = masknet._Segmentation(normed, masknet.K)
    layer = masknet.dual_mdl[0]
    batch, channels, chunk_len, num_chunks = chunks.shape
    intra_in = chunks.permute(0, 3, 2, 1).reshape(batch * num_chunks, chunk_len, channels).contiguous()
    stack = layer.intra_mdl
    block = stack.layers[0]
    mixer = block.mixer
    x, z = mixer._project_in(intra_in)
    conv_out = causal_conv1d_silu(x, mixer.conv1d.weight, mixer.conv1d.bias)
    dt, B, C = torch.split(mixer.x_proj(conv_out), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = torch.nn.functional.linear(dt, mixer.dt_proj.weight)
    A = -torch.exp(mixer.A_log.float())

    def scan() -> torch.Tensor:
        return selective_scan(conv_out.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2),
                              C.transpose(1, 2), D=mixer.D, z=z.transpose(1, 2), delta_bias=mixer.dt_proj.bias,
                              delta_softplus=True, output_scale=0.5)

    return [
        ("masknet", lambda: masknet(encoded)),
        ("dual-path layer (intra + inter stacks)", lambda: layer(chunks)),
        ("intra MambaStack (1 block + norm_f)", lambda: stack(intra_in)),
        ("BiMamba mixer", lambda: mixer(intra_in)),
        ("one direction (conv, projections, scan)",
         lambda: mixer._scan(mixer._direction_inputs(x, "", reverse=False), z, "", reverse=False)),
        ("RMSNorm", lambda: block.norm(intra_in)),
        ("in_proj (F.linear)", lambda: mixer.in_proj(intra_in)),
        ("x_proj (F.linear)", lambda: mixer.x_proj(conv_out)),
        ("causal_conv1d_silu", lambda: causal_conv1d_silu(x, mixer.conv1d.weight, mixer.conv1d.bias)),
        ("-exp(A_log)", lambda: -torch.exp(mixer.A_log.float())),
        ("selective_scan", scan),
        ("torch.empty_like", lambda: torch.empty_like(intra_in)),
        ("tensor add", lambda: intra_in + intra_in),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dpmamba_m", help="a file of hparams/ without .yaml (a dual-path model)")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=50, help="calls per host-time measurement")
    parser.add_argument("--repeats", type=int, default=7, help="measurements per piece (the least is kept)")
    parser.add_argument("--compare", default="sepformer",
                        help="models whose whole eager separation is timed in the same run, comma-separated")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    modules, num_spks, _ = bench_utils.load_model(bench_utils.HPARAMS_DIR / f"{args.model}.yaml", device)
    mixture, _ = bench_utils.random_batch(1, int(args.seconds * bench_utils.SAMPLE_RATE), num_spks, device)
    step = bench_utils.inference_step(modules, num_spks, mixture, "fp32")
    lines = [
        f"# Host time of {args.model}, eager fp32 inference of {args.seconds:g} s, batch 1",
        "",
        f"Machine: {bench_utils.machine_description(device=device)}. "
        f"Scan backend: {bench_utils.scan_backend(device)}.",
        f"Command: `python benchmarks/profile_host.py {' '.join(sys.argv[1:])}`",
        "",
        "Host us/call: wall time of calls issued back to back, then one synchronisation, per call "
        f"(the least of {args.repeats} runs). "
        "Elapsed us/call: CUDA events around one synchronised call, averaged (idle gaps included).",
        "",
        "| piece | host us/call | elapsed us/call |",
        "|---|---|---|",
    ]
    with torch.inference_mode():
        for _ in range(3):
            step()
        rows = [("whole separation (encoder, masknet, decoder)", step)] + pieces(modules, mixture)
        for name, call in rows:
            calls = max(3, args.calls // 10) if name.startswith(("whole", "masknet")) else args.calls
            host = host_us_per_call(call, calls, args.repeats)
            gpu = elapsed_us_per_call(call, min(calls, 10))
            lines.append(f"| {name} | {host:.1f} | {gpu:.1f} |")
            print(lines[-1], flush=True)
        for other in filter(None, args.compare.split(",")):
            other_modules, other_spks, _ = bench_utils.load_model(bench_utils.HPARAMS_DIR / f"{other}.yaml", device)
            other_step = bench_utils.inference_step(other_modules, other_spks, mixture, "fp32")
            host = host_us_per_call(other_step, max(3, args.calls // 10), args.repeats)
            lines.append(f"| {other}: whole separation | {host:.1f} | {elapsed_us_per_call(other_step, 3):.1f} |")
            print(lines[-1], flush=True)
            del other_modules
        profiler = bench_utils.cprofile_calls(step, 5)
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
        lines += ["", f"## cProfile of 5 eager steps, by {order}", "", "```", text.getvalue().strip(), "```"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-40:]))


if __name__ == "__main__":
    main()
