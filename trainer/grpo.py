"""
GRPO (DeepSeekMath): G replies per prompt, advantages normalised within each group, no value model.

    python main.py --stage grpo --config config/grpo.yaml
    python main.py --stage grpo --config config/grpo.yaml reward_rules="exact,format=0.2" reward_from=""

Each rollout samples num_generations replies per prompt through the shared Engine (model/engine.py) and scores
them with the reward model (reward_from), rule functions (reward_rules, see trainer/rewards.py) or both
summed. A reply's advantage A = (r - mean of its group) / (std of its group + 1e-4), the same for every token of
the reply (scale_rewards=false keeps r - mean only: Dr. GRPO's fix for the bias towards low-variance groups).

Loss per reply token t:  -min(ratio_t A, clip(ratio_t, 1-eps, 1+eps) A) + kl_coef * k3_t
    ratio_t = pi(y_t) / pi_old(y_t); with ppo_epochs=1 and one minibatch pi_old = pi, so ratio = 1 in value
    but its gradient is the policy gradient.
    k3_t = ref/pi - 1 - log(ref/pi): the unbiased, non-negative KL estimator DeepSeekMath uses.
Normalisation (loss_norm):
    token     (default) sum over every reply token of the step / number of reply tokens in the step (DAPO):
              every token weighs the same, so long replies are not under-weighted.
    sequence  mean over each reply's tokens, then mean over replies (the original GRPO paper); a long reply's
              tokens then count less each.
Both are exact over gradient accumulation: the core divides by the whole step's count (count_loss_items).
The loop, checkpoints and exact resume (rollout buffer included) are the shared core's.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from trainer.config import at_least, setting
from trainer.core import run_trainer
from trainer.logprobs import kl_estimate, masked_mean, token_logprobs
from trainer.rollout import RLConfig, RolloutTrainer

# -----------------------------------------------------------------------------


@dataclass
class Config(RLConfig):
    # batch_size / global_batch_size count sampled replies (num_generations per prompt)
    batch_unit: ClassVar[str] = "replies"
    out_dir: str = "out/grpo"
    num_generations: int = setting(8, bound=at_least(2))  # G: replies per prompt (advantages are relative to it)
    kl_coef: float = 0.04  # beta of DeepSeekMath
    scale_rewards: bool = True  # divide by the group's std (false = Dr. GRPO)
    loss_norm: Literal["token", "sequence"] = "token"  # see the module docstring


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, groups of group_size contiguous rows -> (N,) advantages, zero-mean within each group.
    A group whose replies all scored the same gets 0: it says nothing about which reply is better."""
    r = rewards.view(-1, group_size).float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


class GRPOTrainer(RolloutTrainer):
    stage = "grpo"

    def setup(self):
        super().setup()  # loss_norm and num_generations were checked by validate() (their field lines above)
        self.token_level = self.cfg.loss_norm == "token"

    def score_rollout(self, buf: dict) -> None:
        adv = group_advantages(buf["rewards"], self.cfg.num_generations, self.cfg.scale_rewards)
        buf["advantages"] = adv[:, None] * buf["mask"]  # (N, T-1): one value per reply, on its tokens
        # Per-token weights that turn a sum into the chosen normalisation (see count_loss_items).
        lengths = buf["mask"].sum(-1, keepdim=True).clamp(min=1)
        buf["weights"] = buf["mask"] if self.token_level else buf["mask"] / lengths

    def compute_loss(self, *, batch, num_items):
        logps = token_logprobs(self.model, batch["input_ids"])
        pg, stats = self.policy_loss(logps, batch)
        kl = kl_estimate(logps, batch["ref_logps"], "k3")
        loss = ((pg + self.cfg.kl_coef * kl) * batch["weights"]).sum() / num_items
        return loss, {"kl": masked_mean(kl.detach(), batch["mask"]), **stats}


def run(cfg: Config):
    return run_trainer(GRPOTrainer, cfg)
