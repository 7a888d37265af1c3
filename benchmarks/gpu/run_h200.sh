#!/usr/bin/env bash
# Every GPU measurement of the GPU issue in one prepared call on the borrowed H200 (see
# ../shared/gpu/README.md): decode step times, apactl PPO/APA at 1.7B with executed-FLOP MFU,
# TRL 0.24 PPO on the same shapes, mixed vs pure bf16 vs fp32 learning, the gpu-marked tests and
# then as much of the whole suite as the time allows. Each step has its own time limit inside a
# global deadline, so one failure or overrun never costs the others; results go to $OUT.
#
#   carry: .whl .whl-trl .gpu        (bash ../shared/gpu/fetch-wheels.sh; benchmarks/gpu/fetch_trl.sh)
#   command: bash benchmarks/gpu/run_h200.sh              (DEADLINE_S=480 by default)
#
# Rehearsal on a CPU: SMALL=1 OUT=/tmp/out bash benchmarks/gpu/run_h200.sh (135m only, tiny shapes).
set -u
OUT=${OUT:-/tmp/h200-out}; mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-520}
T0=$(date +%s)
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
STEPS=${STEPS:-"decode apactl trl precision gputests suite offload"}  # which parts to run
want() { [[ " $STEPS " == *" $1 "* ]]; }
# step NAME BUDGET_S CMD...: run CMD with min(BUDGET, time left) seconds; SIGINT first (pytest and
# the benchmarks write what they have), SIGKILL 10 s later.
step() {
  local name=$1 budget=$2; shift 2
  local l; l=$(left); (( budget > l )) && budget=$l
  if (( budget < 15 )); then echo "== $name: skipped (${l}s left)" >&2; return; fi
  echo "== $name: up to ${budget}s (t=$(( $(date +%s) - T0 ))s)" >&2
  timeout -s INT -k 10 "$budget" "$@"; echo "== $name: exit $? (t=$(( $(date +%s) - T0 ))s)" >&2
}

# Rehearsal here: SKIP_WHEELS=1 (this venv has them), TRL_PYTHON / TRL_SITE: a TRL venv.
TRL_PYTHON=${TRL_PYTHON:-python3}; TRL_SITE=${TRL_SITE:-/tmp/site-trl}
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  [ -d .whl-trl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target \
    "$TRL_SITE" .whl-trl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${SMALL:-0}" = 1 ]; then
  BIG=135m; EP=4; TOK=8; MB=2; IT=1; DEC="--batch 4 --prompt-len 16 --new-tokens 8"; LIM="--matmul-n 256 --copy-mib 16 --reps 2"
else
  BIG=1.7b; EP=64; TOK=128; MB=8; IT=2; DEC="--batch 64 --prompt-len 64 --new-tokens 128"; LIM="--matmul-n 8192 --copy-mib 2048 --reps 5"
fi
M=/tmp/models
python3 .gpu/make_models.py $M 135m $([ $BIG != 135m ] && echo $BIG) || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/env.txt"

# 1. Decode step time: eager reference, static cache, CUDA graph (135m and the big model).
for size in 135m $BIG; do
  want decode && step "decode $size" 50 python3 benchmarks/gpu/decode_bench.py \
    --model $M/policy-$size $DEC --dtype bfloat16 --reps 2 --out "$OUT/decode-$size.json"
done

# 2. apactl PPO and APA at the big size: 1 warm-up (FLOP-counted) + $IT measured iterations.
COMMON=(--reward $M/reward-$BIG --set policy.name_or_path=$M/policy-$BIG --set run.dtype=auto
        --set train.freeze_bottom_layers=0 --set train.rollout_batch_size=$EP
        --set train.minibatch_size=$MB --set generation.max_new_tokens=$TOK --set train.lr=1e-6
        --warmup 1 --iterations $IT --threads 8 $LIM)
for algo in ppo apa; do
  want apactl && step "apactl $algo $BIG" 75 python3 benchmarks/align_throughput.py --algo $algo \
    "${COMMON[@]}" --no-save --tag gpu-$algo --json "$OUT/apactl-$algo-$BIG.json"
done

# 3. TRL 0.24 PPOTrainer on the same models, prompts, shapes and precision (bf16 weights).
want trl && step "trl ppo $BIG" 100 env PYTHONPATH= "$TRL_PYTHON" benchmarks/gpu/trl_ppo_gpu.py --site "$TRL_SITE" \
  --policy $M/policy-$BIG --reward $M/reward-$BIG --prompts benchmarks/gpu/prompts-apactl-ppo64.jsonl \
  --episodes $EP --new-tokens $TOK --minibatch $MB --warmup 1 --iterations $IT --lr 1e-6 \
  --dtype bfloat16 --deadline-s 90 > "$OUT/trl-ppo-$BIG.json"

# 4. Learning at lr 1e-6: one optimizer step and 4 APA iterations per precision (135m).
want precision && step "precision" 100 python3 benchmarks/gpu/precision_check.py --policy $M/policy-135m \
  --reward $M/reward-135m --episodes $EP --new-tokens $TOK --minibatch $MB \
  --iterations $([ "${SMALL:-0}" = 1 ] && echo 1 || echo 4) --json "$OUT/precision.json"

# 5. The gpu-marked tests, then the whole suite with whatever time is left.
want gputests && step "pytest -m gpu" 60 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests
want suite && step "pytest (all)" 600 python3 -m pytest -q -p no:cacheprovider -rf tests
# 6. A longer KL trajectory, mixed bf16 vs fp32 (bf16 compute resolves a master-weight change
#    only once it passes bf16's spacing: the trajectories meet later than 4 iterations).
want kl && step "kl trajectory" 150 python3 benchmarks/gpu/precision_check.py --policy $M/policy-135m \
  --reward $M/reward-135m --episodes $EP --new-tokens $TOK --minibatch $MB --modes mixed_bf16,fp32 \
  --iterations ${KL_ITERS:-12} --skip-one-step --json "$OUT/kl-trajectory.json"
# 7. train.offload_frozen (scale-out issue): APA at the big size, one process under torchrun
#    (NCCL) with run.strategy=fsdp, without and with the frozen models offloaded: peak GPU
#    memory per phase and seconds per iteration (time/offload: the host-to-device copies).
for off in false true; do
  want offload && step "fsdp offload=$off $BIG" 90 torchrun --standalone --nproc_per_node 1 \
    benchmarks/align_throughput.py --algo apa "${COMMON[@]}" --set run.strategy=fsdp \
    --set train.offload_frozen=$off --no-save --tag gpu-fsdp-offload-$off \
    --json "$OUT/fsdp-offload-$off-$BIG.json"
done
echo "== done at t=$(( $(date +%s) - T0 ))s"
