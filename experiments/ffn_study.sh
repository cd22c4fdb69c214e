#!/usr/bin/env bash
# The FFN axis of the study on both reference models (REDUCED: selection evidence on 2,000 train rows,
# recovery 1 epoch on 1,000 train rows, MNLI measured on 2,000 validation_matched rows), every head kept.
# Resumable: rerun the same command and finished cells are reused. Usage: bash experiments/ffn_study.sh [sst5|mnli|both]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
which=${1:-both}
common=(--axis ffn --ffn-ratios 0.25,0.5,0.75 --ffn-methods cahp,gradient,random --random-seeds 0,1,2
        --max-examples 2000 --recover-epochs 1 --recover-max-examples 1000)
if [ "$which" = sst5 ] || [ "$which" = both ]; then
  cahp-deploy study "$shared/models/minilm-sst5" --data "$shared/data/sst5" --out experiments/results/ffn/minilm-sst5 \
    "${common[@]}"
fi
if [ "$which" = mnli ] || [ "$which" = both ]; then
  cahp-deploy study "$shared/models/minilm-mnli" --data "$shared/data/mnli" --out experiments/results/ffn/minilm-mnli \
    --eval-split validation_matched --eval-max-examples 2000 "${common[@]}"
fi
