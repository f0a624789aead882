"""
LoRA fine-tuning on chat data: the base model stays frozen, small low-rank adapters learn the task.

    python main.py --stage lora --config config/lora.yaml
    python main.py --stage lora --config config/lora.yaml lora_r=8 lora_targets=q_proj,v_proj
    python scripts/merge_lora.py --model out/pretrain/final --adapter out/lora/final --out out/lora_merged

Each targeted nn.Linear y = W x becomes y = W x + (lora_alpha / r) * B A dropout(x), with A (r, in) drawn like
PEFT (Kaiming-uniform) and B (out, r) zero, so training starts exactly at the base model. Only A and B have
requires_grad, so the core's optimizer (built from trainable_parameters()) sees only them.

Data and loss are SFT's (trainer/sft.py): this file adds only the adapters and what a checkpoint holds. Written
by hand (no peft at run time), but saved in PEFT's format: adapter_config.json + adapter_model.safetensors with
PEFT's key names (base_model.model.<module>.lora_A.weight), so peft.PeftModel.from_pretrained, vLLM and other
servers that take PEFT adapters load it. step_*/ and final/ hold the adapter (+ tokenizer), not the base weights:
the base is init_from, unchanged bit for bit, and resume re-reads it from there.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from trainer.common import print0
from trainer.core import run_trainer
from trainer.sft import Config as SFTConfig
from trainer.sft import SFTTrainer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> our model: the prefix PEFT writes in front of keys


@dataclass
class Config(SFTConfig):
    out_dir: str = "out/lora"
    lr: float = 5e-4  # adapters start at zero and are small: LoRA takes ~10x full fine-tuning's rate
    weight_decay: float = 0.0  # decaying A and B pulls the update towards zero, i.e. towards the base model
    lora_r: int = 16  # rank of each adapter
    lora_alpha: float = 32.0  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05  # dropout on the adapter's input (training only)
    # Every attention and MLP projection (k/v included under GQA); MoE experts' projections match too.
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# -----------------------------------------------------------------------------
# The adapter layer and how it is put into a model


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Attribute names are PEFT's (base_layer, lora_A,
    lora_B), so our parameter names are PEFT's saved keys minus its prefix."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        # PEFT's default init: A like nn.Linear, B zero -> the update B A is zero at step 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def add_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float) -> list[str]:
    """Freeze the whole model, then wrap every nn.Linear whose last name is in targets (PEFT's matching of a
    target list). Returns the wrapped module names; a target that matches nothing is an error."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    unmatched = set(targets) - {n.rsplit(".", 1)[-1] for n in names}
    if unmatched:
        raise ValueError(f"lora_targets {sorted(unmatched)} match no linear layer of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's saved key names."""
    return {PEFT_PREFIX + name: p.detach().float().cpu().contiguous()
            for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def save_adapter(model: nn.Module, path: str, base_model: str, targets: list[str], r: int, alpha: float,
                 dropout: float) -> None:
    """adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes them (fp32: the
    adapter is small, and fp32 keeps the resumed run bit-exact)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
              "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
              "revision": None}
    with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(adapter_state_dict(model), os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy PEFT-keyed adapter weights into a model that already has the adapters; every key must match."""
    params = dict(model.named_parameters())
    mine = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    theirs = {k.removeprefix(PEFT_PREFIX).replace(".default.", ".") for k in weights}
    if mine != theirs:
        raise ValueError(f"{where}: adapter does not match the model (missing {sorted(mine - theirs)[:3]}, "
                         f"unexpected {sorted(theirs - mine)[:3]})")
    with torch.no_grad():
        for key, value in weights.items():
            params[key.removeprefix(PEFT_PREFIX).replace(".default.", ".")].copy_(value)


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Our loading path: add the adapters that adapter_config.json describes and load their weights (eval-ready,
    unmerged). To fold them into the base weights instead, use model.lora_utils.merge_lora_weights."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: DoRA, rsLoRA and per-layer ranks are not supported here")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    add_lora(model, targets, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    load_adapter_weights(model, load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS)), adapter_dir)
    return model


# -----------------------------------------------------------------------------
# The stage: SFT's data and loss, adapters instead of full weights


class LoRATrainer(SFTTrainer):
    stage = "lora"
    supports_fsdp = False  # LoRA exists to fit one GPU; adapters over a sharded base are not built

    def setup(self):
        cfg = self.cfg
        if not cfg.init_from:
            raise ValueError("LoRA needs init_from: the base model the adapter is trained on (and saved against)")
        self.targets = [t for t in cfg.lora_targets.split(",") if t]
        n_base = sum(p.numel() for p in self.raw_model.parameters())
        base_bytes = sum(p.numel() * p.element_size() for p in self.raw_model.parameters())
        wrapped = add_lora(self.raw_model, self.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        if cfg.gradient_checkpointing:
            # Recomputed blocks need an input that requires grad, and the frozen embeddings give none.
            self.raw_model.enable_input_require_grads()
        n_train = sum(p.numel() for p in self.trainable_parameters())
        # Training memory of the trainable part: fp32 weight + grad + AdamW's two moments = 16 bytes/param.
        print0(f"[lora] {len(wrapped)} adapters (r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, scaling "
               f"{cfg.lora_alpha / cfg.lora_r:g}) on {','.join(self.targets)}: {n_train:,} trainable parameters = "
               f"{100 * n_train / n_base:.2f}% of {n_base:,}")
        print0(f"[lora] memory: frozen base {base_bytes / 2**20:,.1f} MiB + adapter training state "
               f"{16 * n_train / 2**20:,.1f} MiB (full fine-tuning would need {16 * n_base / 2**20:,.1f} MiB "
               f"for weights, grads and AdamW)")

    # ---- checkpoints hold the adapter, not the (unchanged) base weights ----------------------------------
    def save_pretrained_to(self, *, path: str, dtype: torch.dtype | None = None, state: dict | None = None) -> None:
        cfg = self.cfg  # only the adapters, read from the live model (LoRA never runs sharded, so `state` is unused)
        save_adapter(self.raw_model, path, cfg.init_from, self.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        self.tokenizer.save_pretrained(path)

    def read_checkpoint_weights(self, *, path: str) -> dict:
        from safetensors.torch import load_file

        return load_file(os.path.join(path, ADAPTER_WEIGHTS))

    def load_checkpoint_weights(self, *, path: str, weights: dict) -> None:
        load_adapter_weights(self.raw_model, weights, path)

    def next_stage_hint(self, *, path: str) -> str:
        return " (an adapter: merge it with scripts/merge_lora.py before using it as a stage's init_from)"


def run(cfg: Config):
    trainer = run_trainer(LoRATrainer, cfg)
    final = os.path.join(cfg.out_dir, "final")
    print0(f"[lora] the adapter in {final} loads with peft or Engine.from_pretrained('{final}'); for a full "
           f"model: python scripts/merge_lora.py --model {cfg.init_from} --adapter {final} --out DIR")
    return trainer
