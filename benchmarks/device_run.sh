#!/usr/bin/env bash
# One H100 run of the benchmarks, about 9 minutes, everything written under $OUT (at most 8 files):
#   bench of the demo encoders' architectures (random init), bench of the paper's ViT-B/16 + BERT-base,
#   and the emoji ablation from the device pack, under a time budget (unfinished cells are listed in
#   ablation.json and can be finished by a re-run that gets the cells back).
#
# Prepare here (CPU, with the asset cache):  .venv/bin/python -m benchmarks.device_pack --out runs/device_pack
# Run there, from the repository root, carrying runs/device_pack (about 53 MiB):
#   bash benchmarks/device_run.sh
# Environment: OUT (output folder, default runs/device), PYTHON (default python3),
#   TOTAL_MIN (wall minutes for the whole script, default 9), JOBS (ablation cells at once, default 4),
#   SEEDS (default "0 1 2 3 4"), EPOCHS (ablation epochs, default 5), DEVICE (default cuda),
#   EXTRA_BENCH / EXTRA_ABLATION (extra arguments appended to each bench / ablation command, e.g. for
#   a quick CPU check of this script: DEVICE=cpu EXTRA_BENCH="--encoders tiny --image-size 32 ..."),
#   SKIP_BENCH=1 (ablation only), RESUME_CELLS (a cells .tar.gz of an earlier run, e.g.
#   benchmarks/results/2026-11-27-h200/ablation_cells.tar.gz: its finished cells are not trained again).
# Follow-up of the 2026-11-27 H200 run (plain baselines, switch combinations, 3 unfinished cells: 51 cells,
# estimated 3-4 min on an H200; TOTAL_MIN=7 is enough):
#   SKIP_BENCH=1 RESUME_CELLS=benchmarks/results/2026-11-27-h200/ablation_cells.tar.gz bash benchmarks/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
PY=${PYTHON:-python3}
TOTAL_MIN=${TOTAL_MIN:-9}
JOBS=${JOBS:-4}
SEEDS=${SEEDS:-0 1 2 3 4}
EPOCHS=${EPOCHS:-5}
PACK=${PACK:-runs/device_pack}
DEVICE=${DEVICE:-cuda}
EXTRA_BENCH=${EXTRA_BENCH:-}
EXTRA_ABLATION=${EXTRA_ABLATION:-}
SKIP_BENCH=${SKIP_BENCH:-0}
RESUME_CELLS=${RESUME_CELLS:-}
WORK=${WORK:-/tmp/unipair-device}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
LOG="$OUT/device_run.log"
start=$(date +%s)
elapsed_min() { echo $(( ($(date +%s) - start) / 60 )); }
{
  echo "device_run: $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, lightning, timm, transformers, peft, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torchmetrics', torchmetrics.__version__)"
  if [ ! -f "$PACK/manifest.json" ]; then echo "device_run: no device pack at $PACK (export it first)"; fi

  if [ "$SKIP_BENCH" != 1 ]; then
  echo "== bench: demo architectures (random init), batch 64, 112 px, 32 tokens"
  timeout 150 "$PY" -m benchmarks.bench --random-init --device "$DEVICE" --batch-size 64 --image-size 112 --text-len 32 \
    --warmup 3 --steps 10 --infer-steps 10 $EXTRA_BENCH --out "$OUT/bench_demo_random.json" || echo "device_run: bench (demo) failed: $?"

  echo "== bench: paper encoders (ViT-B/16 + BERT-base, random init), batch 64, 224 px, 128 tokens"
  timeout 180 "$PY" -m benchmarks.bench --paper --device "$DEVICE" --batch-size 64 --image-size 224 --text-len 128 \
    --warmup 3 --steps 10 --infer-steps 10 $EXTRA_BENCH --out "$OUT/bench_paper.json" || echo "device_run: bench (paper) failed: $?"
  fi
  if [ -n "$RESUME_CELLS" ]; then
    mkdir -p "$WORK/ablation" && tar -xzf "$RESUME_CELLS" -C "$WORK/ablation" \
      && echo "device_run: resuming from $(ls "$WORK/ablation/cells" | wc -l) cells of $RESUME_CELLS"
  fi

  # The ablation gets what is left; no new cell starts in the last ~1.5 minutes (cells in flight finish).
  left=$(( TOTAL_MIN * 60 - ($(date +%s) - start) ))
  budget=$(( (left - 90) / 60 ))
  if [ "$budget" -lt 1 ]; then budget=1; fi
  echo "== ablation: ${left}s left, time budget ${budget} min, $JOBS jobs, seeds $SEEDS, $EPOCHS epochs"
  touch "$WORK/ablation_started"
  timeout $(( left > 70 ? left - 10 : 60 )) "$PY" -m benchmarks.ablation --pack "$PACK" --device "$DEVICE" --jobs "$JOBS" \
    --seeds $SEEDS --epochs "$EPOCHS" --batch-size 32 --eval-batch-size 256 --threads 2 --time-budget "$budget" \
    $EXTRA_ABLATION --out "$WORK/ablation" || echo "device_run: ablation ended with $?"
  if [ ! -f "$WORK/ablation/ablation.json" ] || [ "$WORK/ablation/ablation.json" -ot "$WORK/ablation_started" ]; then
    echo "== ablation: tabulating the finished cells"
    timeout 60 "$PY" -m benchmarks.ablation --pack "$PACK" --device "$DEVICE" --seeds $SEEDS --epochs "$EPOCHS" \
      --batch-size 32 --eval-batch-size 256 --aggregate-only $EXTRA_ABLATION --out "$WORK/ablation" || true
  fi
  cp "$WORK/ablation/ablation.json" "$WORK/ablation/ablation.md" "$OUT/" 2>/dev/null || echo "device_run: no ablation.json"
  tar -czf "$OUT/ablation_cells.tar.gz" -C "$WORK/ablation" cells 2>/dev/null || true
  echo "device_run: done in $(elapsed_min) min"
} 2>&1 | tee "$LOG"
