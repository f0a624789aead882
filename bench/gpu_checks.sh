#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one run: a lent GPU comes for minutes, so it gets one prepared
# script, not a session of trial and error. Each part has its own time limit and writes its own log, so a part that
# runs long costs only itself, and what finished comes back.
#
#   bash bench/gpu_checks.sh             # on the GPU machine: logs in $OUT (the device tool) or bench/_work/gpu
#   SMOKE=1 bash bench/gpu_checks.sh     # anywhere, in a minute: tiny settings, checks the script, not the numbers
#
# The GPU image may carry an older transformers than requirements.txt asks for: put the wheels in .whl/ (transformers,
# and regex, which transformers checks at import; see the device README) and carry it: they go to /tmp/site first.
# Parts, most wanted first:
#   train_small  issue 4: small preset tokens/s + MFU vs transformers' Llama, compiled, micro-batch 128 and 256
#                (goal: >= 2.0M tok/s)
#   train_variants  issue 4: ours with the chunked loss and with the NaN guard's per-step sync, and a profile
#   train_base   issue 4: base preset MFU, compiled (goal: >= 45%)
#   train_eager  issue 4: both presets without torch.compile
#   rl_memory    issue 7: PPO / GRPO peak GPU memory per memory option (critic shared/separate, reference offload)
#   generate     issue 6: decode tokens/s, our engine vs transformers' generate, CUDA rows
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/_work/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 - <<'EOF' | tee "$out/summary.txt"
import torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"device {name} | torch {torch.__version__} | transformers {transformers.__version__}")
EOF

if [ "${SMOKE:-0}" = 1 ]; then
    small="--presets tiny --seq_len 32 --batch 2 --steps 2 --warmup 1 --rounds 1"
    train_small="$small --compile no"
    train_variants="$small --compile no --models slm slm+chunk slm+sync --loss_chunk 16 --profile"
    train_base="$small --compile no"
    train_eager="$small --compile no"
    rl_memory="--preset tiny --batch 4 --group 2 --prompt_tokens 8 --max_new_tokens 4 --seq_len 32"
    generate="--preset tiny --new_tokens 4 --repeats 1 --prompt_lens 32"
    limit=120
else
    train_small="--presets small --seq_len 512 --batch 128 256 --steps 20 --warmup 5 --rounds 1 --compile yes"
    train_variants="--presets small --seq_len 512 --batch 256 --steps 20 --warmup 5 --rounds 1 --compile yes
                    --models slm slm+chunk slm+sync --loss_chunk 8192 --profile"
    train_base="--presets base --seq_len 512 --batch 64 --steps 20 --warmup 5 --rounds 1 --compile yes"
    train_eager="--presets small base --seq_len 512 --batch 128 --steps 10 --warmup 3 --rounds 1 --compile no"
    rl_memory=""
    generate="--devices cuda"
    limit=0
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, append its tail to the summary
    local name=$1 seconds=$2
    shift 2
    [ "$limit" -gt 0 ] && seconds=$limit
    echo "== $name ($seconds s): $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "-- $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 15 "$out/$name.log" >>"$out/summary.txt"
}

# 570 s in all: the device tool's limit is 600 s a call
part train_small 150 python3 bench/bench_train.py $train_small
part train_variants 110 python3 bench/bench_train.py $train_variants
part train_base 100 python3 bench/bench_train.py $train_base
part train_eager 70 python3 bench/bench_train.py $train_eager
part rl_memory 100 python3 bench/bench_rl_memory.py $rl_memory
part generate 40 python3 bench/bench_generate.py $generate
