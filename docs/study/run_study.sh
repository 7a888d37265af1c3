#!/usr/bin/env bash
# The APA vs PPO vs AWR study (docs/study.md), start to end, resumable: re-run it after a kill
# and finished stages and runs are skipped (apactl sweep resumes interrupted runs).
#   bash docs/study/run_study.sh [phase ...]     phases: data grid seeds lam eval (default: all)
# THREADS=1 sets run.num_threads (two lanes side by side on 2 cores: 1 thread each); ALGOS
# limits the seeds phase to some algorithms (default: apa ppo awr).
set -euo pipefail
cd "$(dirname "$0")/../.."
R=recipes/study
OUT=apactl-runs/study
QUIET=(logging.progress=false ${THREADS:+run.num_threads=$THREADS})
phases=${*:-data grid seeds lam eval}
has() { [[ " $phases " == *" $1 "* ]]; }

if has data; then
  [ -f $OUT/label/preferences.jsonl ] || apactl label $R/1-label.yaml "${QUIET[@]}"
  [ -f $OUT/sft/final/config.json ] || apactl sft $R/2-sft.yaml "${QUIET[@]}" --resume
  [ -f $OUT/rm/final/config.json ] || apactl rm $R/3-rm.yaml "${QUIET[@]}" --resume
fi
# Equal tuning budget: 3 learning rates per algorithm on seed 0.
if has grid; then
  apactl sweep $R/align.yaml --grid algo.name=apa,ppo,awr --grid train.lr=3e-5,1e-4,3e-4 \
    run.output_dir=$OUT/grid train.keep_checkpoints=0 "${QUIET[@]}"
fi
# The best learning rate of each algorithm by the PROXY reward on held-out prompts (never the
# gold judge), then seeds 1 and 2 at that rate.
# Seed-major order: every algorithm has seed 1 before any has seed 2 (a cut-short study stays
# balanced).
if has seeds; then
  for seed in 1 2; do
    for algo in ${ALGOS:-apa ppo awr}; do
      lr=$(python3 docs/study/analyze.py best-lr $OUT/grid $algo)
      apactl sweep $R/align.yaml --grid run.seed=$seed algo.name=$algo train.lr=$lr \
        run.output_dir=$OUT/seeds-$algo train.keep_checkpoints=0 "${QUIET[@]}"
    done
  done
fi
# APA's lambda (KL level) and AWR at a small lambda, seed 0, at their best learning rates.
if has lam; then
  lr=$(python3 docs/study/analyze.py best-lr $OUT/grid apa)
  apactl sweep $R/align.yaml --grid algo.lam=0.03,0.3 algo.name=apa train.lr=$lr \
    run.output_dir=$OUT/lam-apa train.keep_checkpoints=0 "${QUIET[@]}"
  lr=$(python3 docs/study/analyze.py best-lr $OUT/grid awr)
  apactl sweep $R/align.yaml --grid algo.lam=0.1 algo.name=awr train.lr=$lr \
    run.output_dir=$OUT/lam-awr train.keep_checkpoints=0 "${QUIET[@]}"
fi
if has eval; then
  python3 docs/study/analyze.py eval-recipe $OUT > $OUT/eval.yaml
  apactl eval $OUT/eval.yaml "${QUIET[@]}"
  python3 docs/study/analyze.py report $OUT docs/study
fi
