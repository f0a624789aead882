"""
PPO for language models (Ouyang et al. 2022, "the N implementation details of RLHF with PPO"): actor, critic,
frozen reference and reward model.

    python main.py --stage ppo --config config/ppo.yaml
    python main.py --stage ppo --config config/ppo.yaml critic=separate ref_device=cpu

Each rollout samples replies through the shared Engine (model/engine.py) and scores them (reward model and/or
rule rewards, trainer/rewards.py). Per-token reward: -kl_coef * (log pi_old - log ref) on every reply token
(a KL penalty to the reference, k1 estimator), plus the score on the reply's last token. Advantages by GAE
(gamma, lam) on the critic's values, whitened over the rollout. Then ppo_epochs passes over the rollout in
rollout_minibatches minibatches, one optimizer step each, with
    policy loss  -min(r A, clip(r, 1-clip_eps, 1+clip_eps) A),  r = pi / pi_old
    value loss   0.5 max((V - R)^2, (V_clip - R)^2),  V_clip = V_old + clip(V - V_old, -clip_value, clip_value)
    total        policy + vf_coef * value, averaged over the step's reply tokens.
The epochs over a rollout stop early when approx KL(old || new) exceeds 1.5 x target_kl.

Memory on a small GPU (four models: actor, critic, reference, reward):
    critic=shared     (default) the value head is one linear layer on the actor's last hidden state: no second
                      backbone and no second set of Adam states. The value loss then also shapes the actor's
                      features (vf_coef keeps that small).
    critic=separate   a full critic from critic_from (default: reward_from, else init_from). A smaller model works
                      too (any checkpoint with the same tokenizer), which is the "smaller critic" option.
    ref_device=cpu    keep the frozen reference in CPU memory; its log-probs are computed there once per rollout,
                      under the training dtype's CPU autocast (fp32 when training in fp16: CPU fp16 is slow).
    frozen models (reference, reward) keep fp32 weights, like the policy's master copy, and run under its autocast
    (model/runtime.py load_pretrained), so log pi - log ref is exactly 0 at the start; they have no gradients and
    no optimizer state.
How much each option saves is measured by bench/bench_rl_memory.py (bench/RESULTS.md, "Preference alignment
memory"): the peak is in the update's backward, not in the rollout, so what cuts activations (gradient_checkpointing
=true, a batch_size below global_batch_size) cuts it most, and ref_device=cpu saves only the reference's weights.
During training the peak is logged as peak_mem_gb on CUDA.
Single process only: the value head / critic is outside the DDP wrapper, so its gradients would not be averaged.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from model.runtime import load_pretrained
from trainer.config import above, at_least, between, setting
from trainer.core import run_trainer
from trainer.logprobs import kl_estimate, masked_mean, masked_whiten, token_logprobs
from trainer.rollout import RLConfig, RolloutTrainer

# -----------------------------------------------------------------------------


@dataclass
class Config(RLConfig):
    # batch_size / global_batch_size count sampled replies (num_generations per prompt, 1 by default)
    batch_unit: ClassVar[str] = "replies"
    out_dir: str = "out/ppo"
    ppo_epochs: int = 4
    rollout_minibatches: int = 2
    kl_coef: float = 0.05  # weight of the per-token KL penalty in the reward
    target_kl: float = 0.1  # early stop of the epochs over one rollout; 0 = off
    gamma: float = setting(1.0, bound=between(0, 1))  # discount (1: the score at the end counts fully for every token)
    lam: float = setting(0.95, bound=between(0, 1))  # GAE lambda
    vf_coef: float = setting(0.1, bound=at_least(0))  # weight of the value loss
    # value-function clip around the rollout's values; 0 pins the clipped value to the old one: the value loss could
    # only grow
    clip_value: float = setting(0.2, bound=above(0))
    whiten_advantages: bool = True
    critic: Literal["shared", "separate"] = "shared"  # shared (value head on the actor) | separate (own backbone)
    critic_from: str = setting("", path="checkpoint")  # separate critic's checkpoint; "" = reward_from, else init_from


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (N, T) per-target tensors; mask marks each row's reply, one
    contiguous span (the value after a reply's last token is 0: the episode ends there). -> (advantages,
    returns), both 0 outside the reply."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


class PPOTrainer(RolloutTrainer):
    stage = "ppo"

    def setup(self):
        super().setup()
        cfg = self.cfg
        if self.distributed:
            raise NotImplementedError("PPO runs in one process (the critic is outside DDP); use GRPO for DDP")
        if cfg.critic == "shared":
            self.critic = None
            self.value_head = torch.nn.Linear(self.raw_model.config.hidden_size, 1, device=self.device)
            torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: GAE starts as Monte Carlo
            torch.nn.init.zeros_(self.value_head.bias)
            # The value head reads the actor's final hidden state from the same forward as the log-probs.
            self.raw_model.model.register_forward_hook(self._keep_hidden)
        elif cfg.critic == "separate":
            path = cfg.critic_from or cfg.reward_from or cfg.init_from
            self.critic = load_pretrained(path, "score", device=self.device)  # trained: fp32 master weights
            self.value_head = None
        else:
            raise ValueError(f"critic must be shared or separate, got '{cfg.critic}'")

    def _keep_hidden(self, module, inputs, output):
        self._hidden = output[0]  # SLMModel returns (hidden, cache, aux_loss)

    def _critic_module(self):
        return self.value_head if self.critic is None else self.critic

    def trainable_parameters(self):
        return super().trainable_parameters() + list(self._critic_module().parameters())

    def values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) ids -> (N, T-1) values of the states before each target. Called right after the actor's forward
        on these ids (the rollout's old log-probs, the loss's log-probs): the shared head reads the hidden state
        that forward kept, with no second forward."""
        if self.critic is None:
            if self._hidden.shape[:2] != input_ids.shape:  # another forward ran last: its states, not these
                raise RuntimeError(f"the kept hidden state is {tuple(self._hidden.shape)}, the ids {input_ids.shape}")
            return self.value_head(self._hidden[:, :-1]).squeeze(-1).float()
        hidden = self.critic.model(input_ids)[0]
        return self.critic.score(hidden[:, :-1]).squeeze(-1).float()

    @torch.no_grad()
    def score_rollout(self, buf: dict) -> None:
        cfg = self.cfg
        mask = buf["mask"]
        with self.autocast:
            values = self.values(buf["input_ids"]) * mask
        rewards = -cfg.kl_coef * kl_estimate(buf["old_logps"], buf["ref_logps"], "k1") * mask
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # each reply's last target
        rewards[torch.arange(len(mask), device=mask.device), last] += buf["rewards"]
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        buf["advantages"] = masked_whiten(adv, mask) if cfg.whiten_advantages else adv
        buf["values"], buf["returns"] = values, returns

    def compute_loss(self, *, batch, num_items):
        cfg = self.cfg
        mask = batch["mask"]
        logps = token_logprobs(self.model, batch["input_ids"])
        pg, stats = self.policy_loss(logps, batch)
        v = self.values(batch["input_ids"])
        v_clip = batch["values"] + torch.clamp(v - batch["values"], -cfg.clip_value, cfg.clip_value)
        vf = 0.5 * torch.max((v - batch["returns"]) ** 2, (v_clip - batch["returns"]) ** 2)
        loss = ((pg + cfg.vf_coef * vf) * mask).sum() / num_items
        with torch.no_grad():
            stats["value_loss"] = masked_mean(vf, mask)
            stats["kl"] = masked_mean(kl_estimate(logps, batch["ref_logps"], "k3"), mask)
        return loss, stats

    def extra_state(self) -> dict:
        return {**super().extra_state(), "critic": self._critic_module().state_dict()}

    def load_extra_state(self, *, state: dict) -> None:
        super().load_extra_state(state=state)
        if "critic" in state:
            self._critic_module().load_state_dict(state["critic"])


def run(cfg: Config):
    return run_trainer(PPOTrainer, cfg)
