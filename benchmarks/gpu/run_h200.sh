#!/usr/bin/env bash
# Every GPU check of issue 19 in one prepared call on the borrowed H200 (see ../shared/gpu/README.md
# and AUDIT.md), most information first (the review's Q3 order): the gpu-marked tests, a 30-second
# probe of each review point, decode 1.7B, apactl PPO 1.7B, the KL trajectory, offload (+FSDP at
# one process), then APA 1.7B if time remains. Each step has its own limit inside ONE deadline that
# starts before the set-up (wheel install, models) and counts it; every result is written to $OUT
# as soon as its step ends (JSON files, run folders' metrics.jsonl, log.txt).
#
#   carry: .whl .gpu        (bash ../shared/gpu/fetch-wheels.sh; mkdir -p .gpu && cp -r ../shared/gpu/* .gpu/)
#   command: bash benchmarks/gpu/run_h200.sh              (DEADLINE_S=540 by default)
#   STEPS="gputests probe decode apactl kl offload apa" (the default, in this order); also
#   available: decode135 trl precision suite.
#
# Rehearsal on a CPU: SMALL=1 SKIP_WHEELS=1 KIT=../shared/gpu PY=.venv/bin/python OUT=/tmp/out \
#   bash benchmarks/gpu/run_h200.sh
# (135m only, tiny shapes; CUDA-only checks report "skipped").
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/h200-out}; mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-540}
# Step budgets are for the H200; a CPU rehearsal (SMALL=1) needs more time per step.
SCALE=${SCALE:-$([ "${SMALL:-0}" = 1 ] && echo 4 || echo 1)}
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
STEPS=${STEPS:-"gputests probe decode apactl kl offload apa"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
# step NAME BUDGET_S CMD...: run CMD with min(BUDGET, time left) seconds; SIGINT first (pytest and
# the benchmarks write what they have), SIGKILL 10 s later.
step() {
  local name=$1 budget=$(( $2 * SCALE )); shift 2
  local l; l=$(left); (( budget > l )) && budget=$l
  if (( budget < 15 )); then echo "== $name: skipped (${l}s left)" >&2; return; fi
  echo "== $name: up to ${budget}s (t=$(( $(date +%s) - T0 ))s)" >&2
  timeout -s INT -k 10 "$budget" "$@"; echo "== $name: exit $? (t=$(( $(date +%s) - T0 ))s)" >&2
}
# keep PREFIX DIR...: copy each run folder's small files (metrics, recipe; no weights) to
# $OUT/runs/PREFIX<folder name>.
keep() {
  local pre=$1 d; shift
  for d in "$@"; do [ -d "$d" ] || continue
    mkdir -p "$OUT/runs/$pre$(basename "$d")"
    cp "$d"/*.jsonl "$d"/*.yaml "$d"/*.json "$OUT/runs/$pre$(basename "$d")/" 2>/dev/null
  done; return 0
}
# Rehearsal here: SKIP_WHEELS=1 (this venv has them), TRL_PYTHON / TRL_SITE: a TRL venv.
TRL_PYTHON=${TRL_PYTHON:-python3}; TRL_SITE=${TRL_SITE:-/tmp/site-trl}
PY=${PY:-python3}
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  [ -d .whl-trl ] && $PY -m pip install -q --no-index --no-deps --no-compile --target \
    "$TRL_SITE" .whl-trl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${SMALL:-0}" = 1 ]; then
  # (a CPU computes bf16 slowly: the rehearsal decodes and probes with small shapes / fp32)
  BIG=135m; EP=4; TOK=8; MB=2; IT=1; KLIT=2; DEC="--batch 4 --prompt-len 16 --new-tokens 8 --dtype float32"; LIM="--matmul-n 256 --copy-mib 16 --reps 2"; PROBE="--rows 1 --resp-len 4"
else
  BIG=1.7b; EP=64; TOK=128; MB=8; IT=2; KLIT=${KL_ITERS:-12}; DEC="--batch 64 --prompt-len 64 --new-tokens 128 --dtype bfloat16"; LIM="--matmul-n 8192 --copy-mib 2048 --reps 5"; PROBE=""
fi
M=${MODELS:-/tmp/models}
$PY ${KIT:-.gpu}/make_models.py $M 135m $([ $BIG != 135m ] && echo $BIG) || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/env.txt"
echo "== set-up done at t=$(( $(date +%s) - T0 ))s" >&2

# 1. The gpu-marked tests: graph tokens/RNG vs eager on this transformers, the decode fallback,
#    one distribution (policy = reference = decode copy), fp32 heads, memory release.
want gputests && step "pytest -m gpu" 60 $PY -m pytest -q -p no:cacheprovider -m gpu -rs \
  --junitxml "$OUT/pytest-gpu.xml" tests
# 2. A 30-second probe of each review point (#1 NCCL CPU all_reduce, #3 inv_freq, #4 |delta|
#    policy/ref/sampler, #5 fp32 vs bf16 head, #13 pinned bytes, #15 memory before a capture).
want probe && step "probe $BIG" 45 $PY benchmarks/gpu/probe.py --model $M/policy-$BIG $PROBE \
  --out "$OUT/probe-$BIG.json"
# 3. Decode step time at the big size: CUDA graph first; bytes read = decode copy + KV cache.
want decode && step "decode $BIG" 45 $PY benchmarks/gpu/decode_bench.py \
  --model $M/policy-$BIG $DEC --reps 2 --out "$OUT/decode-$BIG.json"
want decode135 && step "decode 135m" 50 $PY benchmarks/gpu/decode_bench.py \
  --model $M/policy-135m $DEC --reps 2 --out "$OUT/decode-135m.json"

# 4. apactl at the big size: 1 warm-up (FLOP-counted) + $IT measured iterations; the run folder
#    (metrics.jsonl, written per iteration) under $OUT/runs.
COMMON=(--reward $M/reward-$BIG --set policy.name_or_path=$M/policy-$BIG --set run.dtype=auto
        --set train.freeze_bottom_layers=0 --set train.rollout_batch_size=$EP
        --set train.minibatch_size=$MB --set generation.max_new_tokens=$TOK --set train.lr=1e-6
        --warmup 1 --iterations $IT --threads 8 $LIM)
apactl() {  # apactl ALGO TAG BUDGET LAUNCHER... [-- EXTRA --set ARGS...]
  local algo=$1 tag=$2 budget=$3; shift 3
  local launch=() extra=()
  while (( $# )) && [ "$1" != "--" ]; do launch+=("$1"); shift; done
  (( $# )) && shift && extra=("$@")
  step "$tag" "$budget" "${launch[@]}" benchmarks/align_throughput.py --algo $algo "${COMMON[@]}" \
    "${extra[@]}" --set run.output_dir="$OUT/runs/$tag" --no-save --tag $tag --json "$OUT/$tag.json"
}
want apactl && apactl ppo apactl-ppo-$BIG 85 $PY
# 5. The KL trajectory, mixed bf16 vs fp32 (135m): at iteration 0 both must be exactly 0.
want kl && step "kl trajectory" 150 $PY benchmarks/gpu/precision_check.py --policy $M/policy-135m \
  --reward $M/reward-135m --episodes $EP --new-tokens $TOK --minibatch $MB --modes mixed_bf16,fp32 \
  --iterations $KLIT --skip-one-step --work /tmp/kl-runs --json "$OUT/kl-trajectory.json"
keep kl- /tmp/kl-runs/*
# 6. train.offload_frozen at the big size under torchrun (NCCL, one process) with
#    run.strategy=fsdp: FSDP itself shards only where it is enabled at world size 1.
want offload && apactl apa offload-fsdp1-$BIG 80 torchrun --standalone --nproc_per_node 1 -- \
  --set run.strategy=fsdp --set train.offload_frozen=true
# 7. With what is left: APA at the big size; TRL; precision; the whole suite (not by default).
want apa && apactl apa apactl-apa-$BIG 75 $PY
want trl && step "trl ppo $BIG" 100 env PYTHONPATH= "$TRL_PYTHON" benchmarks/gpu/trl_ppo_gpu.py --site "$TRL_SITE" \
  --policy $M/policy-$BIG --reward $M/reward-$BIG --prompts benchmarks/gpu/prompts-apactl-ppo64.jsonl \
  --episodes $EP --new-tokens $TOK --minibatch $MB --warmup 1 --iterations $IT --lr 1e-6 \
  --dtype bfloat16 --deadline-s 90 > "$OUT/trl-ppo-$BIG.json"
want precision && step "precision" 100 $PY benchmarks/gpu/precision_check.py --policy $M/policy-135m \
  --reward $M/reward-135m --episodes $EP --new-tokens $TOK --minibatch $MB \
  --iterations $([ "${SMALL:-0}" = 1 ] && echo 1 || echo 4) --json "$OUT/precision.json"
want suite && step "pytest (all)" 600 $PY -m pytest -q -p no:cacheprovider -rf tests
echo "== done at t=$(( $(date +%s) - T0 ))s"
