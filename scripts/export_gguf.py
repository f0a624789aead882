"""
Export a dense SLM checkpoint as one GGUF file for llama.cpp, ollama, LM Studio and other GGML runtimes.

    pip install gguf                  # the llama.cpp project's pure-Python GGUF writer (only this script needs it)
    python scripts/export_gguf.py --model out/sft/final --out out/export/milli-chat-f16.gguf \
        [--dtype f16|q8_0|q5_1|q5_0|q4_1|q4_0]
    llama-cli -m out/export/milli-chat-f16.gguf -cnv       # chat with the template stored in the file
    llama-server -m out/export/milli-chat-f16.gguf --port 8080   # OpenAI-compatible server

ollama: the export also writes an ollama Modelfile beside the file (milli-chat-f16.Modelfile: FROM the GGUF, the
ChatML TEMPLATE, the stop tokens, num_ctx = the model's context and the chat sampling defaults), so
    ollama create milli-chat -f out/export/milli-chat-f16.Modelfile && ollama run milli-chat
Its template is chat only (ollama passes tools only to a template that renders them); for tool calls use
llama-server --jinja, which runs the chat template stored in the GGUF.

The file uses llama.cpp's "llama" architecture (a dense SLM is a Llama model, see scripts/export_llama.py) and
carries the tokenizer: byte-level BPE ("gpt2" model) with the Qwen2 pre-tokenizer regex ("qwen2" pre-type, the
same regex our tokenizer splits with), the vocabulary, merges, special-token ids and the ChatML chat template.
Weights follow llama.cpp's own converter (convert_hf_to_gguf.py, LlamaModel): tensor names from gguf's
TENSOR_NAMES, and q_proj/k_proj rows permuted from transformers' half-split RoPE layout to llama.cpp's
interleaved pairs. f16 keeps every matrix in float16; q8_0 stores matrices as 8-bit blocks of 32 with one fp16
scale; q5_1/q5_0/q4_1/q4_0 as 5- or 4-bit blocks of 32 (_1 adds a per-block minimum), quantized by llama.cpp's own
`gguf` package (norms stay float32 in all, as llama.cpp does). The k-quants (q4_k, q5_k) have no writer in the
`gguf` package: make them from the f16 file with llama.cpp's `llama-quantize m-f16.gguf m-q4_k_m.gguf Q4_K_M`.
MoE checkpoints are refused: our MoE (shared experts without a gate) has no llama.cpp architecture that
computes the same function. Distill it into a dense model first (python main.py --stage distill).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from model.engine import CHAT_SAMPLING  # noqa: E402
from model.hub import stop_token_ids  # noqa: E402
from model.runtime import load_pretrained  # noqa: E402
from trainer.errors import whole_output  # noqa: E402

# -----------------------------------------------------------------------------
# Weights


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers rotates dims (i, i + hd/2) together, llama.cpp rotates (2i, 2i + 1): reorder each head's rows
    so the same pairs rotate (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every weight, in llama.cpp's layout."""
    cfg = model.config
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = [("token_embd.weight", model.model.embed_tokens.weight)]
    for i, layer in enumerate(model.model.layers):
        for hf_name, gguf_name in names.items():
            module = layer.get_submodule(hf_name)
            w = module.weight
            if hf_name.endswith("q_proj"):
                w = permute_rope(w, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj"):
                w = permute_rope(w, cfg.num_key_value_heads)
            out.append((f"blk.{i}.{gguf_name}.weight", w))
            if getattr(module, "bias", None) is not None:
                raise ValueError("attention_bias=True has no place in the llama GGUF layout this script writes")
    out.append(("output_norm.weight", model.model.norm.weight))
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reuses token_embd as the output matrix
        out.append(("output.weight", model.lm_head.weight))
    return [(name, t.detach().float().contiguous()) for name, t in out]


# -----------------------------------------------------------------------------
# Tokenizer


def tokenizer_metadata(model_dir: str):
    """Tokens, token types and merges from tokenizer.json; special ids and chat template from the HF tokenizer."""
    import gguf  # optional (pip install gguf): only this script needs it, and the tests skip without it

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{model_dir}: a {spec['model']['type']} tokenizer; this script writes byte-level BPE only")
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for token, idx in vocab.items():
        tokens[idx] = token
        if token in added:
            types[idx] = gguf.TokenType.CONTROL if added[token].get("special") else gguf.TokenType.USER_DEFINED
        else:
            types[idx] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tok, tokens, types, merges


# -----------------------------------------------------------------------------
# ollama's Modelfile

# ChatML in ollama's Go template language: every message (ollama puts the Modelfile's SYSTEM in front as a system
# message when the chat has none) as <|im_start|>role\ncontent<|im_end|>\n, then the assistant header: the prompt
# our chat template (trainer/train_tokenizer.py) writes for a conversation without tools.
OLLAMA_TEMPLATE = (
    "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def ollama_modelfile(gguf_path: str, tokenizer, context: int) -> str:
    """The Modelfile text for gguf_path (FROM is relative: the two files stay side by side): the template, a stop
    line per stop token (end of turn and EOS, the ids model/hub.py stop_token_ids gives), num_ctx = the model's
    context (ollama's default would run past the positions the model was trained on) and the chat sampling
    defaults of model/engine.py."""
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    lines = [f"FROM ./{os.path.basename(gguf_path)}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [
        f"PARAMETER num_ctx {context}",
        f"PARAMETER temperature {CHAT_SAMPLING.temperature:g}",
        f"PARAMETER top_p {CHAT_SAMPLING.top_p:g}",
    ]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: str) -> str:
    """m-f16.gguf -> m-f16.Modelfile: one per exported file, so a q4_0 export beside an f16 one overwrites nothing."""
    return os.path.splitext(gguf_path)[0] + ".Modelfile"


# -----------------------------------------------------------------------------
# The file


GGUF_TYPES = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # what the gguf package can write


def export_gguf(model_dir: str, out_path: str, dtype: str = "f16") -> str:
    import gguf  # optional, as in tokenizer_metadata

    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_TYPES)}, got '{dtype}'")
    file_type, qtype = (
        getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}"),
        getattr(gguf.GGMLQuantizationType, dtype.upper()),
    )
    src = load_pretrained(model_dir)
    cfg = src.config
    if getattr(cfg, "use_moe", False):
        raise ValueError(
            "this checkpoint uses mixture-of-experts layers; GGUF export supports dense models only "
            "(our MoE's ungated shared experts match no llama.cpp architecture). Distill it into a "
            "dense model first: python main.py --stage distill teacher_from=" + model_dir
        )
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise ValueError(f"{model_dir} has no tokenizer.json: a GGUF file must carry its tokenizer")
    tok, tokens, types, merges = tokenizer_metadata(model_dir)
    if len(tokens) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens, the model's vocab_size is {cfg.vocab_size}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]  # rows the tokenizer never emits
    types += [gguf.TokenType.UNUSED] * (cfg.vocab_size - len(types))

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_name(os.path.basename(os.path.normpath(model_dir)))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    # --- tokenizer ---
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("qwen2")  # our pre-tokenizer regex is Qwen2's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_bos_token_id(tok.eos_token_id)  # llama.cpp wants one; it is never added (add_bos_token false)
    writer.add_add_bos_token(False)  # we train without BOS
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tok.unk_token_id:
        writer.add_eot_token_id(end_of_turn)  # chat front-ends stop at the end of the assistant's turn
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    # --- weights ---
    block = gguf.GGML_QUANT_SIZES[qtype][0]  # values per quantization block (32 for every q type here)
    for name, t in gguf_tensors(src):
        data = t.numpy()
        if data.ndim == 1:  # norms: float32, as llama.cpp's converter keeps them
            writer.add_tensor(name, data.astype(np.float32))
        elif dtype != "f16" and data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:  # f16, or a row length the blocks cannot tile (llama.cpp falls back the same way)
            writer.add_tensor(name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(modelfile_path(out_path), "w", encoding="utf-8") as f:
        f.write(ollama_modelfile(out_path, tok, cfg.max_position_embeddings))
    return out_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SLM checkpoint directory (e.g. out/sft/final)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--dtype", default="f16", choices=GGUF_TYPES, help="weight type of the matrices")
    args = parser.parse_args()
    try:
        with whole_output(args.out, "the GGUF file"):  # a full disk: no cut export left behind
            export_gguf(args.model, args.out, args.dtype)
    except ImportError:
        print("error: the gguf package is missing: pip install gguf", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB): llama-cli -m {args.out} -cnv")
    name = os.path.splitext(os.path.basename(args.out))[0]
    print(f"wrote {modelfile_path(args.out)}: ollama create {name} -f {modelfile_path(args.out)} && ollama run {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
