#!/usr/bin/env bash
# An independent load tool against the default server: guidellm (in its own venv, its default request
# body for /v1/completions: streamed, include_usage + continuous_usage_stats, ignore_eos) at 16 concurrent
# streams, then `prefix-serve bench --url` at the same concurrency on the same server, each with 64
# requests of 64 prompt tokens and 32 new ones. Results go to $OUT; the README's benchmark docs quote them.
#   make install first; then  bash bench/guidellm.sh   (about 5 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/guidellm}
VENV=${GUIDELLM_VENV:-.guidellm-venv}
PORT=${PORT:-8931}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
if [ ! -x "$VENV/bin/guidellm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0  # the CPU build on disk, before guidellm asks for any torch
  "$VENV/bin/pip" install -q guidellm==0.8.1
fi
MODEL_DIR=$(.venv/bin/python -c "from server.model_source import resolve_model; print(resolve_model(None).path)")
STORE=$(mktemp -d)
.venv/bin/prefix-serve serve --port "$PORT" --store "file://$STORE" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER; rm -rf "$STORE"' EXIT
until curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null; do sleep 1; done

for run in 1 2 3; do  # the first warms the server up; the README quotes the median of the three
  "$VENV/bin/guidellm" run \
    --backend "kind=openai_http,target=http://127.0.0.1:$PORT,request_format=/v1/completions" \
    --profile kind=concurrent,streams=16 \
    --data kind=synthetic_text,prompt_tokens=64,output_tokens=32 \
    --constraint kind=max_requests,count=64 \
    --tokenizer "kind=hf_auto,model=$MODEL_DIR" \
    --output "kind=json,path=$OUT/guidellm-$run.json" --disable-progress > "$OUT/guidellm-$run.log" 2>&1
done
.venv/bin/prefix-serve bench --url "http://127.0.0.1:$PORT" --base-model --concurrency-curve 16 \
  --requests 64 --prompt-tokens 64-64 --new-tokens 32 --out "$OUT/prefix-serve-bench" > "$OUT/prefix-serve-bench.log" 2>&1
.venv/bin/python - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = []
for path in sorted(out.glob("guidellm-*.json")):
    benchmark = json.loads(path.read_text())["benchmarks"][0]
    totals = benchmark["metrics"]["output_tokens_per_second"]["total"]
    errored = len(benchmark["requests"].get("errored", []))
    runs.append({"output_tokens_per_s": totals["mean"], "errored": errored})
ours = json.loads((out / "prefix-serve-bench" / "report.json").read_text())["curves"]["concurrency"][0]
summary = {
    "concurrency": 16,
    "guidellm_runs": runs,
    "guidellm_output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs),
    "prefix_serve_bench_tokens_per_s": ours["tokens_per_s"],
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
