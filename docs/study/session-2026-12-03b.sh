#!/usr/bin/env bash
# What the second session of the second round ran (2026-12-03, 13:11-15:34, 2 cores): the
# stages and every run of the first session were still in apactl-runs/study (the same VM);
# then two lanes of one thread. Lane scripts were swapped between runs as the timing became
# known; this is what ran, in order. DPO's seeds, long GRPO and the lambda runs did not fit
# (docs/study.md, "What ran, what was cut").
set -euo pipefail
cd "$(dirname "$0")/../.."
export THREADS=1
S=docs/study/run_study.sh
A=docs/study/analyze.py
R=apactl-runs/study
(   # lane A: seed 1 of every online configuration, then seed 2 (GRPO's and RLOO's then AWR's)
  SEEDS=1 CONFIGS="apa ppo awr grpo rloo apa-group" bash $S seeds
  SEEDS=2 CONFIGS="apa ppo grpo rloo" bash $S seeds
  SEEDS=2 CONFIGS=awr bash $S seeds
  # (after lane B's part c: a part scores only what no other part scored)
  python3 $A eval-recipe $R e grpo rloo awr > $R/eval-e.yaml
  apactl eval $R/eval-e.yaml logging.progress=false run.num_threads=1
) &
(   # lane B: DPO's grid {1e-5, 3e-5, 1e-4} and its evaluation (grid-dpo/eval). The rule chose
    # 1e-4, the grid's edge, so the grid was extended to 3e-4 (the seeds phase had already
    # started DPO's seed 1 at 1e-4: killed, its folder removed).
  bash $S grid-dpo
  apactl sweep recipes/study/dpo.yaml --grid train.lr=3e-4 run.output_dir=$R/grid-dpo \
    logging.progress=false run.num_threads=1
  # seeds finished so far and DPO's 3e-4 (3e-4: KL 14.6 > 10, so 1e-4 stands)
  python3 $A eval-recipe $R c apa ppo awr grpo rloo apa-group dpo dpo-grid > $R/eval-c.yaml
  apactl eval $R/eval-c.yaml logging.progress=false run.num_threads=1
  SEEDS=2 CONFIGS=apa-group bash $S seeds
  python3 $A eval-recipe $R f apa-group > $R/eval-f.yaml
  apactl eval $R/eval-f.yaml logging.progress=false run.num_threads=1
) &
wait
python3 $A report $R docs/study
