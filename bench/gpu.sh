#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU (meant to take under 10 minutes on one H200):
#
#   bash bench/gpu.sh                 # logs and a summary in $OUT (default: gpu_out/)
#
#   1. the tests that run on CUDA (those with "cuda" in their name or parameters);
#   2. bench/train.py --device cuda --peers --compile on the default model's shapes and on Llama-3.2-1B's,
#      random weights (speed and memory do not depend on them): tokens/s, max_memory_allocated, eager and
#      compiled, ours and transformers + peft (+ bitsandbytes), and the estimator against each peak;
#   3. bench/fsdp.py --device cuda on Llama-3.2-1B's shapes, on as many GPUs as there are (nccl): the
#      base each GPU holds, its peak memory, the speed.
#
# A machine that cannot download needs the tokenizer and the data beside the tree, prepared where pip works:
#   mkdir -p .gpu/tok .gpu/cache && cp ~/.cache/pure-qlora/alpaca_eval.jsonl .gpu/cache/ &&
#   cp ~/.cache/pure-qlora/SmolLM2-135M-Instruct/{config.json,tokenizer.json,tokenizer_config.json} .gpu/tok/
# (both come from `python train.py --show-example` once), and bitsandbytes as a wheel if it is not installed
# there; without it the QLoRA peer is reported as failed and everything else still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-12}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -f .gpu/cache/alpaca_eval.jsonl ]; then export PURE_QLORA_CACHE=$PWD/.gpu/cache; fi
TOK=${TOK:-$([ -d .gpu/tok ] && echo .gpu/tok || echo default)}

python - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0),
      "| capability", torch.cuda.get_device_capability(0), "| bf16", torch.cuda.is_bf16_supported())
EOF

echo "== CUDA tests" | tee "$OUT/summary.txt"
timeout 240 python -m pytest -q -k cuda tests 2>&1 | tee "$OUT/tests.log" | tail -3 | tee -a "$OUT/summary.txt"

for preset in SmolLM2-135M Llama-3.2-1B; do
    model=/tmp/pure-qlora-$preset
    [ -d "$model" ] || python bench/random_model.py --preset "$preset" --tokenizer "$TOK" --out "$model"
    echo "== $preset: bench/train.py --device cuda --peers --compile --steps $STEPS" | tee -a "$OUT/summary.txt"
    timeout 300 python bench/train.py --device cuda --model "$model" --steps "$STEPS" --peers --compile 2>&1 \
        | tee "$OUT/bench-$preset.log" | grep -E "^(ours|peer|matmul|QLoRA)" | tee -a "$OUT/summary.txt"
done

ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
worlds=$(python -c "print(','.join(str(w) for w in (1, 2, 3, 4, 8) if w <= $ngpu and 6 % w == 0 or w == 1))")
echo "== bench/fsdp.py --device cuda --worlds $worlds" | tee -a "$OUT/summary.txt"
timeout 300 python bench/fsdp.py --device cuda --worlds "$worlds" --model /tmp/pure-qlora-Llama-3.2-1B 2>&1 \
    | tee "$OUT/fsdp.log" | grep -E "^world" | tee -a "$OUT/summary.txt"
