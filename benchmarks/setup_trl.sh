#!/usr/bin/env bash
# Create the virtual environments of the TRL peers used by benchmarks/compare_trl.py:
#
#   benchmarks/.venv-trl      TRL 0.24.x: PPOTrainer in the top-level package, as the issue asks
#                             (it warns "will soon be moved to trl.experimental"; 0.25.0 still has
#                             it there, 0.29.1 and 1.0.0 only as trl.experimental.ppo, 1.16.0 not
#                             at all).
#   benchmarks/.venv-trl-new  current TRL: RLOOTrainer (online, GRPO-style: k samples per prompt,
#                             leave-one-out baseline, no critic).
#
# torch is installed first and pinned (torch==2.13.0, the CPU build on this machine's disk): an
# unpinned torch would let pip pull a multi-GB CUDA build from the index. Then TRL, letting pip pick
# the transformers version (override with TRL_OLD_EXTRA / TRL_NEW_EXTRA, e.g. 'transformers<5').
#
#   bash benchmarks/setup_trl.sh            # both venvs
#   bash benchmarks/setup_trl.sh old        # only .venv-trl
#   bash benchmarks/setup_trl.sh new        # only .venv-trl-new
#
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0),
# TRL_OLD_SPEC (default 'trl==0.24.*'), TRL_NEW_SPEC (default 'trl==1.16.*', the version the
# drivers were written against; set 'trl' for the newest), TRL_OLD_EXTRA / TRL_NEW_EXTRA (extra
# requirements installed with TRL, default none). Re-running reuses an existing venv.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRL_OLD_SPEC="${TRL_OLD_SPEC:-trl==0.24.*}"
TRL_NEW_SPEC="${TRL_NEW_SPEC:-trl==1.16.*}"
TRL_OLD_EXTRA="${TRL_OLD_EXTRA:-}"
TRL_NEW_EXTRA="${TRL_NEW_EXTRA:-}"
which="${1:-both}"

make_venv() {  # make_venv DIR TRL_SPEC EXTRA CHECK_IMPORT
    local dir="$1" spec="$2" extra="$3" check="$4"
    echo "== $dir: $spec ${extra}"
    if [ ! -x "$dir/bin/python" ]; then
        "$PYTHON" -m venv "$dir"
    fi
    local pip=("$dir/bin/python" -m pip)
    "${pip[@]}" install -q --upgrade pip
    "${pip[@]}" install -q "$TORCH_SPEC"
    echo "-- trl versions on the index:"
    "${pip[@]}" index versions trl 2>/dev/null | head -1 || true
    # shellcheck disable=SC2086  # $extra is a space-separated list of requirements
    "${pip[@]}" install -q "$spec" "$TORCH_SPEC" $extra
    "$dir/bin/python" - "$check" <<'EOF'
import importlib.metadata as md
import sys

import torch
import transformers

names = sys.argv[1].split(",")
mod = __import__("trl", fromlist=names)
missing = [n for n in names if not hasattr(mod, n)]
versions = {p: md.version(p) for p in ("trl", "transformers", "torch", "accelerate", "datasets")}
print("   installed:", "  ".join(f"{k}=={v}" for k, v in versions.items()))
if missing:
    sys.exit(f"   trl has no {', '.join(missing)}")
print("   import check ok:", ", ".join(names))
assert torch.__version__.startswith("2.13"), torch.__version__
EOF
}

if [ "$which" = both ] || [ "$which" = old ]; then
    make_venv "$here/.venv-trl" "$TRL_OLD_SPEC" "$TRL_OLD_EXTRA" "PPOConfig,PPOTrainer"
fi
if [ "$which" = both ] || [ "$which" = new ]; then
    make_venv "$here/.venv-trl-new" "$TRL_NEW_SPEC" "$TRL_NEW_EXTRA" "RLOOConfig,RLOOTrainer"
fi
echo "done: drivers run as <venv>/bin/python benchmarks/trl_ppo_driver.py | trl_rloo_driver.py"
