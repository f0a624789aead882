"""
Print the model presets (config/model/*.json) as a Markdown table with exact parameter counts.

    python scripts/model_summary.py

The presets table of README.md and README_en.md is this script's output (tests/test_readme.py checks that they agree).
"""

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402

from model import SLMConfig, SLMForCausalLM  # noqa: E402

ORDER = ["tiny", "small", "moe", "base"]


def preset_rows() -> list[str]:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "model")
    names = sorted(
        (os.path.basename(p)[:-5] for p in glob.glob(os.path.join(root, "*.json"))),
        key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n),
    )
    rows = [
        "| preset | parameters | active / token | vocab | hidden | layers | heads (q/kv) | MLP | context |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cfg = SLMConfig.from_preset(name)
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = SLMForCausalLM(cfg)
        total = sum(p.numel() for p in model.parameters())
        active = total
        mlp = f"SwiGLU {cfg.intermediate_size}"
        if cfg.use_moe:
            idle = cfg.num_experts - cfg.num_experts_per_tok
            active -= cfg.num_hidden_layers * idle * 3 * cfg.hidden_size * cfg.moe_intermediate_size
            mlp = (
                f"MoE {cfg.num_experts}x{cfg.moe_intermediate_size} top-{cfg.num_experts_per_tok}"
                f" + {cfg.num_shared_experts} shared"
            )
        rows.append(
            f"| `{name}` | {total:,} | {active:,} | {cfg.vocab_size} | {cfg.hidden_size} | "
            f"{cfg.num_hidden_layers} | {cfg.num_attention_heads}/{cfg.num_key_value_heads} | {mlp} | "
            f"{cfg.max_position_embeddings} |"
        )
    return rows


if __name__ == "__main__":
    print("\n".join(preset_rows()))
