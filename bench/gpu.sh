#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU, within a time budget (BUDGET seconds, default 540:
# each stage gets what is left, at most its own cap, so a slow stage costs the later ones, never the whole run):
#
#   bash bench/gpu.sh                 # logs and a summary in $OUT (default: gpu_out/)
#
#   1. the CUDA tests: tests/test_cuda.py (NF4 bytes, logits, AdamW8bit against bitsandbytes' and transformers'
#      CUDA paths, compiled vs eager, --fsdp on nccl) and every other test with "cuda" in its name;
#   2. bench/train.py --device cuda --peers on Llama-3.2-1B's shapes and on the default model's (random weights:
#      speed and memory do not depend on them): tokens/s and max_memory_allocated, ours and transformers + peft
#      (+ bitsandbytes), and the estimator against each peak;
#   3. bench/fsdp.py --device cuda on Llama-3.2-1B's shapes, on the GPUs there are (nccl), with and without
#      --fsdp-cpu-offload: the base each GPU holds and its peak memory;
#   4. bench/train.py --device cuda --compile on both: compile time and steady-state speed against eager
#      (and, last, with STAGES including peers-compiled, the peers' decoder layers compiled too).
#
# A machine that cannot download needs, beside the tree (in .gpu/, ignored by git: carry it), the tokenizer and the data, and bitsandbytes if it lacks
# it, prepared where pip works (the files of `python train.py --show-example`; bitsandbytes' wheel unpacked, with
# only the CUDA library that machine's torch needs):
#   mkdir -p .gpu/tok .gpu/cache .gpu/site && cp ~/.cache/pure-qlora/alpaca_eval.jsonl .gpu/cache/ &&
#   cp ~/.cache/pure-qlora/SmolLM2-135M-Instruct/{config.json,tokenizer.json,tokenizer_config.json} .gpu/tok/ &&
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 -d /tmp/w bitsandbytes==0.50.2 &&
#   unzip -q /tmp/w/bitsandbytes-*.whl -d .gpu/site -x '*cuda1[12]*.so' '*rocm*' '*xpu*'
# Without bitsandbytes the QLoRA peer and the tests against it fail; everything else still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-12}
BUDGET=${BUDGET:-540}
PY=${PY:-$(command -v python3 || command -v python)}
DEVICE=${DEVICE:-cuda}                                  # DEVICE=cpu PRESETS=SmolLM2-135M: a dry run of the script
PRESETS=${PRESETS:-Llama-3.2-1B SmolLM2-135M}
FSDP_MODE=${FSDP_MODE:-}                               # --lora: bench/fsdp.py on the 16-bit base
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PURE_QLORA_SKIP_DEFAULT=1
[ -f .gpu/cache/alpaca_eval.jsonl ] && export PURE_QLORA_CACHE=$PWD/.gpu/cache
[ -d .gpu/site/bitsandbytes ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null && export PYTHONPATH=$PWD/.gpu/site
TOK=${TOK:-$([ -d .gpu/tok ] && echo .gpu/tok || echo default)}
SUMMARY=$OUT/summary.txt
start=$SECONDS

# stage NAME CAP LOG PATTERN COMMAND...: run COMMAND for at most min(CAP, time left) seconds (killed with its
# children after that), its output in $OUT/LOG, the lines matching PATTERN in the summary too.
stage() {
    local name=$1 cap=$2 log=$3 pattern=$4; shift 4
    local t=$((BUDGET - (SECONDS - start)))
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 20 ]; then echo "== $name: not run, ${t}s left of ${BUDGET}s" | tee -a "$SUMMARY"; return; fi
    echo "== $name (at most ${t}s; $((SECONDS - start))s into the run)" | tee -a "$SUMMARY"
    # Into the log, not through a pipe: a compile worker left alive would hold a pipe open after the timeout.
    timeout -k 10 "$t" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    grep -E "$pattern" "$OUT/$log" | tee -a "$SUMMARY"
    echo "   exit $rc after $((SECONDS - start))s" | tee -a "$SUMMARY"
}

"$PY" - <<'EOF' 2>&1 | tee "$SUMMARY"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, *(["|", torch.cuda.get_device_name(0), "x",
      torch.cuda.device_count(), "| capability", torch.cuda.get_device_capability(0)] if torch.cuda.is_available() else []))
for name in ("transformers", "peft", "bitsandbytes"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "missing:", str(e)[:200])
EOF

# The random-weight models are written on the CPU while the tests use the GPU.
for preset in $PRESETS; do
    [ -d /tmp/pure-qlora-$preset ] || "$PY" bench/random_model.py --preset $preset --tokenizer "$TOK" \
        --out /tmp/pure-qlora-$preset >>"$OUT/models.log" 2>&1 &
done

stage "CUDA tests" 150 tests.log "passed|skipped|failed|error|PASSED|FAILED|ERROR|differing|ours - bnb|peak per GPU|losses eager|step.s peak" \
    "$PY" -m pytest -v -rA -s -p no:cacheprovider --durations=8 -k cuda tests
wait
cat "$OUT/models.log" >>"$SUMMARY" && rm "$OUT/models.log"

BENCH="^(ours|peer|matmul|QLoRA)|Error|error"
for preset in $PRESETS; do
    stage "$preset: bench/train.py --device $DEVICE --peers --steps $STEPS" 100 bench-$preset.log "$BENCH" \
        "$PY" bench/train.py --device "$DEVICE" --model /tmp/pure-qlora-$preset --steps "$STEPS" --peers
done

ngpu=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
worlds=$("$PY" -c "print(','.join(str(w) for w in (1, 2, 3, 6) if w <= $ngpu))")
big=${PRESETS%% *}
for offload in "" --cpu-offload; do
    stage "$big: bench/fsdp.py --device $DEVICE --worlds $worlds $FSDP_MODE $offload" 60 fsdp$offload.log "^world|rror" \
        "$PY" bench/fsdp.py --device "$DEVICE" --worlds "$worlds" --model /tmp/pure-qlora-$big $FSDP_MODE $offload
done

for preset in $(echo $PRESETS | tr ' ' '\n' | tac); do   # the small model first: it compiles faster
    stage "$preset: bench/train.py --device $DEVICE --compile --steps $STEPS" 200 compile-$preset.log "$BENCH" \
        "$PY" bench/train.py --device "$DEVICE" --model /tmp/pure-qlora-$preset --steps "$STEPS" --compile
done
if [[ "${STAGES:-}" == *peers-compiled* ]]; then
    stage "SmolLM2-135M: bench/train.py --device $DEVICE --peers --compile" 300 compile-peers.log "$BENCH" \
        "$PY" bench/train.py --device "$DEVICE" --model /tmp/pure-qlora-SmolLM2-135M --steps "$STEPS" --peers --compile
fi
echo "== done in $((SECONDS - start))s" | tee -a "$SUMMARY"
