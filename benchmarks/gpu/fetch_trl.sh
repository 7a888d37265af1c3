#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/trl_ppo_gpu.py needs on the borrowed GPU machine (Python 3.12,
# x86-64, no package index; torch 2.11, transformers 5.17, accelerate 1.15, numpy, pyarrow, ...
# already there; see /work/shared/gpu/README.md) into DIR (default .whl-trl, git-ignored by `.whl*/`).
#
#   bash benchmarks/gpu/fetch_trl.sh [DIR]
#
# TRL 0.24.0 declares accelerate>=1.4, datasets>=3.0, transformers>=4.56.1 and imports pandas at
# module level; datasets 5.2.0 adds dill, multiprocess, xxhash (and pandas, fsspec, pyarrow>=24,
# huggingface-hub>=1.31, tqdm, pyyaml, filelock, packaging, which the machine has through
# transformers/torch, except pandas). pandas 3.1.1 needs numpy>=2 and python-dateutil (there with
# matplotlib). Nothing of transformers/torch/accelerate is carried: TRL 0.24.0 runs with
# transformers 5.17 (rehearsed on CPU). The driver puts the install folder at the END of sys.path,
# so what the machine already has wins over these wheels.
#
# Environment: PYVER (default 3.12; 3.11 fetches the same versions for this machine's CPU
# rehearsal venv).
set -euo pipefail
dir="${1:-.whl-trl}"
PYVER="${PYVER:-3.12}"
WHEELS=(
    trl==0.24.0          # PPOTrainer (top-level in 0.24; later versions move/drop it)
    datasets==5.2.0      # trl imports it (trl.data_utils, trl.trainer.ppo_trainer); same as the kit's
    dill==0.4.1          # datasets
    multiprocess==0.70.19  # datasets (pure python, one wheel per Python version)
    xxhash==4.1.0        # datasets (compiled)
    pandas==3.1.1        # trl.trainer.utils, trl.trainer.ppo_trainer, datasets (compiled, ~12 MB)
)
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "${WHEELS[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
# pip download exits 0 only when every wheel came: check each name is there
missing=0
for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"; ver="${spec##*==}"
    ls "$dir"/"${name//-/_}"-"$ver"-*.whl >/dev/null 2>&1 || { echo "missing: $spec" >&2; missing=1; }
done
ls -l "$dir"
du -cb "$dir"/*.whl | tail -1 | awk '{printf "total: %d bytes (%.1f MiB)\n", $1, $1 / 1048576}'
exit "$missing"
