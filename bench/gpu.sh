#!/usr/bin/env bash
# One prepared run for a lent GPU machine (torch preinstalled, no network): CUDA correctness checks,
# then the engine benchmark on a random llama-8b geometry in bfloat16. Results go to $OUT.
#   on the device tool:  bash bench/gpu.sh        (carry .whl: transformers 5.24 and peft 0.21.2 wheels)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 110 python3 -m bench.gpu_check --device cuda --out "$OUT/gpu_check.json" 2>&1 | grep -v -i warning
timeout 250 python3 -m bench.engine_bench --geometry llama-8b --device cuda --dtype bfloat16 \
  --requests 48 --concurrency 16 --repeats 1 --threads 8 --out "$OUT/engine_llama8b.json" 2>&1 | grep -v -i warning
