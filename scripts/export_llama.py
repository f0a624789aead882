"""
Export an SLM checkpoint as a stock Llama folder: transformers, vLLM, llama.cpp's converter and ollama read it
with no custom code (no trust_remote_code).

    python scripts/export_llama.py --model out/sft/final --out out/export/llama

With MoE off, an SLM model *is* a Llama model (same modules, names, RoPE layout and norms), so the weights are
copied unchanged and only config.json is rewritten. MoE models have no Llama equivalent and are refused.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from model.configuration_slm import slm_to_llama_config  # noqa: E402
from model.hub import make_readable  # noqa: E402
from model.runtime import load_pretrained  # noqa: E402
from trainer.errors import whole_output  # noqa: E402


def export_llama(model_dir: str, out_dir: str, dtype: str = "auto") -> str:
    src = load_pretrained(model_dir, dtype="auto")
    config = slm_to_llama_config(src.config)
    torch_dtype = {
        "auto": next(src.parameters()).dtype,
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }[dtype]
    with torch.device("meta"):
        dst = LlamaForCausalLM(config)
    # Same parameter names on both sides: a strict load proves the architectures match key for key.
    dst.load_state_dict(src.state_dict(), strict=True, assign=True)
    dst.tie_weights()
    dst = dst.to(torch_dtype)
    # Chat models stop at the end of a turn as well as at the end of a document.
    dst.generation_config.eos_token_id = [i for i in (0, 2) if i < config.vocab_size]
    dst.generation_config.pad_token_id = config.pad_token_id
    dst.save_pretrained(out_dir)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    else:
        print(f"warning: no tokenizer in {model_dir}; copy out/tokenizer/* into {out_dir} yourself")
    make_portable(out_dir, src.config.rope_theta)
    make_readable(out_dir)
    return out_dir


def make_portable(out_dir: str, rope_theta: float) -> None:
    """Rewrite what transformers 5 saves so that 4.x (vLLM < 0.19.1 needs it) loads the same model: 4.x reads
    `rope_theta` at the top level of config.json and silently uses 10000 without it, and knows the fast tokenizer
    as PreTrainedTokenizerFast (5.x's TokenizersBackend does not exist there) with a list of
    additional_special_tokens and the model's input names. 5.x reads all of these too."""
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["rope_theta"] = rope_theta
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tok_path = os.path.join(out_dir, "tokenizer_config.json")
    if not os.path.isfile(tok_path):
        return
    with open(tok_path, encoding="utf-8") as f:
        tok = json.load(f)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(tok.get("extra_special_tokens"), list):
        tok["additional_special_tokens"] = tok.pop("extra_special_tokens")
    # 4.x's PreTrainedTokenizerFast returns token_type_ids too, which LlamaForCausalLM.generate(**inputs) refuses
    tok["model_input_names"] = ["input_ids", "attention_mask"]
    for key in ("backend", "is_local", "local_files_only"):  # 5.x bookkeeping, meaningless elsewhere
        tok.pop(key, None)
    with open(tok_path, "w", encoding="utf-8") as f:
        json.dump(tok, f, indent=2, ensure_ascii=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SLM checkpoint directory (e.g. out/sft/final)")
    parser.add_argument("--out", required=True, help="directory for the Llama folder")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weight dtype of the export (auto = as saved)",
    )
    args = parser.parse_args()
    try:
        with whole_output(args.out, "the Llama folder"):  # a full disk: no cut export left behind
            export_llama(args.model, args.out, args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained('{args.out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
