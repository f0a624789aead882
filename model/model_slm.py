"""
Milli-Chat's decoder: a Llama-style transformer, optionally with a mixture-of-experts MLP.

Read top to bottom: RMSNorm -> RoPE -> Attention -> MLP / MoE -> Block -> SLMModel -> SLMForCausalLM
-> SLMForSequenceClassification. Module and parameter names are Llama's (model.embed_tokens,
model.layers.N.self_attn.q_proj, mlp.gate_proj, input_layernorm, model.norm, lm_head), so with MoE off a
checkpoint is a Llama checkpoint (scripts/export_llama.py only rewrites config.json).

    from model import SLMConfig, SLMForCausalLM
    model = SLMForCausalLM(SLMConfig.from_preset("tiny"))  # config/model/tiny.json, strictly read
    out = model(input_ids, labels=input_ids)       # out.loss, out.logits, out.aux_loss
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from transformers.utils import logging

from .attention import (
    AttentionPlan,
    attend,
    attention_plan,
    device_capability,
    document_block_mask,
    document_mask,
    flex_attention_available,
)
from .configuration_slm import SLMConfig

logger = logging.get_logger(__name__)


# -----------------------------------------------------------------------------
# Normalisation and rotary position embeddings


class SLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too many bits otherwise. F.rms_norm is
        # x * rsqrt(mean(x^2) + eps) as one op (bit-identical on the CPU), not five: 17 norms per decode step.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed.to(x.dtype)


class SLMRotaryEmbedding(nn.Module):
    """Llama's RoPE (rotate-half layout). Returns cos/sin for given positions; no length limit is baked in."""

    def __init__(self, config: SLMConfig):
        super().__init__()
        self.config = config
        self.rope_type = "default"  # read by transformers' _init_weights-style code; we re-init ourselves
        inv_freq = self.compute_inv_freq(config)
        # Not persistent: derived from the config, so it is recomputed (see _init_weights) rather than saved.
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: SLMConfig) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> freqs (B, T, hd/2) -> cos, sin (B, T, hd), computed in fp32
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        # Under autocast, in the dtype the projections give q and k: cast once here, not in every layer.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    # q, k (B, heads, T, hd); cos, sin (B, T, hd) -> broadcast over heads. cos/sin take q's dtype (already theirs
    # from SLMRotaryEmbedding under autocast, where fp32 cos/sin would turn q and k fp32 beside a bf16 v, and
    # FlexAttention of torch 2.9 refuses that: "query, key, and value ... same dtype").
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# -----------------------------------------------------------------------------
# Attention


class SLMAttention(nn.Module):
    """Grouped-query attention; model/attention.py plans the kernel (flash, memory-efficient, FlexAttention)."""

    def __init__(self, config: SLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self, x, position_embeddings, attention_mask=None, cache: Cache | None = None, plan: AttentionPlan | None = None
    ):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, T_past + T, hd), or the static cache length
        dropout = self.attention_dropout if self.training else 0.0
        # Without a mask (training, plain prefill) the causal kernel needs no mask tensor at all. A lone decode
        # query sees all keys; is_causal would wrongly align it with the first key (SDPA's causal mask is top-left).
        is_causal = attention_mask is None and T > 1
        if plan is None:  # called on its own, not through SLMModel (which plans once for all layers)
            plan = attention_plan(
                device_capability(q.device),
                q.dtype,
                attention_mask is not None,
                is_causal,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                dropout=dropout > 0,
            )
        # The plan says whether the kernel takes the kv heads as they are (enable_gqa: no copy of k and v, which
        # matters for a whole cache per decode step) or needs them expanded to the query heads first.
        y = attend(q, k, v, plan, attention_mask, is_causal, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh * hd)
        return self.o_proj(y)


# -----------------------------------------------------------------------------
# Feed-forward: SwiGLU, and the optional mixture of experts


class SLMMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SLMMoE(nn.Module):
    """Top-k routed experts plus always-on shared experts (DeepSeek-MoE layout).

    The load-balancing loss is Switch Transformer's: num_experts * sum_e(f_e * P_e), where f_e is the share of
    routing slots that went to expert e and P_e the mean router probability of e. It is 1.0 when routing is
    perfectly uniform and grows as tokens pile onto few experts."""

    def __init__(self, config: SLMConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            SLMMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_experts = None
        if config.num_shared_experts > 0:
            width = config.moe_intermediate_size * config.num_shared_experts
            self.shared_experts = SLMMLP(config.hidden_size, width)

    def forward(self, x):
        B, T, H = x.shape
        flat = x.reshape(-1, H)  # (N, H)
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # (N, E) router probabilities in fp32
        topk_w, topk_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        if torch.compiler.is_compiling():
            out = self.all_experts(flat, topk_w, topk_idx)
        else:
            out = self.routed_experts(flat, topk_w, topk_idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        # f_e from a scatter rather than F.one_hot, whose range check on the indices would break a compiled graph
        routed = torch.zeros_like(probs).scatter_(1, topk_idx, 1.0)  # (N, E): 1 where the token went to e
        routed_share = routed.mean(dim=0) / self.top_k  # f_e
        aux_loss = self.num_experts * (routed_share * probs.mean(dim=0)).sum()
        return out.view(B, T, H), aux_loss

    def routed_experts(self, flat, topk_w, topk_idx):
        """Eager: each expert runs once on the rows routed to it (k / num_experts of the dense work)."""
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(topk_idx == e)
            # An expert that gets no token still runs (on zero rows): its weights stay in the autograd graph and
            # receive a zero gradient, so DDP's reducer hears from every parameter every step. Skipping it
            # makes DDP fail ("did not receive grad") as soon as one rank routes nothing to one expert.
            y = expert(flat[rows]) * topk_w[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out

    def all_experts(self, flat, topk_w, topk_idx):
        """Compiled: every expert on every row, weighted by its routing weight (0 off the top-k). The same sum as
        routed_experts (an unrouted expert adds exactly 0) with static shapes, so the graph has no break. The price:
        num_experts / top_k times the routed experts' work, for a handful of experts (our moe preset has 4, top 2)."""
        weights = torch.zeros(flat.shape[0], self.num_experts, dtype=topk_w.dtype, device=flat.device)
        weights = weights.scatter(1, topk_idx, topk_w)  # (N, E)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + (expert(flat) * weights[:, e, None]).to(out.dtype)
        return out


# -----------------------------------------------------------------------------
# Decoder block and the stack


class SLMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). GradientCheckpointingLayer makes it
    recompute its activations in backward when gradient checkpointing is on."""

    def __init__(self, config: SLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SLMAttention(config, layer_idx)
        self.mlp = SLMMoE(config) if config.use_moe else SLMMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = SLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = SLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.use_moe = config.use_moe

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, plan=None):
        x = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, plan
        )
        if self.use_moe:
            y, aux_loss = self.mlp(self.post_attention_layernorm(x))
        else:
            y, aux_loss = self.mlp(self.post_attention_layernorm(x)), x.new_zeros(())
        return x + y, aux_loss


class SLMPreTrainedModel(PreTrainedModel):
    config_class = SLMConfig
    config: SLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SLMDecoderLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = False  # eager MoE routing has data-dependent shapes (compiled training: all_experts)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2's residual scaling: the projections that write into the residual stream get
            # std / sqrt(2 * layers), so the stream's variance does not grow with depth; or zeros, so every
            # block starts as the identity (residual_init="zero").
            writes_residual = getattr(module, "_slm_name", "") in ("o_proj", "down_proj")
            if writes_residual and self.config.residual_init == "zero":
                init.zeros_(module.weight)
            else:
                scale = 1 / math.sqrt(2 * self.config.num_hidden_layers) if writes_residual else 1.0
                init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SLMRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, SLMRotaryEmbedding):
            # Models built on the meta device (from_pretrained) lose non-persistent buffers: rebuild it here.
            init.copy_(module.inv_freq, module.compute_inv_freq(self.config))

    def post_init(self):
        # Tag each linear with its attribute name so _init_weights can find the residual projections.
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                module._slm_name = name.rsplit(".", 1)[-1]
        super().post_init()


def build_attention_mask(attention_mask, q_len: int, kv_len: int, past_len, device) -> torch.Tensor | None:
    """Boolean (B, 1, q_len, kv_len) mask: True where a query may attend.

    Query i sits at cache slot past_len + i and sees slots j <= past_len + i that are not padding. A static
    cache is longer than what is filled; the causal rule already hides its empty tail. Each query also sees its
    own slot, so a row made only of left padding never becomes all-False (SDPA would return NaN there)."""
    q_pos = torch.arange(q_len, device=device)[:, None] + past_len  # (q, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, q, kv)
    if attention_mask is not None:
        pad = attention_mask.bool()
        if pad.shape[-1] < kv_len:
            pad = F.pad(pad, (0, kv_len - pad.shape[-1]), value=False)
        mask = mask & pad[:, None, None, :kv_len]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


class SLMModel(SLMPreTrainedModel):
    """The decoder stack without a head: returns the final normalised hidden states."""

    def __init__(self, config: SLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        document_ids=None,
        **kwargs,
    ):
        """document_ids (B, T): packed rows, a number per document (0 = padding); attention stays inside each
        document. Pass the per-document position_ids with them (collate_chat makes both), so that RoPE sees what
        it sees for each document alone."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        full_mask = attention_mask is not None and attention_mask.dim() == 4
        # Tokens already in the cache; not read when the caller gives positions and the full mask (a compiled decode
        # step would otherwise be specialised on a number that changes every token).
        past_len = (
            int(cache.get_seq_length()) if cache is not None and not (full_mask and position_ids is not None) else 0
        )
        if position_ids is None:
            position_ids = (torch.arange(T, device=x.device) + past_len).unsqueeze(0).expand(B, -1)
        if document_ids is not None and (cache is not None or attention_mask is not None):
            raise ValueError("document_ids (packed rows) go without a cache and without an attention_mask")
        # The mask-free causal kernel is right when there is no padding and queries and keys are the same
        # T positions (training, or prefill into an empty cache); otherwise build an explicit boolean mask.
        kv_len = int(cache.get_mask_sizes(T, 0)[0]) if cache is not None else T  # static caches are longer
        mask = None
        if full_mask:
            # Already a full (B, 1, q, kv) mask, as generate() prepares for static caches: True/0.0 = attend.
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        elif may_be_padded(attention_mask) or (past_len != 0 and T > 1) or kv_len != past_len + T:
            # A single new token with nothing padded sees every cached slot: no mask needed (the decode fast path).
            mask = build_attention_mask(attention_mask, T, kv_len, past_len, x.device)
        cfg = self.config
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        dropout = self.training and cfg.attention_dropout > 0
        plan = attention_plan(
            device_capability(x.device),
            dtype,
            mask is not None,
            mask is None and T > 1,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            documents=document_ids is not None,
            flex_available=document_ids is not None and flex_attention_available(x.device),
            requires_grad=torch.is_grad_enabled(),
            dropout=dropout,
        )
        if plan.documents == "flex":
            mask = document_block_mask(document_ids.to(x.device))  # built once, shared by every layer
        elif plan.documents == "mask":
            mask = document_mask(document_ids.to(x.device))  # on the device: the host only ships (B, T) ids
        position_embeddings = self.rotary_emb(x, position_ids)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, layer_aux = layer(
                x, position_embeddings=position_embeddings, attention_mask=mask, cache=cache, plan=plan
            )
            aux_loss = aux_loss + layer_aux
        return self.norm(x), cache, aux_loss


def may_be_padded(attention_mask) -> bool:
    """Whether a 2-D padding mask may hide positions. A host (CPU) tensor is looked at; one on an accelerator is
    taken as padded without reading it, since reading would stall the host on the device every forward. Callers
    that know nothing is padded pass no mask at all (collate_chat never makes one), so they keep the maskless
    causal kernel."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    if attention_mask.device.type == "cpu":
        return not bool(attention_mask.all())
    return True


# -----------------------------------------------------------------------------
# Heads


@dataclass
class SLMCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (already added to `loss`, times its coef)


# The outputs' cache field is `cache` in the transformers we require and `past_key_values` in older 5.x (5.17, on the
# GPU image); generate() reads the cache back from whichever field its outputs have.
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def loss_head_weight(head: nn.Module) -> torch.Tensor | None:
    """The output head as one (vocab, hidden) weight for the chunked loss: a plain nn.Linear's, or the merged one
    of a head with trained token rows (model/lora.py); None for a head that only its forward can apply (a
    LoRA-wrapped head), which takes the plain path."""
    if type(head) is nn.Linear:
        return head.weight
    merged = getattr(head, "merged_weight", None)
    return merged() if merged is not None else None


class SLMForCausalLM(SLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SLMConfig):
        super().__init__(config)
        self.model = SLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels=None,
        loss_chunk: int = 0,
        document_ids=None,
        **kwargs,
    ) -> SLMCausalLMOutput:
        """labels: token ids aligned with input_ids (the shift happens here), -100 where no loss is wanted.
        shift_labels: targets already shifted (position t holds the token after t), as the pretraining stream
        yields them; then every position is predicted and none is lost to the shift.
        num_items_in_batch: divide the summed loss by this count instead of taking the mean, so that gradient
        accumulation can weight every valid token of the whole step equally.
        loss_chunk: with labels, compute the loss from the hidden states this many tokens at a time, so the
        (tokens x vocab) logits never exist whole (see ChunkedLinearCrossEntropy); logits are then not returned.
        document_ids: packed rows (see SLMModel.forward); the weights are a plain Llama's either way."""
        cache = kwargs.pop("past_key_values", cache)  # what generate() of older 5.x passes (see OUTPUT_CACHE_FIELD)
        hidden, cache, aux_loss = self.model(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, document_ids
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # generation needs only the last position's logits
        has_labels = labels is not None or shift_labels is not None
        logits = loss = None
        head_weight = loss_head_weight(self.lm_head) if has_labels and loss_chunk > 0 else None
        if head_weight is not None:
            loss = chunked_causal_lm_loss(hidden, head_weight, labels, num_items_in_batch, shift_labels, loss_chunk)
        else:
            logits = self.lm_head(hidden)
            if has_labels:
                loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels)
        if has_labels and self.config.use_moe:
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return SLMCausalLMOutput(
            loss=loss, logits=logits, aux_loss=aux_loss if self.config.use_moe else None, **{OUTPUT_CACHE_FIELD: cache}
        )


def causal_lm_loss(logits, labels, num_items_in_batch=None, shift_labels=None):
    """Next-token cross-entropy: logits at t predict labels at t + 1 (or shift_labels at t); -100 is ignored."""
    if shift_labels is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    logits = logits.float()  # fp32 softmax: bf16 log-probs are too coarse for a stable loss
    targets = targets.to(logits.device)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum" if num_items_in_batch is not None else "mean",
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) against targets, a chunk of rows at a time.

    The plain loss keeps the (N, V) logits, their fp32 copy and log-softmax for backward: at micro-batch 32 x 512 and
    vocab 6400 that is ~1.4 GB on top of the model's own activations. Here forward keeps only one fp32 logsumexp
    per row and backward recomputes each chunk's logits (one more (chunk x d x V) matmul per chunk), so the loss
    needs O(chunk x V) memory whatever the batch. Logits are formed in the inputs' dtype (bf16 under autocast) and
    softmaxed in fp32, like causal_lm_loss."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows] @ weight.t()).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            valid = targets[rows] != -100
            target_logits = logits.gather(1, targets[rows].clamp(min=0)[:, None]).squeeze(1)
            loss += torch.where(valid, lse[rows] - target_logits, 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            # d loss / d logits = softmax - one_hot(target) on valid rows, 0 elsewhere
            grad_logits = torch.exp((hidden[rows] @ weight.t()).float() - lse[rows, None])
            valid = targets[rows] != -100
            grad_logits[torch.arange(len(grad_logits), device=hidden.device), targets[rows].clamp(min=0)] -= 1.0
            grad_logits = (grad_logits * (valid[:, None] * grad_loss)).to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ hidden[rows]).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_causal_lm_loss(hidden, weight, labels, num_items_in_batch=None, shift_labels=None, chunk: int = 4096):
    """causal_lm_loss from the last hidden states and the output matrix, without materialising the logits."""
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    if torch.is_autocast_enabled(hidden.device.type):  # autocast does not reach inside an autograd.Function
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    targets = targets.to(hidden.device).reshape(-1)
    with torch.autocast(hidden.device.type, enabled=False):
        loss = ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss / (targets != -100).sum().clamp(min=1)


class SLMForSequenceClassification(SLMPreTrainedModel):
    """The decoder plus a linear `score` head read at the last non-pad token (reward and value models).

    Loaded from a causal-LM checkpoint, the decoder weights load and the head is new; we say so in one line
    instead of transformers' list of missing and unexpected keys."""

    def __init__(self, config: SLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SLMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # silence the missing/unexpected keys report; we summarise it below
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        finally:
            logging.set_verbosity(verbosity)
        if any(k.startswith("score.") for k in info["missing_keys"]):
            logger.warning(
                f"score head is new (not in the checkpoint): initialised N(0, "
                f"{model.config.initializer_range}); the decoder weights were loaded, lm_head dropped"
            )
        return (model, info) if want_info else model

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        last_index=None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """last_index (B,): where each row's last real token sits, counted on the host (collate_pairs). With it
        and right padding no attention_mask is needed: under causal attention the real tokens never see the pads
        after them, so the mask-free (flash) kernel gives the scores the padding mask gives."""
        hidden, cache, _ = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        logits = self.score(hidden)  # (B, T, num_labels)
        B, T = logits.shape[:2]
        if last_index is not None:
            last = last_index.to(logits.device)
        elif attention_mask is not None:
            # Index of the last real token; works for right padding and, via the max, for left padding too.
            last = (torch.arange(T, device=logits.device) * attention_mask.to(logits.device)).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            not_pad = (input_ids != self.config.pad_token_id).int()
            last = (torch.arange(T, device=logits.device) * not_pad).argmax(-1)
        else:
            last = torch.full((B,), T - 1, device=logits.device)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = (
                F.mse_loss(pooled.squeeze(-1).float(), labels.float())
                if self.num_labels == 1
                else F.cross_entropy(pooled.float(), labels)
            )
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, **{OUTPUT_CACHE_FIELD: cache})


__all__ = ["SLMModel", "SLMForCausalLM", "SLMForSequenceClassification", "SLMPreTrainedModel"]
