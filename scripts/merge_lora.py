"""
Merge a PEFT-format LoRA adapter (the lora stage's final/ or step_*/) into its base model: a plain full model.

    python scripts/merge_lora.py --model out/pretrain/final --adapter out/lora/final --out out/lora_merged
    python scripts/merge_lora.py --adapter out/lora/final --out out/lora_merged   # base from adapter_config.json

W += scale * B @ A in fp32 for every adapted layer (model/lora.merge_lora_weights; scale = lora_alpha / r, or
lora_alpha / sqrt(r) for rsLoRA) and the trained token rows (trainable_token_indices: the chat markers) written
over the embedding's and the head's rows, then the weights are saved in the base checkpoint's dtype with its config and
the tokenizer. The result is an ordinary checkpoint: init_from of the next stage, Engine.from_pretrained,
scripts/export_llama.py; like a stage's final/ it stops generation at <|im_end|>, carries a model card (with the
data licenses the adapter's and the base's cards record) and files other accounts can read.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run directly: repo root importable

import argparse  # noqa: E402

import torch  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from dataset.licenses import card_licenses  # noqa: E402
from model.hub import make_readable, set_generation_defaults, write_model_card  # noqa: E402
from model.lora import adapter_base_model, merge_lora_weights, read_adapter_config  # noqa: E402
from model.runtime import load_pretrained  # noqa: E402


def merge(model_dir: str, adapter_dir: str, out_dir: str) -> str:
    hf_logging.disable_progress_bar()
    model_dir = model_dir or adapter_base_model(adapter_dir)
    # Merge in fp32 (a bf16 add would round the small update away), then save in the base's own dtype.
    dtype = AutoConfig.from_pretrained(model_dir).dtype or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    merged = load_pretrained(model_dir)
    n = merge_lora_weights(merged, adapter_dir)
    # The adapter dir carries the tokenizer it was trained with; fall back to the base model's.
    tok_dir = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer.json")) else model_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    set_generation_defaults(merged, tokenizer)
    merged.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    adapter = read_adapter_config(adapter_dir)
    targets = adapter["target_modules"]
    write_model_card(
        out_dir,
        config=merged.config,
        stage="lora",
        training={
            "LoRA adapter": f"{adapter_dir}, merged into the base weights ({n} modules)",
            "rank": adapter["r"],
            "alpha": adapter["lora_alpha"],
            "rsLoRA": adapter.get("use_rslora", False),
            "target modules": targets if isinstance(targets, str) else ", ".join(targets),
            "trained token rows": (adapter["trainable_tokens"] or {}).get("ids", "none"),
            "weights dtype": str(dtype).removeprefix("torch."),
        },
        licenses=sorted(set(card_licenses(adapter_dir) + card_licenses(model_dir))),
        base_model=model_dir,
    )
    make_readable(out_dir)  # safetensors writes 0600; a docker/ollama service account must be able to read it
    print(f"merged {n} modules of {adapter_dir} into {model_dir} -> {out_dir} ({str(dtype).removeprefix('torch.')})")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Merge a PEFT-format LoRA adapter into its base model.")
    parser.add_argument("--model", default="", help="base model dir (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--adapter", required=True, help="dir with adapter_config.json + adapter_model.safetensors")
    parser.add_argument("--out", required=True, help="where to write the merged model")
    args = parser.parse_args(argv)
    merge(args.model, args.adapter, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
