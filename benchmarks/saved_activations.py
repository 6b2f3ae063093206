"""What a training forward pass stores for its backward pass, by module: where the training memory goes.

Every tensor that autograd saves during one forward pass of a model from ``hparams/`` is counted once
per storage (views of one storage count once, under the module that saved it first), grouped by the
module path with layer indices folded (``dual_mdl.*.intra_mdl.layers.*.mixer``), then by shape and
dtype. Parameters are not counted. Tensors saved inside a Mamba block that recomputes its projections
(``recompute_projections``) are invisible here (that option's own hooks take them), so measure the
default configuration.

    python benchmarks/saved_activations.py --model dpmamba_m --seconds 4 --dtype bf16
"""

import argparse
import collections
import re
from typing import Counter, List, Tuple

import torch

import bench_utils


def saved_bytes(modules: torch.nn.ModuleDict, num_spks: int, mixture: torch.Tensor,
                dtype: str) -> Counter[Tuple[str, Tuple[int, ...], str]]:
    """Bytes saved for backward by one training forward, keyed by (module path, shape, dtype)."""
    from speechbrain_mamba.separation.separator import SeparationForward

    modules.train()
    path: List[str] = ["(top)"]

    def leave(*_) -> None:  # a forward hook that returns nothing keeps the module's output
        path.pop()

    for name, module in modules.named_modules():
        if name:
            module.register_forward_pre_hook(lambda _m, _args, name=name: path.append(name))
            module.register_forward_hook(leave)
    parameters = {p.untyped_storage().data_ptr() for p in modules.parameters()}
    seen = set()
    saved: Counter[Tuple[str, Tuple[int, ...], str]] = collections.Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if tensor.numel() and key not in seen and key not in parameters:
            seen.add(key)
            where = re.sub(r"\.\d+(?=\.|$)", ".*", path[-1])
            saved[(where, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))] += storage.nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with bench_utils.autocast(mixture.device, dtype):
            SeparationForward(modules, num_spks)(mixture)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dpmamba_m", help="a file of hparams/ without .yaml, or model:key=value")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=sorted(bench_utils.DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=25, help="rows of the (module, shape, dtype) table")
    args = parser.parse_args()

    device = torch.device(args.device)
    stem, overrides = bench_utils.parse_model(args.model)
    modules, num_spks, _ = bench_utils.load_model(bench_utils.HPARAMS_DIR / f"{stem}.yaml", device, overrides)
    mixture, _ = bench_utils.random_batch(args.batch, int(8000 * args.seconds), num_spks, device)
    saved = saved_bytes(modules, num_spks, mixture, args.dtype)
    total = sum(saved.values())
    mib = 2.0**20
    print(f"# Saved for backward: {args.model}, {args.seconds:g} s, batch {args.batch}, {args.dtype}\n")
    print(bench_utils.machine_description(device=device) + f" Scan backend: {bench_utils.scan_backend(device)}.\n")
    print(f"Total {total / mib:.1f} MiB, counted once per storage.\n")
    by_module: Counter[str] = collections.Counter()
    for (where, _, _), size in saved.items():
        by_module[where] += size
    print("| module | MiB | share |\n|---|---|---|")
    for where, size in by_module.most_common():
        print(f"| {where} | {size / mib:.1f} | {100 * size / total:.1f} % |")
    print("\n| module | shape | dtype | MiB |\n|---|---|---|---|")
    for (where, shape, dtype), size in saved.most_common(args.top):
        print(f"| {where} | {tuple(shape)} | {dtype} | {size / mib:.1f} |")


if __name__ == "__main__":
    main()
