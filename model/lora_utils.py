"""
Merge a PEFT-format LoRA adapter into a model's base weights: W += (lora_alpha / r) * B @ A.

After the merge the model is a plain model again, so inference pays nothing per token for LoRA. Used by
model/engine.py (Engine.from_pretrained(path, adapter=DIR)) and reusable by the LoRA stage:
    from model.lora_utils import merge_lora_weights
    merge_lora_weights(model, "out/lora/run1/final")   # reads adapter_config.json + adapter_model.safetensors
"""

import json
import math
import os

import torch
from safetensors.torch import load_file

# -----------------------------------------------------------------------------


def _module_name(key: str) -> tuple[str, str]:
    """PEFT key -> (module path in our model, "A" or "B").

    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A');
    an in-memory state dict also carries the adapter name ('lora_A.default.weight')."""
    name = key.removeprefix("base_model.model.")
    head, _, tail = name.partition(".lora_")
    return head, tail[0]


@torch.no_grad()
def merge_lora_weights(model: torch.nn.Module, adapter_dir: str) -> int:
    """Add each adapter's (scale * B @ A) into the matching nn.Linear weight, in place; returns how many merged.

    scale is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Keys that match no module raise, so an
    adapter made for another architecture fails loudly instead of silently doing nothing."""
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    fan_in_fan_out = cfg.get("fan_in_fan_out", False)  # GPT-2 Conv1D layout stores W transposed
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if ".lora_A" in key or ".lora_B" in key:
            name, which = _module_name(key)
            pairs.setdefault(name, {})[which] = tensor
    modules = dict(model.named_modules())
    for name, ab in pairs.items():
        if name not in modules or "A" not in ab or "B" not in ab:
            raise KeyError(f"LoRA weights for '{name}' do not match a linear layer of this model (or lack A/B)")
        weight = modules[name].weight
        delta = scale * (ab["B"].float() @ ab["A"].float())  # (out, r) @ (r, in) -> (out, in), in fp32
        if fan_in_fan_out:
            delta = delta.T
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return len(pairs)


__all__ = ["merge_lora_weights"]
