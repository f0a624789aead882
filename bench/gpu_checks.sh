#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one run: a lent GPU comes for minutes, so it gets one prepared
# script, not a session of trial and error. It must work the first time on a fresh CUDA machine that has only this
# repository (plus, optionally, carried wheels), finish within 8 minutes including cold compiles, and print each
# result the moment it is measured ("RESULT ..." lines), so whatever finished is known even if time runs out.
#
#   bash bench/gpu_checks.sh             # on the GPU machine: logs in $OUT (the device tool) or bench/_work/gpu
#   SMOKE=1 bash bench/gpu_checks.sh     # on a CPU, in a few minutes: tiny settings, checks the script, not the numbers
#
# The GPU image (the device tool's KINDS.md: Python 3.12, torch 2.11, transformers 5.17, huggingface_hub 1.33,
# tokenizers 0.23.2, no zhconv) runs every part as it is; tests/test_gpu_checks.py runs the smoke mode on an emulation
# of it. To measure the transformers requirements.txt asks for, carry five pure-Python wheels, fetched beforehand by
# `bash bench/fetch_gpu_wheels.sh` into the git-ignored .whl/ (14.8 MB):
#   transformers-5.25.0, huggingface_hub-2.4.0, httpx2-2.17.0, httpcore2-2.17.0, truststore-0.10.5
# and carry them: the device call is `bash bench/gpu_checks.sh` with carry [".whl"]. The script starts with the
# device README's install line, into $GPU_WHEEL_SITE (default /tmp/site), which it then puts first on PYTHONPATH:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# If transformers does not import from them, it says so and runs on the image's own (the code runs on both).
# Parts, most wanted first (seconds are each part's own time limit; 500 s in all, which leaves the wheels' install
# and bash their seconds of the 8 minutes):
#   attention     device, capability, the dtype policy's answer, versions; issue 14.3: the SDPA kernel planned for
#                 training, packed SFT, prefill and decode shapes, run with only that kernel allowed (a wrong plan
#                 raises instead of falling back to math silently); packed SFT's FlexAttention timed, compiled
#   trainer_fp16  issue 14.2: 30 real PretrainTrainer steps in fp16 (overflow steps skipped and counted, no stop) and
#                 packed SFT in the same run
#   trainer_bf16  the same in bf16 (where the GPU has it; dtype=auto answers fp16 on a T4, see env)
#   trainer_small issue 14 goals: small preset tokens/s + MFU through the real Trainer, compiled, with the recipe's
#                 optimizers (Muon for pretraining); then packed SFT, compiled
#   vs_llama      small and base through the same PretrainTrainer: ours vs transformers' LlamaForCausalLM of the same
#                 dims, same config, batches and compile setting (eager: four cold compiles would not fit)
#   trainer_base  base preset MFU through the real Trainer, compiled (goal >= 45% on H100)
#   sync_audit    host syncs per step of pretraining (adamw, muon), packed SFT and DPO (set_sync_debug_mode)
#   muon          issue 21: Muon's optimizer step (BatchedMuon, Newton-Schulz in the policy's dtype) beside AdamW's
#                 and beside an fp32 forward+backward of the recipe's 64 x 512 tokens (goal: <= 5% of the step)
#   decode        issue 21: batch-1 and batch-8 decode, the Engine's compiled step (one CUDA graph per token) against
#                 transformers' generate() on the same weights (goal: >= 5x at batch 1)
# Every trainer run takes each stage's optimizer settings from config/recipes/small_gpu (bench/bench_trainer.py).
# $OUT gets a log per part and summary.txt; the device returns at most 8 files, so every RESULT line is in the summary.
# Every run also prints an interim RESULT a few steps after its warm-up, so a part cut off by its limit still reports.
# The smoke run compiles its trainer_small part with the aot_eager backend (dynamo and AOTAutograd, the capture that
# breaks or recompiles; Inductor's CPU code generation would take minutes there) and skips the sync audit (no CUDA).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/_work/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# transformers 5.25's from_pretrained kernelizes by default and stops where the `kernels` package is missing (it is,
# on the image): our model has no Hub-kernel layers, so switching that off changes nothing it runs.
export USE_HUB_KERNELS=${USE_HUB_KERNELS:-0}
if ls .whl/*.whl >/dev/null 2>&1; then
    site=${GPU_WHEEL_SITE:-/tmp/site}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    if PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import transformers" >/dev/null 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "the carried wheels do not import; running on the image's own transformers" >&2
    fi
fi
summary="$out/summary.txt"
: >"$summary"

if [ "${SMOKE:-0}" = 1 ]; then
    attention="--smoke --preset tiny"
    trainer_fp16="--smoke --dtype fp16"
    trainer_bf16="--smoke --dtype bf16"
    trainer_small="--smoke --compile --compile_backend aot_eager"
    vs_llama="--smoke --no_sft --model slm llama"
    trainer_base="--smoke --no_sft"
    sync_audit="--smoke"
    muon="--preset tiny --batch 1 --seq_len 16 --repeats 1"
    decode="--preset tiny --devices cpu --batches 1 --prompt_lens 8 --new_tokens 4 --repeats 1"
    limit=240
else
    attention="--preset small --batch 16 --seq_len 1024"
    trainer_fp16="--preset small --seq_len 512 --batch 32 --steps 30 --dtype fp16"
    trainer_bf16="--preset small --seq_len 512 --batch 32 --steps 30 --dtype bf16"
    trainer_small="--preset small --seq_len 1024 --batch 64 --steps 30 --warmup 10 --compile"
    vs_llama="--preset small base --model slm llama --seq_len 1024 --batch 32 --steps 15 --warmup 5 --no_sft"
    trainer_base="--preset base --seq_len 1024 --batch 32 --steps 30 --warmup 10 --compile --no_sft"
    sync_audit="--preset small --seq_len 512 --batch 8 --steps 8 --warmup 3"
    muon="--device cuda --threads 0 --batch 16 --repeats 5"
    decode="--devices cuda --batches 1 8 --prompt_lens 32 512 --repeats 3"
    limit=0
fi

part() {  # part NAME SECONDS COMMAND...: time-limited, log in $out/NAME.log, RESULT lines echoed as they come
    local name=$1 seconds=$2
    shift 2
    [ "$limit" -gt 0 ] && seconds=$limit
    echo "== $name (limit $seconds s): $*" | tee -a "$summary"
    local start=$SECONDS
    # create the log before the part starts: the redirect below happens in the child, and a tail that starts first
    # finds no file and gives up, losing every RESULT line of a fast part
    : >"$out/$name.log"
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1 &
    local pid=$!
    # print each result the moment the part writes it
    tail -n +1 -f "$out/$name.log" --pid=$pid 2>/dev/null | grep --line-buffered -E "^(RESULT|plan |this GPU|device|[a-z_]+ +B=|\|)" \
        | tee -a "$summary"
    wait $pid
    local rc=$?
    echo "-- $name: exit $rc after $((SECONDS - start)) s" | tee -a "$summary"
    [ $rc -ne 0 ] && tail -n 8 "$out/$name.log" | tee -a "$summary"
    return 0
}

part attention 50 python3 bench/gpu_attention.py $attention
part trainer_fp16 50 python3 bench/bench_trainer.py $trainer_fp16
part trainer_bf16 45 python3 bench/bench_trainer.py $trainer_bf16
part trainer_small 110 python3 bench/bench_trainer.py $trainer_small
part vs_llama 60 python3 bench/bench_trainer.py $vs_llama
part trainer_base 80 python3 bench/bench_trainer.py $trainer_base
part sync_audit 40 python3 bench/sync_audit.py $sync_audit
part muon 25 python3 bench/bench_muon.py $muon
part decode 40 python3 bench/bench_generate.py $decode
echo "done: $summary"
