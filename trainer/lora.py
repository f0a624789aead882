"""
LoRA fine-tuning on chat data: the base model stays frozen, small low-rank adapters learn the task.

    python main.py --stage lora --config config/lora.yaml
    python main.py --stage lora --config config/lora.yaml lora_r=8 lora_targets=q_proj,v_proj
    python scripts/merge_lora.py --model out/pretrain/final --adapter out/lora/final --out out/lora_merged

Each targeted nn.Linear y = W x becomes y = W x + scale * B A dropout(x), scale = lora_alpha / r (or
lora_alpha / sqrt(r) with lora_rslora=true), with A (r, in) drawn like PEFT (Kaiming-uniform) and B (out, r) zero,
so training starts exactly at the base model. The embedding rows of lora_trainable_tokens (the chat markers
<|im_start|> and <|im_end|>, which pretraining never saw) train whole, in a parameter of their own, and a tied head
uses the same rows: a low-rank update of the layers cannot give an unseen token a useful vector, so without them
the adapted model answers but never ends its turn. Only A, B and those rows have requires_grad, so the core's
optimizer (built from trainable_parameters()) sees only them, all on AdamW.

Data and loss are SFT's (trainer/sft.py): this file adds only the adapters and what a checkpoint holds. The layer
and PEFT's on-disk format (adapter_config.json + adapter_model.safetensors) are model/lora.py's, the same code the
engine merges with, so peft.PeftModel.from_pretrained, vLLM and other servers that take PEFT adapters load what
this stage saves. step_*/ and final/ hold the adapter (+ tokenizer), not the base weights: the base is init_from,
unchanged bit for bit, and resume re-reads it from there.
"""

import os
from dataclasses import dataclass

import torch

from model.hub import make_readable
from model.lora import (
    add_lora,
    add_trainable_tokens,
    load_adapter_weights,
    lora_scaling,
    read_adapter_weights,
    save_adapter,
)
from trainer.checkpoint import Parts
from trainer.common import print0
from trainer.config import above, at_least, between, setting
from trainer.core import run_trainer
from trainer.sft import Config as SFTConfig
from trainer.sft import SFTTrainer


@dataclass
class Config(SFTConfig):
    out_dir: str = "out/lora"
    lr: float = 5e-4  # adapters start at zero and are small (not swept; full SFT's sweep: bench/RESULTS.md)
    weight_decay: float = 0.0  # decaying A and B pulls the update towards zero, i.e. towards the base model
    lora_r: int = setting(16, bound=at_least(1))  # rank of each adapter
    # the update is scaled by lora_alpha / lora_r (lora_alpha / sqrt(lora_r) with rsLoRA)
    lora_alpha: float = setting(32.0, bound=above(0))
    lora_rslora: bool = False  # rank-stabilized LoRA: scale by alpha / sqrt(r), so a larger r is not a smaller update
    lora_dropout: float = setting(0.05, bound=between(0, 1, high_open=True))  # on the adapter's input (training only)
    # Every attention and MLP projection (k/v included under GQA); MoE experts' projections match too.
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # Tokens whose embedding rows (and head rows) train whole, PEFT's trainable_token_indices; "" = none.
    lora_trainable_tokens: str = setting(
        "<|im_start|>,<|im_end|>", unchecked="comma-separated tokens; one the tokenizer lacks is named at setup"
    )

    @property
    def targets(self) -> list[str]:
        """lora_targets as module names: what the adapters wrap, and what adapter_config.json lists."""
        return [t for t in self.lora_targets.split(",") if t]

    @property
    def trainable_tokens(self) -> list[str]:
        """lora_trainable_tokens as a list of tokens (each one row of the vocabulary)."""
        return [t for t in self.lora_trainable_tokens.split(",") if t]


# -----------------------------------------------------------------------------
# The stage: SFT's data and loss, adapters instead of full weights


class AdapterWeights:
    """LoRA's checkpoints hold the adapter, not the (unchanged) base weights: PEFT's format (model/lora.py), read
    back onto the live model at resume (the Trainer's `weights`; checkpoint.ModelWeights is the whole-model one)."""

    def save(self, parts: Parts, *, path: str, dtype: torch.dtype | None = None, state: dict | None = None) -> None:
        cfg = parts.cfg  # only the adapters, read from the live model (LoRA never runs sharded: `state` unused)
        # An absolute base path (a hub-style name stays as it is), so PEFT finds the base from any working directory.
        base = os.path.abspath(cfg.init_from) if os.path.isdir(cfg.init_from) else cfg.init_from
        save_adapter(
            parts.model,
            path,
            base,
            cfg.targets,
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.lora_rslora,
        )
        parts.tokenizer.save_pretrained(path)
        make_readable(path)

    def read(self, path: str) -> dict:
        return read_adapter_weights(path)

    def load(self, parts: Parts, *, path: str, weights: dict) -> None:
        load_adapter_weights(parts.model, weights, path)

    def final_note(self, path: str) -> str:
        return " (an adapter: merge it with scripts/merge_lora.py before using it as a stage's init_from)"


class LoRATrainer(SFTTrainer):
    stage = "lora"
    supports_fsdp = False  # LoRA exists to fit one GPU; adapters over a sharded base are not built
    weights = AdapterWeights()

    def setup(self):
        cfg = self.cfg
        if not cfg.init_from:
            raise ValueError("LoRA needs init_from: the base model the adapter is trained on (and saved against)")
        n_base = sum(p.numel() for p in self.raw_model.parameters())
        base_bytes = sum(p.numel() * p.element_size() for p in self.raw_model.parameters())
        wrapped = add_lora(self.raw_model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_rslora)
        token_ids = vocabulary_ids(self.tokenizer, cfg.trainable_tokens)
        with_rows = add_trainable_tokens(self.raw_model, token_ids)
        if cfg.gradient_checkpointing:
            # Recomputed blocks need an input that requires grad, which frozen embeddings (no trained rows) lack.
            self.raw_model.enable_input_require_grads()
        n_train = sum(p.numel() for p in self.trainable_parameters())
        # Training memory of the trainable part: fp32 weight + grad + AdamW's two moments = 16 bytes/param.
        scaling = lora_scaling(cfg.lora_r, cfg.lora_alpha, cfg.lora_rslora)
        print0(
            f"[lora] {len(wrapped)} adapters (r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, "
            f"{'rsLoRA ' if cfg.lora_rslora else ''}scaling {scaling:g}) on {','.join(cfg.targets)}: "
            f"{n_train:,} trainable parameters = {100 * n_train / n_base:.2f}% of {n_base:,}"
        )
        if with_rows:
            print0(
                f"[lora] {cfg.lora_trainable_tokens} (ids {token_ids}): "
                f"rows trained in the {' and the '.join(with_rows)}"
            )
        print0(
            f"[lora] memory: frozen base {base_bytes / 2**20:,.1f} MiB + adapter training state "
            f"{16 * n_train / 2**20:,.1f} MiB (full fine-tuning would need {16 * n_base / 2**20:,.1f} MiB "
            f"for weights, grads and AdamW)"
        )


def vocabulary_ids(tokenizer, tokens: list[str]) -> list[int]:
    """The ids of whole tokens of the vocabulary (a string that the tokenizer would split has no single row)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(f"lora_trainable_tokens: {missing} are not tokens of the tokenizer (one row each is trained)")
    return [vocab[t] for t in tokens]


def run(cfg: Config):
    trainer = run_trainer(LoRATrainer, cfg)
    final = os.path.join(cfg.out_dir, "final")
    print0(
        f"[lora] the adapter in {final} loads with peft or Engine.from_pretrained('{final}'); for a full "
        f"model: python scripts/merge_lora.py --model {cfg.init_from} --adapter {final} --out DIR"
    )
    return trainer
