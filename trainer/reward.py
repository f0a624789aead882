"""
Reward model: a Bradley-Terry pairwise loss on SLMForSequenceClassification (the decoder plus a scalar head
read at the last token), initialised from an SFT checkpoint.

    python main.py --stage reward --config config/reward.yaml
    python main.py --stage reward --config config/reward.yaml init_from=out/sft/final max_steps=300

Pairs come in any format of dataset/preference_data.py; each side ends at the reply's <|im_end|>, where the
score is read (PPO/GRPO rollouts end there too). Loss per pair: -log sigmoid(r_chosen - r_rejected), plus
center_coef * (r_chosen + r_rejected)^2 to keep scores near 0 (the scale is free under Bradley-Terry, and
a centred reward needs no baseline in PPO). Evaluation reports the pairwise accuracy on a held-out split.

Its final/ loads with AutoModelForSequenceClassification and is what PPO/GRPO take as reward_from.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from model.runtime import load_pretrained
from trainer.config import Evaluation, FileData, TrainConfig, at_least, setting
from trainer.core import run_trainer
from trainer.pairs import PairTrainer

# -----------------------------------------------------------------------------


@dataclass
class Config(FileData, Evaluation, TrainConfig):
    # batch_size / global_batch_size count chosen/rejected pairs (2 sequences each)
    batch_unit: ClassVar[str] = "pairs"
    init_from: str = "out/sft/final"  # SFT checkpoint: its decoder is kept, lm_head dropped, a score head added
    out_dir: str = "out/reward"
    data_path: str = "dataset/dpo/*.json*"  # preference files, globs, parquet/Arrow/save_to_disk; comma-separated
    max_steps: int = 500
    lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    # weight of the (r_chosen + r_rejected)^2 centring term; 0 = off
    center_coef: float = setting(0.01, bound=at_least(0))
    val_samples: int = setting(100, bound=at_least(0))  # held-out pairs for pairwise accuracy; 0 = none


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair -log P(chosen > rejected) under Bradley-Terry, P = sigmoid(r_c - r_r); (B,) -> (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected) + center_coef * (r_chosen + r_rejected) ** 2


class RewardTrainer(PairTrainer):
    stage = "reward"

    def build_model(self):
        return load_pretrained(self.cfg.init_from, "score")  # init_from's decoder, a new one-score head

    def probe_step(self, *, micro_batch: int) -> None:
        """batch_size=auto counts pairs: 2 rows each, scored at their last token as in compute_loss (the default
        probe's labels=ids is a language model's target, not a score's)."""
        ids = torch.randint(
            0, self.raw_model.config.vocab_size, (2 * micro_batch, self.cfg.seq_len), device=self.device
        )
        last_index = torch.full((ids.shape[0],), ids.shape[1] - 1, device=self.device)
        with self.autocast:
            scores = self.raw_model(input_ids=ids, last_index=last_index).logits[:, 0]
        scores.float().sum().backward()

    def compute_loss(self, *, batch, num_items):
        # No attention mask: rows are right-padded and attention is causal, so the score at each row's last real
        # token (last_index) is the one a padding mask would give, and the mask-free (flash) kernel runs.
        scores = self.model(input_ids=batch["input_ids"], last_index=batch["last_index"]).logits[:, 0]
        r_c, r_r = scores.float().chunk(2)  # rows are [chosen; rejected]
        losses = bradley_terry_loss(r_c, r_r, self.cfg.center_coef)
        metrics = {
            "accuracy": (r_c > r_r).float().mean(),
            "margin": (r_c - r_r).mean().detach(),
            "chosen_score": r_c.mean().detach(),
            "rejected_score": r_r.mean().detach(),
        }
        return losses.sum() / num_items, metrics


def run(cfg: Config):
    return run_trainer(RewardTrainer, cfg)
