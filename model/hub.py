"""
What makes a saved folder usable by any Hugging Face tool as it is, outside this repository:

- weights (+ config) and tokenizer that from_pretrained alone loads (save_pretrained: one copy of a tied matrix, the
  class name FSDP's wrapper would hide);
- generation defaults that stop a chat model: `generation_config.json` lists both <|endoftext|> and <|im_end|> as
  eos, so transformers' generate(), pipeline("text-generation") and TextIteratorStreamer end at the end of the turn;
- the model's own code beside the weights plus `auto_map` in config.json (model/__init__.py registers the classes
  for it), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `lm_eval --model hf` load it
  from anywhere;
- file modes other accounts can read (a docker or ollama service user): safetensors writes its files 0600;
- a model card (README.md) saying what the model is, how it was trained, its eval numbers when known, and the
  license fields of the data it saw (passed in: dataset/licenses.py reads them from the data and from base cards);
  write_stage_card writes the card of a training stage's final/ from its config and the run's facts.
"""

import json
import os
import re
import stat

import torch

from model.lora import is_adapter_dir
from model.runtime import dtype_name

END_OF_TURN = "<|im_end|>"


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """EOS, the end-of-turn token and the config's own eos ids: every id at which a reply ends."""
    stops = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stops.add(end_of_turn)
    eos = getattr(model_config, "eos_token_id", None)
    stops.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in stops if i is not None)


def set_generation_defaults(model, tokenizer) -> None:
    """Stop ids and the pad id into model.generation_config, which save_pretrained writes (reward models and
    critics do not generate and have none)."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    gen.eos_token_id = stop_token_ids(tokenizer, model.config)
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def save_pretrained(
    model,
    tokenizer,
    path: str,
    *,
    state: dict | None = None,
    dtype: torch.dtype | None = None,
    architecture: str | None = None,
) -> None:
    """Weights (+ config) and the tokenizer into `path`, loadable with from_pretrained alone. `model` is the bare
    model, never a compiled/DDP wrapper (no `_orig_mod.` / `module.` prefixes); `state` is the full state dict
    (trainer/checkpoint.py full_model_state) where the model is sharded; `architecture` names the class when
    `model` is FSDP's wrapper subclass, whose name save_pretrained would write instead."""
    if state is None:
        state = model.state_dict()
    if model.config.tie_word_embeddings:  # one copy of a tied matrix (a gathered or cast state has two)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        state = {k: v for k, v in state.items() if k not in tied}
    if dtype is not None and dtype != torch.float32:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.save_pretrained(path, state_dict=state)
    if architecture is not None:
        model.config.architectures = [architecture]
        model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_readable(path: str) -> None:
    """Give every file in `path` the mode a plain file gets under the user's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full) and stat.S_IMODE(os.stat(full).st_mode) != mode:
            os.chmod(full, mode)


# -----------------------------------------------------------------------------
# The model card


def _parameters(config) -> str:
    """A rough parameter count from the config (the card is written without the model in hand)."""
    h, n_layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    attn = h * config.num_attention_heads * config.head_dim * 2 + h * kv * 2
    if getattr(config, "use_moe", False):
        mlp = 3 * h * config.moe_intermediate_size * (config.num_experts + config.num_shared_experts)
    else:
        mlp = 3 * h * config.intermediate_size
    total = n_layers * (attn + mlp) + vocab * h * (1 if config.tie_word_embeddings else 2)
    return f"{total / 1e6:.1f}M"


CARD_LICENSES_KEY = "training_data_licenses"  # front matter key: what the next stage's card carries forward


def is_hub_id(name: str) -> bool:
    """`owner/name` that is no local path: what the Hub's `base_model:` field expects."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not os.path.exists(name) and not name.startswith(".")


def publish_lines(path: str) -> list[str]:
    """The card's "Publish" section: the commands that upload this folder to the Hugging Face Hub (directly, or
    through the hf-mirror.com endpoint from mainland China) and to ModelScope. <your-name> is the one blank left."""
    path = os.path.normpath(path).removesuffix(".tmp")  # trainer/checkpoint.py writes final/ as final.tmp, renamed
    repo = f"<your-name>/{_repo_name(path)}"
    return [
        "## Publish",
        "",
        "```bash",
        "# Hugging Face Hub (huggingface_hub >= 0.34 also names the command `hf upload`)",
        'pip install -U "huggingface_hub[cli]" && huggingface-cli login',
        f"huggingface-cli upload {repo} {path} .",
        "# the same through the mirror, from mainland China",
        f"HF_ENDPOINT=https://hf-mirror.com huggingface-cli upload {repo} {path} .",
        "# ModelScope (an SDK token from modelscope.cn/my/myaccesstoken)",
        "pip install -U modelscope && modelscope login --token <your-token>",
        f"modelscope upload {repo} {path}",
        "```",
        "",
    ]


def _repo_name(path: str) -> str:
    """A Hub repo name for a checkpoint folder: out/sft/final -> milli-chat-sft (a stage's final/ or step_N/ says
    little), any other folder keeps its own name."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    name = parts[-1]
    if (name == "final" or name.startswith("step_")) and len(parts) > 1:
        name = f"milli-chat-{parts[-2]}"
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "milli-chat"


def write_model_card(
    path: str,
    *,
    config,
    stage: str,
    training: dict,
    evaluation: dict | None = None,
    licenses: list[str] | None = None,
    base_model: str = "",
    library_name: str = "transformers",
) -> str:
    """README.md in `path`: YAML front matter for the Hub, then what the model is, how it was trained, eval numbers,
    the data licenses known, and how to load it. `training` holds plain facts (steps, tokens, data, lr...).
    `base_model` (init_from) goes into the front matter only as a Hub id, which is what the Hub reads there; a local
    path is named in the text instead. `library_name` is what loads the folder: "peft" for an adapter."""
    licenses = licenses or []
    front = [
        "---",
        f"library_name: {library_name}",
        "pipeline_tag: text-generation",
        "tags: [milli-chat, chinese, llama-like]",
        "language: [zh, en]",
    ]
    if is_hub_id(base_model):
        front.append(f"base_model: {base_model}")
    front.append("license: other  # set this to what your data allows (see 'Data' below)")
    if licenses:  # JSON is YAML flow syntax: any license text stays one safely quoted item
        front.append(f"{CARD_LICENSES_KEY}: {json.dumps(licenses, ensure_ascii=False)}")
    front.append("---")
    arch = (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} query / "
        f"{config.num_key_value_heads} key-value heads, vocab {config.vocab_size}, context "
        f"{config.max_position_embeddings}, RoPE theta {config.rope_theta:g}"
        + (f", mixture of {config.num_experts} experts" if getattr(config, "use_moe", False) else "")
    )
    lines = front + [
        "",
        f"# {os.path.basename(os.path.normpath(path))}",
        "",
        f"A Milli-Chat model (~{_parameters(config)} parameters, a Llama-style decoder: RMSNorm, RoPE, grouped-query "
        f"attention, SwiGLU), the output of the `{stage}` stage"
        + (f", started from the local checkpoint `{base_model}`." if base_model and not is_hub_id(base_model) else "."),
        "",
        f"Architecture: {arch}.",
        "",
        "## Training",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in training.items()]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += [
            f"- {key}: {value:.4f}" if isinstance(value, float) else f"- {key}: {value}"
            for key, value in evaluation.items()
        ]
    else:
        lines.append("Not evaluated yet: `python main.py --stage eval init_from=<this folder>`.")
    lines += ["", "## Data", ""]
    if licenses:
        lines.append(
            "Licenses recorded for the training data: " + "; ".join(licenses) + ". The model's own license "
            "must respect them (share-alike and non-commercial terms carry over)."
        )
    else:
        lines.append(
            "No license fields were recorded for the data this stage saw: check the licenses of your sources "
            "before you publish the model."
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "."  # this folder: run from inside it, or put its path or Hub id here',  # true wherever it moves
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # code ships in the folder",
        'inputs = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,',
        '                                 return_tensors="pt", return_dict=True)',
        'reply = model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:]',
        "print(tok.decode(reply, skip_special_tokens=True))",
        "```",
        "",
        "Or export a stock Llama folder (`scripts/export_llama.py`) or GGUF (`scripts/export_gguf.py`, which writes "
        "an ollama Modelfile beside the file).",
        "",
    ]
    lines += publish_lines(path)
    card = os.path.join(path, "README.md")
    with open(card, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return card


def write_stage_card(
    path: str,
    cfg,
    *,
    stage: str,
    step: int,
    tokens_seen: int,
    global_batch: int,
    dtype: torch.dtype,
    world_size: int,
    model_config,
    evaluation: dict | None,
    licenses: list[str],
) -> None:
    """README.md in `path` (write_model_card) for a training stage's output, readable by other accounts: the facts of
    the run, and of `cfg` (the stage's trainer/config.py TrainConfig: batch, optimizer, schedule, data, init_from).
    `licenses` are the data's (trainer/checkpoint.py export gathers them with dataset/licenses.py)."""
    data = getattr(cfg, "data_dir", "") or getattr(cfg, "data_path", "")  # the stage's data mixins
    training = {
        "stage": stage,
        "optimizer steps": step,
        "tokens seen": f"{tokens_seen:,}",
        "global batch": f"{global_batch} {cfg.batch_unit} x {cfg.seq_len} tokens",
        "peak lr": cfg.lr,
        "optimizer": cfg.optimizer,
        "schedule": f"{cfg.lr_schedule}, {cfg.warmup_steps} warmup steps",
        "data": data or "(see the stage config)",
        "compute dtype": dtype_name(dtype),
        "processes": world_size,
    }
    write_model_card(
        path,
        config=model_config,
        stage=stage,
        training=training,
        evaluation=evaluation or None,
        licenses=sorted(set(licenses)),
        base_model=cfg.init_from,
        library_name="peft" if is_adapter_dir(path) else "transformers",  # the Hub's loader for the folder
    )
    make_readable(path)
