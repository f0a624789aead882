"""
Log-probabilities of a policy and of its frozen reference, and the KL and masking math built on them. Shared by
DPO (sequence log-probs of chosen and rejected replies) and by the rollout stages PPO and GRPO (per-token
log-probs, KL estimators, masked means over reply tokens), which also load their reference the same way
(load_reference). Not a stage itself.
"""

import torch

from model.runtime import load_pretrained

# -----------------------------------------------------------------------------
# The frozen reference


def load_reference(cfg, device: torch.device):
    """The frozen reference of DPO, PPO and GRPO: ref_from, else init_from, on ref_device ("" = `device`, the
    policy's). Its weights stay fp32 and run under the policy's autocast, as the policy's own do, so
    log pi - log ref is exactly 0 at step 0. cfg: a stage Config with ref_from, init_from and ref_device."""
    return load_pretrained(cfg.ref_from or cfg.init_from, device=cfg.ref_device or device, frozen=True)


# -----------------------------------------------------------------------------
# Log-probabilities


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) ids -> (B, T-1) fp32 log p(token t+1 | tokens <= t). logsumexp + gather, never a full log_softmax
    copy of the (B, T, V) logits. The model may live on another device (an offloaded reference)."""
    device = next(model.parameters()).device
    logits = (
        model(
            input_ids=input_ids.to(device), attention_mask=None if attention_mask is None else attention_mask.to(device)
        )
        .logits[:, :-1]
        .float()
    )
    targets = input_ids[:, 1:].to(device)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)).to(input_ids.device)


def sequence_logprobs(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs over the response targets only (loss_mask (B, T-1)) -> (B,)."""
    return (token_logprobs(model, input_ids) * loss_mask).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from a sample of pi (Schulman, "Approximating KL divergence"):
    k1 = log r^-1 (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = r - 1 - log r (unbiased, >= 0; GRPO's),
    with r = ref / pi."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kl estimator must be k1, k2 or k3, got '{kind}'")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask
