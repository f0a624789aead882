"""
LoRA adapters and their on-disk format (PEFT's), in one place: the layer and how it is put into a model, the writer,
the unmerged loader and the merge. The LoRA stage (trainer/lora.py) trains and saves with it; the engine
(Engine.from_pretrained(path, adapter=DIR)) and scripts/merge_lora.py merge with it.

    from model.lora import adapter_base_model, load_adapter, merge_lora_weights
    load_adapter(model, "out/lora/run1/final")         # adapters added, unmerged (eval or further training)
    merge_lora_weights(model, "out/lora/run1/final")   # W += scale * B @ A (+ trained rows): a plain model again
    adapter_base_model("out/lora/run1/final")          # the base it was trained on, from adapter_config.json

Each adapted nn.Linear computes y = W x + scale * B A dropout(x), with A (r, in), B (out, r) and
scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (rank-stabilized LoRA, Kalajdzievski 2023: the
update's size then no longer shrinks as r grows).

Trainable token rows (PEFT's trainable_token_indices): a few rows of the embedding, e.g. the chat markers
<|im_start|> and <|im_end|> that pretraining never saw, are trained whole while the rest stays frozen. No low-rank
update can give a never-seen token a useful vector, so without them a LoRA model answers but never ends its turn.
The rows live in their own parameter (the base weight stays frozen and bit-identical); with a tied head
(tie_word_embeddings) the head's rows are the same rows, an untied head gets rows of its own.

The format is PEFT's, so peft.PeftModel.from_pretrained, vLLM and other servers that take PEFT adapters read what we
write, and we read theirs:
    adapter_config.json          peft_type LORA, r, lora_alpha, use_rslora, target_modules, base_model_name_or_path,
                                 trainable_token_indices ([ids] with a tied head; {"embed_tokens": ids, "lm_head": ids})
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r);
                                 base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta (n, hidden)
                                 (and lm_head.token_adapter... untied): the rows' new values, not a difference
PEFT options that change the update in other ways (DoRA, per-module ranks or alphas, extra trained modules, biases)
are refused by every reader here, so no path computes other logits than PEFT would.
"""

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> our model: the prefix PEFT writes in front of keys
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"  # PEFT's key of a module's trained rows, after the module name


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on B A: alpha / r, or alpha / sqrt(r) for rsLoRA (PEFT's LoraLayer.update_layer)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# -----------------------------------------------------------------------------
# The adapter layer and how it is put into a model


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Attribute names are PEFT's (base_layer, lora_A,
    lora_B), so our parameter names are PEFT's saved keys minus its prefix."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(r, alpha, use_rslora)
        # PEFT's default init: A like nn.Linear, B zero -> the update B A is zero at step 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def add_lora(
    model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, use_rslora: bool = False
) -> list[str]:
    """Freeze the whole model, then wrap every nn.Linear whose last name is in targets (PEFT's matching of a
    target list). Returns the wrapped module names; a target that matches nothing is an error."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    unmatched = set(targets) - {n.rsplit(".", 1)[-1] for n in names}
    if unmatched:
        raise ValueError(f"lora_targets {sorted(unmatched)} match no linear layer of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora))
    return names


# -----------------------------------------------------------------------------
# Trainable token rows: PEFT's trainable_token_indices


class TokenRows(nn.Module):
    """The trained values of some rows of a frozen weight (PEFT's TrainableTokensLayer with one adapter). The
    parameter keeps PEFT's name, trainable_tokens_delta, though it holds the rows' new values, not a difference
    (PEFT writes them with index_copy); it starts as a copy of the base rows, so step 0 is the base model."""

    def __init__(self, weight: torch.Tensor, token_ids: list[int]):
        super().__init__()
        self.token_ids = list(token_ids)
        index = torch.tensor(self.token_ids, device=weight.device)
        self.register_buffer("index", index, persistent=False)
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[index].float().clone())  # (n, hidden), fp32
        # slot[id] = the row of trainable_tokens_delta that replaces row `id`, -1 for a row that stays the base's.
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[index] = torch.arange(len(self.token_ids), device=weight.device)
        self.register_buffer("slot", slot, persistent=False)


class TrainableTokensEmbedding(nn.Module):
    """An nn.Embedding whose rows token_adapter.token_ids come from token_adapter. The lookup picks the trained
    row where the id is one of them (a selection, so it is bit-identical to a lookup in the merged matrix) and
    never copies the (vocab, hidden) matrix."""

    def __init__(self, base: nn.Embedding, rows: TokenRows):
        super().__init__()
        self.base_layer = base
        self.token_adapter = rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.token_adapter
        slot = rows.slot[input_ids]  # (B, T): which trained row, -1 for none
        trained = F.embedding(slot.clamp(min=0), rows.trainable_tokens_delta)  # (B, T, H)
        base = self.base_layer(input_ids)
        return torch.where((slot >= 0).unsqueeze(-1), trained.to(base.dtype), base)


class TrainableTokensHead(nn.Module):
    """An output head (nn.Linear, hidden -> vocab) whose rows token_ids come from trained rows: its own
    (an untied head) or the embedding's (a tied head; kept in a list, out of named_parameters, so the rows are
    one parameter and saved once, as PEFT's tied adapter does). The chosen logits are computed from the trained
    rows and written over the base logits (the merged head's logits up to rounding): no (vocab, hidden) copy, and
    the gradient reaches only those rows."""

    def __init__(self, base: nn.Linear, rows: TokenRows, tied: bool):
        super().__init__()
        self.base_layer = base
        if tied:
            self._tied_rows = [rows]
        else:
            self.token_adapter = rows

    @property
    def rows(self) -> TokenRows:
        return self._tied_rows[0] if hasattr(self, "_tied_rows") else self.token_adapter

    def merged_weight(self) -> torch.Tensor:
        """The (vocab, hidden) head with the trained rows in place, for the chunked loss (which takes a weight,
        not a module): one copy of the head per forward, against the (tokens, vocab) logits it never builds."""
        base = self.base_layer.weight
        return base.index_copy(0, self.rows.index, self.rows.trainable_tokens_delta.to(base))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base_layer(hidden)  # (B, T, V)
        rows = self.rows
        chosen = F.linear(hidden, rows.trainable_tokens_delta.to(self.base_layer.weight))  # (B, T, n)
        return logits.index_copy(-1, rows.index, chosen.to(logits.dtype))


def add_trainable_tokens(model: nn.Module, token_ids: list[int], head: bool = True) -> list[str]:
    """Train the rows token_ids of the input embedding (and of the output head: the same rows when tied, rows of
    its own when not; head=False leaves an untied head as it is). The base weights stay frozen. The model is a
    transformers PreTrainedModel (its get/set_input_embeddings and get/set_output_embeddings find the modules).
    Returns what was wrapped, in words."""
    if not token_ids:
        return []
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab = embed.weight.shape[0]
    bad = [i for i in token_ids if not 0 <= i < vocab]
    if bad or len(set(token_ids)) != len(token_ids):
        raise ValueError(f"trainable token ids must be distinct ids below the vocabulary size {vocab}: {token_ids}")
    if type(embed) is not nn.Embedding or (lm_head is not None and type(lm_head) is not nn.Linear):
        raise ValueError("trainable tokens need a plain nn.Embedding and nn.Linear head (not LoRA-wrapped ones)")
    rows = TokenRows(embed.weight, token_ids)
    model.set_input_embeddings(TrainableTokensEmbedding(embed, rows))
    wrapped = ["input embedding"]
    tied = lm_head is not None and lm_head.weight is embed.weight
    if tied or (lm_head is not None and head):
        rows = rows if tied else TokenRows(lm_head.weight, token_ids)
        model.set_output_embeddings(TrainableTokensHead(lm_head, rows, tied))
        wrapped.append("tied output head" if tied else "output head")
    return wrapped


def trainable_token_indices(model: nn.Module) -> list[int] | dict[str, list[int]] | None:
    """adapter_config.json's trainable_token_indices for the rows this model trains: the id list when only the
    embedding has rows of its own (PEFT reads a list as the input embedding's, and a tied head follows it), else
    {module: ids} (an untied head with rows of its own)."""
    own = {
        name.rsplit(".", 1)[-1]: m.token_adapter.token_ids
        for name, m in model.named_modules()
        if isinstance(m, (TrainableTokensEmbedding, TrainableTokensHead)) and hasattr(m, "token_adapter")
    }
    if len(own) <= 1:
        return next(iter(own.values()), None)
    return own


# -----------------------------------------------------------------------------
# Writing: what PeftModel.save_pretrained writes


def is_adapter_parameter(name: str) -> bool:
    """A LoRA A or B, or a module's trained token rows: what an adapter file holds."""
    return ".lora_A." in name or ".lora_B." in name or name.endswith(TOKEN_ROWS)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's saved key names."""
    return {
        PEFT_PREFIX + name: p.detach().float().cpu().contiguous()
        for name, p in model.named_parameters()
        if is_adapter_parameter(name)
    }


def save_adapter(
    model: nn.Module,
    path: str,
    base_model: str,
    targets: list[str],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool = False,
) -> None:
    """adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes them (fp32: the
    adapter is small, and fp32 keeps the resumed run bit-exact). Trained token rows are read from the model."""
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "trainable_token_indices": trainable_token_indices(model),
    }
    with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(adapter_state_dict(model), os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# Reading: one config reader for the unmerged loader and the merge


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json, checked: a LoRA adapter whose update is scale * B A on every target module, plus
    trained rows of the embedding (and of an untied head). Returns {"r", "lora_alpha", "use_rslora",
    "target_modules" (a list), "lora_dropout", "base_model_name_or_path", "trainable_tokens"}, where
    trainable_tokens is {"ids": [...], "head": whether an untied head has rows too} or None."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    unsupported = {
        "peft_type": cfg.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
        "lora_bias": bool(cfg.get("lora_bias")),
        "target_parameters": bool(cfg.get("target_parameters")),
        "layer_replication": bool(cfg.get("layer_replication")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
        # nn.Linear stores W as (out, in); fan_in_fan_out is for GPT-2's transposed Conv1D only.
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
    }
    tokens = cfg.get("trainable_token_indices")
    if isinstance(tokens, dict):
        # The embedding's rows, and the head's: the same ids (PEFT ties them when the head is tied).
        ids = tokens.get("embed_tokens")
        other_modules = set(tokens) - {"embed_tokens", "lm_head"}
        unsupported["trainable_token_indices"] = bool(other_modules) or ids is None or tokens.get("lm_head", ids) != ids
        tokens = None if ids is None else {"ids": list(ids), "head": "lm_head" in tokens}
    elif tokens is not None:
        tokens = {"ids": list(tokens), "head": False}  # a list: the input embedding's rows (a tied head follows)
    if any(unsupported.values()):
        names = ", ".join(k for k, bad in unsupported.items() if bad)
        raise ValueError(
            f"{adapter_dir}: adapter option(s) not supported here: {names} (plain LoRA and rsLoRA, with trained "
            f"rows of embed_tokens and lm_head only)"
        )
    targets = cfg["target_modules"]
    return {
        "r": cfg["r"],
        "lora_alpha": cfg.get("lora_alpha", 8),  # 8 is PEFT's default lora_alpha
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "target_modules": [targets] if isinstance(targets, str) else list(targets),
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "trainable_tokens": tokens,
    }


def is_adapter_dir(path: str) -> bool:
    """A folder that holds only a PEFT adapter (adapter_config.json and no config.json of a full model)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def adapter_base_model(adapter_dir: str) -> str:
    """The base model an adapter was trained on (base_model_name_or_path), read and checked by read_adapter_config,
    so an adapter that no reader here supports is refused before its base is loaded."""
    base = read_adapter_config(adapter_dir)["base_model_name_or_path"]
    if not base:
        raise ValueError(
            f"{adapter_dir}: {ADAPTER_CONFIG} names no base_model_name_or_path; give the base model explicitly"
        )
    return base


def _module_key(key: str) -> str:
    """PEFT key -> our parameter name: drop PEFT's prefix and the adapter name an in-memory state dict carries
    ('...q_proj.lora_A.default.weight' -> '...q_proj.lora_A.weight', '...trainable_tokens_delta.default' ->
    '...trainable_tokens_delta')."""
    return key.removeprefix(PEFT_PREFIX).replace(".default.", ".").removesuffix(".default")


def read_adapter_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors with our parameter names; a key that is not a LoRA A or B or trained token rows
    (a DoRA magnitude, a saved module) is refused, since the update would then not be scale * B A."""
    weights = {_module_key(k): v for k, v in load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS)).items()}
    other = sorted(k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight", TOKEN_ROWS)))
    if other:
        raise ValueError(f"{adapter_dir}: adapter weights not supported here (not LoRA A/B or token rows): {other[:3]}")
    return weights


def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy PEFT-keyed adapter weights into a model that already has the adapters; every key must match."""
    params = dict(model.named_parameters())
    mine = {n for n in params if is_adapter_parameter(n)}
    theirs = {_module_key(k) for k in weights}
    if mine != theirs:
        raise ValueError(
            f"{where}: adapter does not match the model (missing {sorted(mine - theirs)[:3]}, "
            f"unexpected {sorted(theirs - mine)[:3]})"
        )
    with torch.no_grad():
        for key, value in weights.items():
            params[_module_key(key)].copy_(value)


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Add the adapters that adapter_config.json describes and load their weights (unmerged; the model's
    train/eval mode is the caller's). To fold them into the base weights instead, use merge_lora_weights."""
    cfg = read_adapter_config(adapter_dir)
    add_lora(model, cfg["target_modules"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"])
    if cfg["trainable_tokens"]:
        add_trainable_tokens(model, cfg["trainable_tokens"]["ids"], head=cfg["trainable_tokens"]["head"])
    load_adapter_weights(model, read_adapter_weights(adapter_dir), adapter_dir)
    return model


@torch.no_grad()
def merge_lora_weights(model: nn.Module, adapter_dir: str) -> int:
    """Add each adapter's (scale * B @ A) into the matching nn.Linear weight and write trained token rows over
    the embedding's (and an untied head's) rows, in place; returns how many modules changed. Keys that match no
    layer raise, so an adapter made for another architecture fails loudly instead of silently doing nothing."""
    cfg = read_adapter_config(adapter_dir)
    scale = lora_scaling(cfg["r"], cfg["lora_alpha"], cfg["use_rslora"])
    weights = read_adapter_weights(adapter_dir)
    modules = dict(model.named_modules())
    token_rows = {k.removesuffix(TOKEN_ROWS): v for k, v in weights.items() if k.endswith(TOKEN_ROWS)}
    if bool(token_rows) != bool(cfg["trainable_tokens"]):
        raise KeyError(f"{adapter_dir}: trainable_token_indices and the trained rows in the weights disagree")
    for name, rows in token_rows.items():
        module, ids = modules.get(name), (cfg["trainable_tokens"] or {}).get("ids", [])
        if not isinstance(module, (nn.Embedding, nn.Linear)) or tuple(rows.shape) != (len(ids), module.weight.shape[1]):
            raise KeyError(f"trained token rows for '{name}' ({tuple(rows.shape)}) do not fit a layer of this model")
        # A tied head shares this weight, so it gets the rows too (PEFT's tied adapter).
        index = torch.tensor(ids, device=module.weight.device)
        module.weight.index_copy_(0, index, rows.to(device=module.weight.device, dtype=module.weight.dtype))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if key.endswith(TOKEN_ROWS):
            continue
        name, _, which = key.removesuffix(".weight").rpartition(".lora_")  # ('model.layers.0.self_attn.q_proj', 'A')
        pairs.setdefault(name, {})[which] = tensor
    for name, ab in pairs.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear) or set(ab) != {"A", "B"}:
            raise KeyError(f"LoRA weights for '{name}' do not match a linear layer of this model (or lack A/B)")
        delta = scale * (ab["B"].float() @ ab["A"].float())  # (out, r) @ (r, in) -> (out, in), in fp32
        if delta.shape != module.weight.shape:
            raise KeyError(f"LoRA update for '{name}' is {tuple(delta.shape)}, the layer {tuple(module.weight.shape)}")
        module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))
    return len(pairs) + len(token_rows)
