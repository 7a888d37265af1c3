#!/usr/bin/env bash
# What the second round ran on 2026-12-03 (one 3-hour session, 2 cores): the phases of
# run_study.sh in two lanes of one thread side by side, ordered so that both lanes end
# together; the cut phases (DPO, seeds, lam, long GRPO, AWR re-run) are not here. APA's, PPO's
# and AWR's grids are the first round's records:
#   mkdir -p apactl-runs/study/grid && cp docs/study/v1/sweeps/grid.json apactl-runs/study/grid/sweep.json
set -euo pipefail
cd "$(dirname "$0")/../.."
export THREADS=1
S=docs/study/run_study.sh
A=docs/study/analyze.py
bash $S data
(   # lane A
  CONFIGS="apa ppo" bash $S long
  CONFIGS=apa-group GRID_LRS=3e-4 bash $S grid-cf
  # (by then lane B has run apa-group's other two rates: its chosen rate is known)
  python3 $A eval-recipe apactl-runs/study a apa ppo apa-group long-apa long-ppo \
    > apactl-runs/study/eval-a.yaml
  apactl eval apactl-runs/study/eval-a.yaml logging.progress=false run.num_threads=1
) &
(   # lane B
  CONFIGS="grpo rloo" bash $S grid-cf
  CONFIGS=apa-group GRID_LRS=3e-5,1e-4 bash $S grid-cf
  # DPO's grid was started here (apactl sweep recipes/study/dpo.yaml --grid
  # train.lr=1e-5,3e-5,1e-4 ...) and killed unfinished for time; it is not part of the results.
  python3 $A eval-recipe apactl-runs/study b grpo rloo > apactl-runs/study/eval-b.yaml
  apactl eval apactl-runs/study/eval-b.yaml logging.progress=false run.num_threads=1
) &
wait
python3 $A report apactl-runs/study docs/study
