#!/usr/bin/env bash
# Regenerate experiments/results/study/: the head-selection study (issue 9) on the two reference models.
#
#   experiments/study.sh full     the full study: all 7 methods (random x 3 seeds) at 10/25/50/75% of the heads
#                                 plus CAHP's knee, 3 recovery epochs on the whole train split, knee sensitivity;
#                                 minilm-sst5 (select on train, measure on validation, final table on test) and
#                                 minilm-mnli (select on train, measure on validation_matched, final table on
#                                 validation_mismatched). Many CPU-hours: see experiments/results/study/README.md.
#   experiments/study.sh reduced  the reduced runs committed in experiments/results/study/reduced-minilm-{sst5,mnli}
#                                 (~50 min + ~95 min on one core each; see experiments/results/study/README.md).
#
# Both resume: finished cells are cached under <out>/cells and reused (--force only rewrites the report).
# SHARED (default ../shared) locates the reference models and data; THREADS (default 1) sets torch's threads.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=experiments/results/study
export OMP_NUM_THREADS=${THREADS:-1}

case "${1:-}" in
  reduced)
    cahp-deploy study "$SHARED/models/minilm-sst5" --data "$SHARED/data/sst5" --out "$OUT/reduced-minilm-sst5" \
      --select-split train --eval-split validation --budgets 0.25,0.5 --random-seeds 0,1,2 \
      --max-examples 2000 --recover-epochs 1 --recover-max-examples 1000 \
      --note "REDUCED run: budgets 25%/50% + knee; all 7 methods (random: 3 seeds); selection on the first 2,000 train examples; recovery 1 epoch on 1,000 train examples (the reference: 3 epochs on all 8,544); no test-split table." \
      --force
    cahp-deploy study "$SHARED/models/minilm-mnli" --data "$SHARED/data/mnli" --out "$OUT/reduced-minilm-mnli" \
      --select-split train --eval-split validation_matched --eval-max-examples 2000 --budgets 0.25,0.5 \
      --random-seeds 0,1,2 --max-examples 2000 --recover-epochs 1 --recover-max-examples 1000 \
      --note "REDUCED run: budgets 25%/50% + knee; all 7 methods (random: 3 seeds); selection on the first 2,000 train pairs; recovery 1 epoch on 1,000 train pairs (the reference: 3 epochs on all 9,999); measured on the first 2,000 validation_matched pairs; no validation_mismatched table." \
      --force
    ;;
  full)
    cahp-deploy study "$SHARED/models/minilm-sst5" --data "$SHARED/data/sst5" --out "$OUT/minilm-sst5" \
      --select-split train --eval-split validation --test-split test --force
    cahp-deploy study "$SHARED/models/minilm-mnli" --data "$SHARED/data/mnli" --out "$OUT/minilm-mnli" \
      --select-split train --eval-split validation_matched --test-split validation_mismatched --force
    ;;
  *)
    echo "usage: experiments/study.sh reduced|full" >&2
    exit 2
    ;;
esac
