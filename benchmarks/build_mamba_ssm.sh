#!/usr/bin/env bash
# Builds a wheel of mamba-ssm (the peer kernel that gpu_scan_kernels.py and separation_models.py compare
# against) for this machine's GPU architecture only.
#
# Usage: benchmarks/build_mamba_ssm.sh SDIST WHEEL_DIR
#   SDIST      mamba_ssm-<version>.tar.gz from PyPI (PyPI has only the sdist; ../shared/docs/kernels.md)
#   WHEEL_DIR  where the wheel is written
#
# Needs an NVIDIA GPU, nvcc, torch, setuptools, wheel, ninja, packaging and einops (no network). mamba-ssm's setup.py
# compiles its ten .cu files for about nine architectures (8-15 min on 16 cores); one architecture takes a
# few minutes. The sources are not modified, only the list of target architectures.
set -euo pipefail
sdist=$(realpath "$1")
wheel_dir=$(mkdir -p "$2" && realpath "$2")
work=$(mktemp -d)
tar xzf "$sdist" -C "$work"
src=$(echo "$work"/mamba_ssm-*)
arch=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
python3 - "$src/setup.py" "$arch" <<'EOF'
import sys

path, arch = sys.argv[1:]
text = open(path).read()
anchor = "    # HACK: The compiler flag"
if anchor not in text:
    sys.exit(f"{path}: cannot find where the architecture list ends ({anchor.strip()!r}); setup.py changed")
line = f'    cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]  # build_mamba_ssm.sh: this GPU only\n'
open(path, "w").write(text.replace(anchor, line + anchor, 1))
EOF
MAMBA_FORCE_BUILD=TRUE MAX_JOBS=$(nproc) python3 -m pip wheel --no-build-isolation --no-deps --no-index \
    -w "$wheel_dir" "$src"
ls -la "$wheel_dir"
