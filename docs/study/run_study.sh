#!/usr/bin/env bash
# The study (docs/study.md): APA, PPO, AWR, GRPO, RLOO, critic-free APA and DPO on one set-up,
# start to end, resumable: re-run it after a kill and finished stages and runs are skipped
# (apactl sweep resumes interrupted runs).
#   bash docs/study/run_study.sh [phase ...]
# Phases (default: all, in this order):
#   data      label -> sft (pi_init) -> rm (the proxy)
#   grid      APA, PPO, AWR: the learning-rate grid on seed 0 (24 iterations)
#   grid-cf   GRPO, RLOO, critic-free APA (4 answers x 4 prompts): the same grid
#   grid-dpo  DPO on the RM's own pairs: as many configurations (lr), then `apactl eval` of each
#   long      APA, PPO, GRPO at their chosen rate, seed 0, 96 iterations (4x), held-out
#             evaluations every 8 and checkpoints kept at 24/48/72/96
#   seeds     seeds 1 and 2 of every chosen configuration (seed-major: every configuration gets
#             seed 1 before any gets seed 2, so a cut-short study stays balanced)
#   lam       APA lambda 0.03 / 0.3 and AWR lambda 0.1 at their chosen rates, seed 0
#   eval      `apactl eval` of every final policy (64 held-out prompts x 1 answer, proxy and
#             gold), then the report (docs/study/results.md, results.json, figures)
# The rate of each algorithm is chosen by `analyze.py best-lr` (the rule: the best held-out
# PROXY among the rates whose held-out KL to pi_init at the last evaluation is <= 10 nats;
# never the gold judge). A chosen rate at the edge of its grid is reported by best-lr, and the
# grid must then be extended (GRID_LRS, DPO_LRS; docs/study.md says how it was charged).
# Environment: THREADS=1 sets run.num_threads (two lanes side by side on 2 cores: 1 thread
# each); CONFIGS limits the grid-cf/long/seeds phases to some configurations, SEEDS the seeds
# phase to some seeds; GRID_LRS and DPO_LRS set the grids.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=recipes/study
OUT=apactl-runs/study
QUIET=(logging.progress=false ${THREADS:+run.num_threads=$THREADS})
LRS=${GRID_LRS:-3e-5,1e-4,3e-4}
DPO_LRS=${DPO_LRS:-1e-5,3e-5,1e-4}
phases=${*:-data grid grid-cf grid-dpo long seeds lam eval}
has() { [[ " $phases " == *" $1 "* ]]; }
# A configuration: its recipe and the overrides that make it (GRPO with the paper's beta =
# 0.04 as a k3 term in its loss; RLOO its default beta = 0.05 in the reward).
recipe_of() { case $1 in apa|ppo|awr) echo $R/align.yaml ;; dpo) echo $R/dpo.yaml ;;
                         *) echo $R/align-critic-free.yaml ;; esac; }
overrides_of() {
  case $1 in
    apa|ppo|awr|grpo|rloo) echo "algo.name=$1" ;;
    apa-group) echo "algo.name=apa algo.advantage=group" ;;
  esac
  [ "$1" = grpo ] && echo "kl.beta=0.04"
  return 0
}
best() { python3 docs/study/analyze.py best-lr $OUT "$1"; }

if has data; then
  [ -f $OUT/label/preferences.jsonl ] || apactl label $R/1-label.yaml "${QUIET[@]}"
  [ -f $OUT/sft/final/config.json ] || apactl sft $R/2-sft.yaml "${QUIET[@]}" --resume
  [ -f $OUT/rm/final/config.json ] || apactl rm $R/3-rm.yaml "${QUIET[@]}" --resume
fi
if has grid; then
  apactl sweep $R/align.yaml --grid algo.name=apa,ppo,awr --grid train.lr=$LRS \
    run.output_dir=$OUT/grid train.keep_checkpoints=0 "${QUIET[@]}"
fi
if has grid-cf; then
  for c in ${CONFIGS:-grpo rloo apa-group}; do
    apactl sweep $R/align-critic-free.yaml --grid train.lr=$LRS $(overrides_of $c) \
      run.output_dir=$OUT/grid-$c train.keep_checkpoints=0 "${QUIET[@]}"
  done
fi
if has grid-dpo; then
  apactl sweep $R/dpo.yaml --grid train.lr=$DPO_LRS run.output_dir=$OUT/grid-dpo "${QUIET[@]}"
  python3 docs/study/analyze.py eval-recipe $OUT dpo > $OUT/grid-dpo/eval.yaml
  [ -f $OUT/grid-dpo/eval/report.json ] || apactl eval $OUT/grid-dpo/eval.yaml "${QUIET[@]}"
fi
# 4x the iterations at the chosen rate; the checkpoint at 24 is also this configuration's
# seed 0 (the schedule is constant: the first 24 iterations are the 24-iteration run's).
if has long; then
  for c in ${CONFIGS:-apa ppo grpo}; do
    apactl sweep $(recipe_of $c) --grid train.lr=$(best $c) $(overrides_of $c) \
      train.iterations=96 train.save_every=24 train.keep_checkpoints=4 \
      run.output_dir=$OUT/long-$c "${QUIET[@]}"
  done
fi
if has seeds; then
  for seed in ${SEEDS:-1 2}; do
    for c in ${CONFIGS:-apa ppo awr grpo rloo apa-group dpo}; do
      if [ $c = dpo ]; then
        apactl sweep $R/dpo.yaml --grid run.seed=$seed train.lr=$(best dpo) \
          run.output_dir=$OUT/seeds-dpo "${QUIET[@]}"
      else
        apactl sweep $(recipe_of $c) --grid run.seed=$seed train.lr=$(best $c) \
          $(overrides_of $c) run.output_dir=$OUT/seeds-$c train.keep_checkpoints=0 "${QUIET[@]}"
      fi
    done
  done
fi
if has lam; then
  apactl sweep $R/align.yaml --grid algo.lam=0.03,0.3 algo.name=apa train.lr=$(best apa) \
    run.output_dir=$OUT/lam-apa train.keep_checkpoints=0 "${QUIET[@]}"
  apactl sweep $R/align.yaml --grid algo.lam=0.1 algo.name=awr train.lr=$(best awr) \
    run.output_dir=$OUT/lam-awr train.keep_checkpoints=0 "${QUIET[@]}"
fi
if has eval; then
  python3 docs/study/analyze.py eval-recipe $OUT > $OUT/eval.yaml
  apactl eval $OUT/eval.yaml "${QUIET[@]}"
  python3 docs/study/analyze.py report $OUT docs/study
fi
