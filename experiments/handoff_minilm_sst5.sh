#!/usr/bin/env bash
# Handoff measurements on the real minilm-sst5 (issue 20): CAHP-pruned artifact -> Triton repository and
# ORT Mobile files, with and without vocabulary trimming on the SST-5 train texts.
# Usage: experiments/handoff_minilm_sst5.sh [WORK_DIR]   (from the repo root; needs ../shared)
# Writes the small outputs (handoff.json, config.pbtxt, MODEL_CARD.md, sizes, load) to experiments/results/handoff/.
set -euo pipefail
W=${1:-/tmp/handoff-bench}
R=experiments/results/handoff
S=../shared
mkdir -p "$W" "$R"
{ echo "start $(date -u +%FT%TZ) load $(cat /proc/loadavg)"; } > "$R/log.txt"
t() { local s=$SECONDS; "$@"; echo "$(( SECONDS - s ))s load $(cut -d' ' -f1-3 /proc/loadavg): $*" >> "$R/log.txt"; }
if [ ! -f "$W/art/manifest.json" ]; then  # reused when present (prune + export are deterministic; 3 min here)
  t cahp-deploy prune $S/models/minilm-sst5 --selection experiments/results/minilm-sst5/selections/cahp.json --out "$W/pruned" --force
  # parity + accuracy on all of sst5 validation (1101 rows); no timing (2 shared cores)
  t cahp-deploy export "$W/pruned" --out "$W/art" --data $S/data/sst5 --split validation --no-timing --force
fi
# latency for the model card: the committed bench report of the same pruned model (its manifest identity matches)
B="--bench-report experiments/results/minilm-sst5/run1"
t cahp-deploy handoff "$W/art" --out "$W/triton" --target triton --name minilm-sst5-cahp $B --force
t cahp-deploy handoff "$W/art" --out "$W/triton-trim" --target triton --name minilm-sst5-cahp --trim-vocab $S/data/sst5 $B --force
t cahp-deploy handoff "$W/art" --out "$W/mobile" --target ort-mobile $B --force
t cahp-deploy handoff "$W/art" --out "$W/mobile-trim" --target ort-mobile --trim-vocab $S/data/sst5 $B --force
for d in triton triton-trim mobile mobile-trim; do
  t cahp-deploy verify "$W/$d"
  mkdir -p "$R/$d"
  cp "$W/$d/handoff.json" "$W/$d/MODEL_CARD.md" "$R/$d/"
done
cp "$W/triton-trim/model_repository/minilm-sst5-cahp/config.pbtxt" "$R/config.pbtxt"
{ echo "# bytes"; stat -c '%s %n' "$W"/art/model_optimized.onnx "$W"/triton/model_repository/*/1/model.onnx \
    "$W"/triton-trim/model_repository/*/1/model.onnx "$W"/mobile/model.ort "$W"/mobile-trim/model.ort; } > "$R/sizes.txt"
echo "end $(date -u +%FT%TZ) load $(cat /proc/loadavg)" >> "$R/log.txt"
