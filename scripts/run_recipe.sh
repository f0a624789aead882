#!/usr/bin/env bash
# The "small_gpu" recipe: raw public data -> a small Chinese chat model, every stage in order, on one GPU.
#
#   bash scripts/run_recipe.sh                                  # the shared data pack (../shared/data), out/recipe
#   DATA=/data/milli OUT=out/wiki bash scripts/run_recipe.sh    # your own download (layout below)
#   QUICK=1 bash scripts/run_recipe.sh                          # smoke test on a CPU: tiny model, a few steps,
#                                                               # in out/recipe_quick
#   FORCE=1 bash scripts/run_recipe.sh                          # redo every stage
#
# Stages: clean -> tokenizer -> shards -> pretrain -> sft -> dpo -> eval -> plot -> export. A stage whose output
# is complete (its marker file exists) is skipped when $OUT was made with the same settings ($OUT/settings.txt: QUICK,
# DATA, RECIPE, the file lists and weights; other settings stop the script unless FORCE=1), so an interrupted run continues where it stopped (training
# stages also resume from their last checkpoint). Each stage's wall time is printed and written to
# $OUT/timings.tsv. Settings live in config/recipes/small_gpu/*.yaml; this script only fills in paths (and,
# with QUICK=1, shrinks every stage). See config/recipes/README.md for where to get the data.
#
# Environment (relative paths are taken from the directory you run the script in):
#   DATA       data root (default ../shared/data next to the repository), laid out as
#                pretrain/zh/   Chinese text: WikiExtractor output (plain or --json), .txt, .jsonl, .json(.gz)
#                pretrain/en/   English text, same formats (cleaned with --min_cjk_ratio 0)
#                sft/           chat files (Alpaca / ShareGPT / messages JSON or JSONL)
#                dpo/           preference pairs (LLaMA-Factory ranking, MedicalGPT, hh-rlhf, ...)
#                eval/cmmlu/    CMMLU {dev,test}/<subject>.csv
#   OUT        where everything goes (default out/recipe in the repository, out/recipe_quick with QUICK=1)
#   QUICK      1 = tiny preset, a few steps per stage, small data samples (a few minutes on a CPU)
#   FORCE      1 = redo stages whose output exists
#   STOP_AFTER a stage name: stop after it (e.g. STOP_AFTER=shards prepares the data on a CPU machine)
#   RECIPE     the config folder (default config/recipes/small_gpu; a copy of it for other settings)
#   SFT_FILES  SFT file names under $DATA/sft, comma-separated (default: the general-purpose files of the pack)
#   DPO_FILES  preference file names under $DATA/dpo, comma-separated (default: the pack's zh + en demo pairs)
#   ZH_WEIGHT, EN_WEIGHT   shard mixing weights per source: a sampling rate (0.5 = half of its documents,
#              2 = every document twice), not a share; the script prints the token share that results
#   PYTHON     the interpreter (default python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
DATA=$(abspath "${DATA:-$ROOT/../shared/data}")
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then OUT=$(abspath "${OUT:-$ROOT/out/recipe_quick}"); else OUT=$(abspath "${OUT:-$ROOT/out/recipe}"); fi
FORCE=${FORCE:-0}
STOP_AFTER=${STOP_AFTER:-}
PY=${PYTHON:-python}
RECIPE=$(abspath "${RECIPE:-$ROOT/config/recipes/small_gpu}")
cd "$ROOT"
STAGE_NAMES=" clean tokenizer shards pretrain sft dpo eval plot export "
[[ -z $STOP_AFTER || $STAGE_NAMES == *" $STOP_AFTER "* ]] || {
    echo "error: STOP_AFTER=$STOP_AFTER is not one of:$STAGE_NAMES" >&2; exit 2; }
[[ -d $RECIPE ]] || { echo "error: RECIPE=$RECIPE is not a directory" >&2; exit 2; }

# Default mixes, chosen from the pack (../shared/data/README.md): the BELLE files are not in a chat format the SFT
# reader takes, the medical SFT set is domain data with unvetted claims, hh-rlhf is English red-teaming text.
SFT_FILES=${SFT_FILES:-llamafactory_alpaca_zh_demo.json,medicalgpt_sharegpt_zh_1K_format.jsonl,llamafactory_alpaca_en_demo.json,llamafactory_identity.json}
DPO_FILES=${DPO_FILES:-llamafactory_dpo_zh_demo.json,medicalgpt_dpo_zh_500_minus_holdout.jsonl,llamafactory_dpo_en_demo.json}
# On the pack, weights 1 and 1 already give about 90% Chinese / 10% English tokens. With a full zhwiki dump
# (50x more Chinese) raise EN_WEIGHT or add English text to keep ~10%.
ZH_WEIGHT=${ZH_WEIGHT:-1.0}
EN_WEIGHT=${EN_WEIGHT:-1.0}

for d in pretrain/zh pretrain/en sft dpo eval/cmmlu/test; do
    [[ -d $DATA/$d ]] || { echo "error: $DATA/$d not found; set DATA= (see config/recipes/README.md)" >&2; exit 2; }
done
prefix() { local dir=$1 list=$2 out="" f; IFS=, read -ra names <<< "$list"
    for f in "${names[@]}"; do [[ -e $dir/$f ]] || { echo "error: $dir/$f not found" >&2; exit 2; }
        out+="${out:+,}$dir/$f"; done; echo "$out"; }
SFT_PATHS=$(prefix "$DATA/sft" "$SFT_FILES")
DPO_PATHS=$(prefix "$DATA/dpo" "$DPO_FILES")

# QUICK=1: every stage the real one, shrunk to seconds. Keys are the stages' Config fields, as in the YAMLs.
ZH_INPUTS=("$DATA/pretrain/zh")
EN_INPUTS=("$DATA/pretrain/en")
TOK_Q=() SHARD_Q=() PRE_Q=() SFT_Q=() DPO_Q=() EVAL_Q=()
SHARD_MB=20 VAL_TOKENS=200000
if [[ $QUICK == 1 ]]; then
    # the two WikiExtractor samples (traditional characters and -{}- markup included) and one English file
    ZH_INPUTS=("$DATA"/pretrain/zh/zhwiki_wikiextractor_*)
    EN_INPUTS=("$DATA/pretrain/en/llamafactory_c4_demo.jsonl")
    [[ -e ${ZH_INPUTS[0]} && -e ${EN_INPUTS[0]} ]] || ZH_INPUTS=("$DATA/pretrain/zh") EN_INPUTS=("$DATA/pretrain/en")
    SHARD_MB=0.2 VAL_TOKENS=20000
    TOK_Q=(max_bytes=1500000 heldout_max_bytes=200000)
    COMMON_Q=(device=cpu compile=false log_every=2 keep_last=1)
    PRE_Q=("${COMMON_Q[@]}" model_config=tiny max_steps=12 batch_size=4 global_batch_size=8 seq_len=128
           warmup_steps=2 eval_every=6 eval_batches=2 save_every=6 sample_tokens=8 lr=3e-3)
    SFT_Q=("${COMMON_Q[@]}" max_samples=30 val_samples=8 max_steps=6 batch_size=4 global_batch_size=8 seq_len=256
           warmup_steps=1 eval_every=3 eval_batches=2 save_every=3)
    DPO_Q=("${COMMON_Q[@]}" max_samples=16 val_samples=6 max_steps=4 batch_size=2 global_batch_size=4 seq_len=256
           warmup_steps=1 eval_every=2 eval_batches=2 save_every=2)
    EVAL_Q=(device=cpu batch_size=4 ppl_max_tokens=4000 subjects=arts,chinese_history mc_max_questions=4
            max_new_tokens=12)
fi

# A stage's marker means complete for the settings that made it: another QUICK, data or file list in the same OUT
# would otherwise skip every stage and chat with the wrong model.
SETTINGS="QUICK=$QUICK DATA=$DATA RECIPE=$RECIPE SFT_FILES=$SFT_FILES DPO_FILES=$DPO_FILES ZH_WEIGHT=$ZH_WEIGHT EN_WEIGHT=$EN_WEIGHT"
if [[ -e $OUT/settings.txt && $FORCE != 1 && $(cat "$OUT/settings.txt") != "$SETTINGS" ]]; then
    echo "error: $OUT was made with other settings ($(cat "$OUT/settings.txt")), not $SETTINGS;" \
         "use another OUT= or FORCE=1 to redo every stage there" >&2
    exit 2
fi
mkdir -p "$OUT"
echo "$SETTINGS" > "$OUT/settings.txt"
TIMINGS=$OUT/timings.tsv
printf 'stage\tseconds\tstatus\n' > "$TIMINGS"
echo "[recipe] DATA=$DATA OUT=$OUT QUICK=$QUICK FORCE=$FORCE"

# stage NAME MARKER FUNCTION: run FUNCTION unless MARKER exists (and FORCE is not 1); time it.
stage() {
    local name=$1 marker=$2 fn=$3
    if [[ -e $marker && $FORCE != 1 ]]; then
        echo "[recipe] $name: complete ($marker), skipped; FORCE=1 redoes it"
        printf '%s\t0.0\tskipped\n' "$name" >> "$TIMINGS"
    else
        run_timed "$name" "$fn"
    fi
    if [[ $name == "$STOP_AFTER" ]]; then
        echo "[recipe] stopping after $name (STOP_AFTER); times in $TIMINGS"
        exit 0
    fi
}
run_timed() {
    local name=$1 fn=$2 start secs
    printf '\n%s\n== stage %s\n%s\n' "${LINE:=$(printf '=%.0s' {1..100})}" "$name" "$LINE"
    start=$EPOCHREALTIME
    "$fn"
    secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    echo "[recipe] $name: done in ${secs}s"
    printf '%s\t%s\tdone\n' "$name" "$secs" >> "$TIMINGS"
}
# A training stage redone with FORCE=1 starts from scratch (otherwise resume=auto would pick up old checkpoints).
fresh() { if [[ $FORCE == 1 ]]; then rm -rf "$1"; fi; }

# 1. cleaning: traditional -> simplified, markup and debris removed, deduplicated
run_clean() {
    "$PY" scripts/zh_simplify.py --input "${ZH_INPUTS[@]}" --output "$OUT/corpus/zh.jsonl"
    "$PY" scripts/zh_simplify.py --input "${EN_INPUTS[@]}" --output "$OUT/corpus/en.jsonl" --min_cjk_ratio 0
}
# both outputs are written atomically (tmp + rename), en last
stage clean "$OUT/corpus/en.jsonl" run_clean

# 2. tokenizer: byte-level BPE, 6400 entries (tokenizer_report.json is written last)
run_tokenizer() {
    "$PY" main.py --stage tokenizer --config "$RECIPE/tokenizer.yaml" \
        data_path="$OUT/corpus/zh.jsonl,$OUT/corpus/en.jsonl" out_dir="$OUT/tokenizer" "${TOK_Q[@]}"
}
stage tokenizer "$OUT/tokenizer/tokenizer_report.json" run_tokenizer
VOCAB=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['vocab_size'])" \
        "$OUT/tokenizer/tokenizer_report.json")

# 3. shards: mixed, shuffled uint16 token shards + a validation shard (meta.json is written last)
run_shards() {
    rm -rf "$OUT/shards"
    "$PY" scripts/prepare_shards.py --tokenizer "$OUT/tokenizer" --out_dir "$OUT/shards" \
        --inputs "$OUT/corpus/zh.jsonl:$ZH_WEIGHT" "$OUT/corpus/en.jsonl:$EN_WEIGHT" \
        --shard_mb "$SHARD_MB" --val_tokens "$VAL_TOKENS"
    "$PY" - "$OUT/shards/meta.json" <<'EOF'
import json, os, sys
sources = json.load(open(sys.argv[1]))["sources"]
total = sum(s["tokens"] for s in sources)
print("[recipe] mix: " + ", ".join(f"{os.path.basename(s['path'])} (weight {s['weight']}) {s['tokens']:,} tokens "
                                   f"= {100 * s['tokens'] / total:.1f}%" for s in sources))
EOF
}
stage shards "$OUT/shards/meta.json" run_shards

# 4-6. training: each stage starts from the previous one's final/ (config.json marks a complete export)
run_pretrain() {
    fresh "$OUT/pretrain"
    "$PY" main.py --stage pretrain --config "$RECIPE/pretrain.yaml" tokenizer_dir="$OUT/tokenizer" \
        data_dir="$OUT/shards" out_dir="$OUT/pretrain" vocab_size="$VOCAB" "${PRE_Q[@]}"
}
stage pretrain "$OUT/pretrain/final/config.json" run_pretrain

run_sft() {
    fresh "$OUT/sft"
    "$PY" main.py --stage sft --config "$RECIPE/sft.yaml" init_from="$OUT/pretrain/final" \
        data_path="$SFT_PATHS" out_dir="$OUT/sft" "${SFT_Q[@]}"
}
stage sft "$OUT/sft/final/config.json" run_sft

run_dpo() {
    fresh "$OUT/dpo"
    "$PY" main.py --stage dpo --config "$RECIPE/dpo.yaml" init_from="$OUT/sft/final" \
        data_path="$DPO_PATHS" out_dir="$OUT/dpo" "${DPO_Q[@]}"
}
stage dpo "$OUT/dpo/final/config.json" run_dpo

# 7. evaluation: bits per byte on the val shard, CMMLU 5-shot, a generation report; the three models side by side
run_eval() {
    "$PY" main.py --stage eval --config "$RECIPE/eval.yaml" \
        init_from="$OUT/pretrain/final,$OUT/sft/final,$OUT/dpo/final" names=pretrain,sft,dpo \
        ppl_data="$OUT/shards" mc_dir="$DATA/eval/cmmlu" prompts="$RECIPE/prompts.jsonl" out_dir="$OUT/eval" \
        "${EVAL_Q[@]}"
}
stage eval "$OUT/eval/eval.json" run_eval

# 8. loss curves, one figure per training stage (matplotlib is optional: skipped with a note when missing)
run_plot() {
    if ! "$PY" -c "import matplotlib" 2>/dev/null; then
        echo "[recipe] matplotlib is not installed (pip install matplotlib): no plots"
        return 0
    fi
    mkdir -p "$OUT/plots"
    local s
    for s in pretrain sft dpo; do
        "$PY" scripts/plot_metrics.py "$OUT/$s/metrics.jsonl" --out "$OUT/plots/$s.png"
    done
}
stage plot "$OUT/plots/dpo.png" run_plot

# 9. export the final (DPO) model as a stock Llama folder (transformers, vLLM, llama.cpp's converter)
run_export() {
    "$PY" scripts/export_llama.py --model "$OUT/dpo/final" --out "$OUT/export/llama"
}
stage export "$OUT/export/llama/config.json" run_export

printf '\n[recipe] wall time per stage (%s):\n' "$TIMINGS"
column -t -s $'\t' "$TIMINGS" 2>/dev/null || cat "$TIMINGS"
echo "[recipe] report: $OUT/eval/eval.md, generations: $OUT/eval/generations.md, plots: $OUT/plots/"
echo "[recipe] chat:   $PY scripts/chat_terminal.py --model $OUT/dpo/final"
