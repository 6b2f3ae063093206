"""One eager training step of a model on the GPU: operators grouped by input shapes, by the GPU time of their kernels.

Finer than ``profile_model.py``'s operator table: it tells the dual-path activations' reductions
(``[1, 256, 250, 34]``) from the scan's partial sums or the convolution's weight partials. Prints a markdown
table (after three warm-up steps, one profiled step).

Usage (from the repository root, on a GPU)::

    python benchmarks/profile_by_shape.py [--model dpmamba_m] [--batch 1] [--dtype bf16] [--seconds 4] [--top 70]
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dpmamba_m", help="model[:option=value], a file of hparams/")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(bench_utils.DTYPES))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--top", type=int, default=70)
    args = parser.parse_args()
    device = torch.device("cuda")
    stem, overrides = bench_utils.parse_model(args.model)
    net, num_spks, _ = bench_utils.load_model(bench_utils.HPARAMS_DIR / f"{stem}.yaml", device, overrides)
    samples = int(args.seconds * bench_utils.SAMPLE_RATE)
    mixture, sources = bench_utils.random_batch(args.batch, samples, num_spks, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    step = bench_utils.training_step(net, num_spks, mixture, sources, args.dtype, optimizer)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    rows = sorted(((e.key, str(e.input_shapes)[:150], e.count, e.self_device_time_total / 1e3)
                   for e in prof.key_averages(group_by_input_shape=True)
                   if e.device_type == DeviceType.CPU and e.self_device_time_total > 0), key=lambda row: -row[3])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.model} training step, "
          f"{args.seconds} s, batch {args.batch}, {args.dtype}: GPU ms of the operators' own kernels "
          f"{sum(row[3] for row in rows):.2f}\n")
    print("| operator | input shapes | calls | GPU ms |\n|---|---|---|---|")
    for name, shapes, count, ms in rows[:args.top]:
        print(f"| {name} | {shapes} | {count} | {ms:.3f} |")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main()
