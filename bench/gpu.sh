#!/usr/bin/env bash
# One prepared run for a lent GPU machine (torch preinstalled, no network), under 8 minutes: CUDA
# correctness checks, the roofline section (decode steps against the memory-bandwidth floor, batch 1, 16
# and 64: roofline.json), then `prefix-serve bench` on a random llama-8b geometry in bfloat16. Results go
# to $OUT.
#   on the device tool:  bash bench/gpu.sh   (carry .whl: the device image has an older transformers; fetch
#   the wheels here once with  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   -d .whl transformers==5.24.0 peft==0.21.2  — .whl/ is git-ignored)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false COLUMNS=140
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 110 python3 -m bench.gpu_check --device cuda --out "$OUT/gpu_check.json" 2>&1 | grep -v -i warning
timeout 90 python3 -m server.cli bench --geometry llama-8b --device cuda --dtype bfloat16 --threads 8 \
  --sections roofline --out "$OUT/roofline-llama8b" 2>&1 | grep -v -i warning
cp "$OUT/roofline-llama8b/roofline.json" "$OUT/roofline.json" 2>/dev/null
# no HTTP section: it would save the 16 GB random model to disk for the server process
timeout 260 python3 -m server.cli bench --geometry llama-8b --device cuda --dtype bfloat16 --threads 8 \
  --requests 32 --repeats 1 --sections baselines,concurrency,prefix-length,tasks,cache-budget,store,memory \
  --concurrency-curve 1,4,16,64 --memory-budget-gib 16 --out "$OUT/bench-llama8b" 2>&1 | grep -v -i warning
