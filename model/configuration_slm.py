"""
SLMConfig: the hyper-parameters of Milli-Chat's decoder, in Hugging Face form.

Field names follow transformers' LlamaConfig so that a dense SLM checkpoint is a Llama checkpoint:
slm_to_llama_config() gives the equivalent LlamaConfig (scripts/export_llama.py writes it next to the unchanged
weights). Presets live in config/model/*.json:
    from model import SLMConfig
    cfg = SLMConfig.from_preset("small", max_position_embeddings=1024)  # or a JSON path; keyword overrides
from_preset refuses a misspelled key; transformers' from_json_file would keep `hiden_size` as a stray attribute.
"""

import dataclasses
import json
import os

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, PreTrainedConfig


@strict(accept_kwargs=True)
class SLMConfig(PreTrainedConfig):
    model_type = "slm"
    keys_to_ignore_at_inference = ["cache"]

    # --- transformer shape ------------------------------------------------------------------------
    vocab_size: int = 6400  # token ids; the tokenizer stage's default vocabulary
    hidden_size: int = 512  # residual stream width
    intermediate_size: int | None = None  # SwiGLU width; None = 8/3 * hidden rounded up to a multiple of 64
    num_hidden_layers: int = 8  # decoder blocks
    num_attention_heads: int = 8  # query heads
    num_key_value_heads: int | None = None  # key/value heads (GQA); None = num_attention_heads (plain MHA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    hidden_act: str = "silu"  # SwiGLU gate activation (Llama's)
    max_position_embeddings: int = 1024  # longest sequence the model is trained for
    rope_theta: float = 1e6  # RoPE base; large bases extrapolate better to longer contexts
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = True  # share embed_tokens and lm_head (saves vocab * hidden params)
    attention_bias: bool = False  # Llama has no biases in the projections
    attention_dropout: float = 0.0  # dropout on attention probabilities (training only)
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights
    residual_init: str = "scaled"  # o_proj/down_proj (they write into the residual stream): "scaled" = normal with
    #                                std / sqrt(2 * layers) (GPT-2) | "zero" = zeros (modded-nanogpt); init only
    use_cache: bool = True  # generate() keeps a KV cache
    # --- special tokens (ids fixed by trainer/train_tokenizer.py) --------------------------------
    bos_token_id: int | None = None  # no BOS: documents are separated by <|endoftext|>
    eos_token_id: int | list[int] | None = 0  # <|endoftext|>
    pad_token_id: int | None = 3  # <|pad|>
    # --- mixture of experts (off by default; the dense path is untouched when off) ----------------
    use_moe: bool = False  # replace every block's MLP by a routed MoE
    num_experts: int = 4  # routed experts per MoE layer
    num_experts_per_tok: int = 2  # experts each token is sent to (top-k)
    num_shared_experts: int = 1  # experts every token always uses (DeepSeek-style)
    moe_intermediate_size: int | None = None  # width of one expert; None = intermediate_size
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss added to the LM loss

    def __post_init__(self, **kwargs):
        # Derived values are computed here and only here.
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * ((int(8 * self.hidden_size / 3) + 63) // 64)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self._check_shapes()
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "SLMConfig":
        """Load a preset JSON (a path, or a name in config/model/) strictly: a misspelled key is an error,
        not a silently ignored attribute."""
        path = preset
        if not os.path.isfile(path):
            path = os.path.join(
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "model", f"{preset}.json"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model preset '{preset}' not found (a JSON path or a name in config/model/)")
        with open(path, encoding="utf-8") as f:
            values = {**json.load(f), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown model config key(s) {unknown}")
        return cls(**values)

    def _check_shapes(self):
        """Reject shapes the model cannot build, with a plain ValueError that says why."""
        if self.residual_init not in ("scaled", "zero"):
            raise ValueError(f"residual_init must be 'scaled' or 'zero', got {self.residual_init!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads}): each kv head serves a whole group of query heads"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts "
                f"({self.num_experts})"
            )


def slm_to_llama_config(cfg: SLMConfig) -> LlamaConfig:
    """The LlamaConfig of the same model: a dense SLM checkpoint loads into LlamaForCausalLM key for key.
    MoE has no Llama equivalent and is refused with a ValueError that says what to do instead."""
    if cfg.use_moe:
        raise ValueError(
            "this checkpoint uses mixture-of-experts layers, which the Llama architecture does not "
            "have; export a dense model (use_moe=false), or distill the MoE model into one first"
        )
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=False,
        attention_dropout=cfg.attention_dropout,
        initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


__all__ = ["SLMConfig", "slm_to_llama_config"]
