"""
DPO (Rafailov et al. 2023): learn from chosen/rejected pairs against a frozen reference, with no reward model.

    python main.py --stage dpo --config config/dpo.yaml
    python main.py --stage dpo --config config/dpo.yaml loss_type=ipo beta=0.5 precompute_ref=true

Pairs come in any format of dataset/preference_data.py. Log-probabilities are summed over the reply tokens
only (the final assistant reply and its <|im_end|>). With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) -
log ref(y_l)), the per-pair loss is
    sigmoid  -log sigmoid(beta h)                                      (the paper's; log 2 when pi = ref)
             with label_smoothing e: -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)   (cDPO: e = the
             assumed share of flipped labels; e = 0 is plain DPO)
    ipo      (h' - 1/(2 beta))^2                                       (Azar et al. 2023: a squared loss that does
             not push h to infinity on deterministic preferences; beta is its tau). h' uses each reply's
             log-ratio averaged over its tokens, not summed: the form the IPO authors' results use and TRL
             computes, so beta values from papers transfer and the loss does not grow with reply length
    hinge    max(0, 1 - beta h)                                        (SLiC)
Logged: the implicit rewards beta (log pi - log ref) of chosen and rejected replies, their margin, and reward
accuracy (share of pairs with chosen reward > rejected reward).

Reference: ref_from (default init_from), frozen. precompute_ref=true runs it once over the data before training
and then frees it, so only the policy (and its optimizer) is in memory during training.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from dataset.preference_data import PairDataset
from model.runtime import frozen_autocast
from trainer.config import Evaluation, FileData, TrainConfig, above, at_least, between, setting
from trainer.core import run_trainer
from trainer.logprobs import load_reference, sequence_logprobs
from trainer.pairs import PairTrainer

# -----------------------------------------------------------------------------


@dataclass
class Config(FileData, Evaluation, TrainConfig):
    # batch_size / global_batch_size count chosen/rejected pairs (2 sequences each)
    batch_unit: ClassVar[str] = "pairs"
    init_from: str = "out/sft/final"  # the SFT model to align (architecture and tokenizer come with it)
    out_dir: str = "out/dpo"
    data_path: str = "dataset/dpo/*.json*"  # preference files, globs, parquet/Arrow/save_to_disk; comma-separated
    max_steps: int = 500
    lr: float = 1e-6  # DPO wants a small lr: the implicit reward drifts fast
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta: float = setting(0.1, bound=above(0))  # strength of the (implicit) KL constraint to the reference
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # see the module docstring
    # sigmoid only: assumed share of flipped labels (cDPO)
    label_smoothing: float = setting(0.0, bound=between(0, 0.5, high_open=True))
    ref_from: str = setting("", path="checkpoint")  # frozen reference; "" = init_from
    ref_device: str = setting("", device=True)  # "" = the training device | cpu = keep the reference off the GPU
    precompute_ref: bool = False  # reference log-probs once before training, then free the reference
    val_samples: int = setting(100, bound=at_least(0))  # pairs held out for validation loss and reward accuracy


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence log-probs (B,) each -> (per-pair losses (B,), chosen rewards (B,), rejected rewards (B,)).
    chosen_tokens / rejected_tokens: reply lengths in tokens (B,), which IPO averages the log-ratios over."""
    chosen = pi_chosen - ref_chosen  # log-ratio of the chosen reply
    rejected = pi_rejected - ref_rejected
    h = chosen - rejected
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type=ipo needs the reply lengths (chosen_tokens, rejected_tokens)")
        h_mean = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
        losses = (h_mean - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be sigmoid, ipo or hinge, got '{loss_type}'")
    return losses, beta * chosen.detach(), beta * rejected.detach()


class DPOTrainer(PairTrainer):
    stage = "dpo"

    def setup(self):
        self.ref = load_reference(self.cfg, self.device)
        # An offloaded reference (ref_device=cpu while training on cuda) gets the policy's autocast on its device.
        self.ref_autocast = frozen_autocast(next(self.ref.parameters()).device, self.device, self.dtype)

    def read_pairs(self):
        train, val, collate = super().read_pairs()
        if self.cfg.precompute_ref:
            for data in (train, val):
                data.ref_logps = self.reference_logps(data, collate)
            self.ref = None  # freed: training needs only the policy now
        return train, val, collate

    @torch.no_grad()
    def reference_logps(self, data: PairDataset, collate) -> torch.Tensor:
        """(N, 2) [chosen, rejected] reference log-probs of every pair, computed once."""
        out = torch.zeros(len(data), 2)
        for s in range(0, len(data), self.micro_batch):
            batch = self.to_device(collate([data[i] for i in range(s, min(s + self.micro_batch, len(data)))]))
            with self.autocast, self.ref_autocast:
                logps = sequence_logprobs(self.ref, batch["input_ids"], batch["loss_mask"]).float().cpu()
            out[batch["index"].cpu()] = torch.stack(logps.chunk(2), dim=1)
        return out

    def probe_step(self, *, micro_batch: int) -> None:
        """batch_size=auto counts pairs: 2 rows each through the policy, then the reference's forward of them
        while the policy's activations are still held (as in compute_loss), unless it is precomputed."""
        ids = torch.randint(
            0, self.raw_model.config.vocab_size, (2 * micro_batch, self.cfg.seq_len), device=self.device
        )
        mask = torch.ones(ids.shape[0], ids.shape[1] - 1, device=self.device)
        with self.autocast:
            pi = sequence_logprobs(self.raw_model, ids, mask)
            if not self.cfg.precompute_ref:
                with torch.no_grad(), self.ref_autocast:
                    sequence_logprobs(self.ref, ids, mask)
        pi.sum().backward()

    def compute_loss(self, *, batch, num_items):
        cfg = self.cfg
        pi = sequence_logprobs(self.model, batch["input_ids"], batch["loss_mask"])  # (2B,) [chosen; rejected]
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            with torch.no_grad(), self.ref_autocast:
                ref = sequence_logprobs(self.ref, batch["input_ids"], batch["loss_mask"])
        pi_c, pi_r = pi.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        n_c, n_r = batch["loss_mask"].sum(-1).chunk(2)  # reply tokens of each side
        losses, r_c, r_r = dpo_loss(
            pi_c,
            pi_r,
            ref_c,
            ref_r,
            cfg.beta,
            cfg.loss_type,
            cfg.label_smoothing,
            chosen_tokens=n_c,
            rejected_tokens=n_r,
        )
        metrics = {
            "reward_acc": (r_c > r_r).float().mean(),
            "margin": (r_c - r_r).mean(),
            "chosen_reward": r_c.mean(),
            "rejected_reward": r_r.mean(),
        }
        return losses.sum() / num_items, metrics


def run(cfg: Config):
    return run_trainer(DPOTrainer, cfg)
