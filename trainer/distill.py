"""
White-box knowledge distillation: a student learns a teacher's next-token distributions (Hinton et al., 2015).

    python main.py --stage distill --config config/distill.yaml teacher_from=out/pretrain_moe/final
    python main.py --stage distill teacher_from=out/sft/final init_from=out/sft_small/final data_path=dataset/sft/*.json

The teacher must share the student's tokenizer (same vocabulary, checked at start), e.g. the MoE or a bigger
model distilled into a small dense one, which can then be exported (scripts/export_llama.py, export_gguf.py).
Loss per target token: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, where _T are
the softmaxes at temperature T (T^2 keeps the soft term's gradient scale independent of T).
Data: pretraining shards (data_dir, as --stage pretrain) or chat data (data_path, as --stage sft: only assistant
tokens count; SFT's data keys apply, e.g. columns=dialog=conversations,q=user,a=assistant maps another schema, and
are refused with data_dir). The student starts from init_from, or from model_config when init_from is empty. Loop,
checkpoints and resume are the shared core's; only the data choice and the loss live here.
"""

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from dataset.shards import tokenizer_fingerprint
from model.attention import document_mask
from model.runtime import load_pretrained
from trainer import pretrain, sft
from trainer.common import print0
from trainer.config import Architecture, ConfigError, Evaluation, TrainConfig, above, between, setting
from trainer.core import run_trainer


@dataclass
class Config(sft.ChatData, pretrain.ShardSamples, Architecture, Evaluation, TrainConfig):
    # batch_size / global_batch_size count shard windows (data_dir) or conversations (data_path)
    batch_unit: ClassVar[str] = "sequences"
    teacher_from: str = setting("", path="checkpoint")  # teacher checkpoint dir (same tokenizer); required
    init_from: str = ""  # student start; "" = random init from model_config
    out_dir: str = "out/distill"
    data_dir: str = ""  # token shards (pretraining data); takes precedence over data_path
    data_path: str = ""  # chat files (SFT data), used when data_dir is empty
    max_steps: int = 2000  # SFT's schedule
    lr: float = 1e-4
    warmup_steps: int = 50
    temperature: float = setting(2.0, bound=above(0))  # softmax temperature of both distributions in the KL term
    alpha: float = setting(0.5, bound=between(0, 1))  # weight of the KL term; 1 - alpha goes to cross-entropy


# -----------------------------------------------------------------------------
# The loss, shared by both data sources


class DistillMixin:
    """Teacher setup and the distillation loss; the data comes from the stage class it is mixed into."""

    stage = "distill"
    supports_fsdp = False  # not tested under FSDP; the full teacher on every GPU would undo the saving anyway

    def setup(self):

        cfg = self.cfg
        if not cfg.teacher_from:
            raise ValueError("teacher_from: give the teacher's checkpoint directory")
        # fp32 weights like the student's; autocast runs its matmuls in the training dtype.
        self.teacher = load_pretrained(cfg.teacher_from, device=self.device, frozen=True)
        # Distilling logits position by position only makes sense when both models mean the same token by an id.
        if self.teacher.config.vocab_size != self.raw_model.config.vocab_size:
            raise ValueError(
                f"teacher vocab_size {self.teacher.config.vocab_size} != student "
                f"{self.raw_model.config.vocab_size}: distillation needs a shared tokenizer"
            )
        try:
            teacher_tok = AutoTokenizer.from_pretrained(cfg.teacher_from)
        except (OSError, ValueError):
            teacher_tok = None  # a teacher folder without tokenizer files: the vocab size check has to do
        if teacher_tok is not None and tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(self.tokenizer):
            raise ValueError(
                f"{cfg.teacher_from}'s tokenizer differs from the student's: distillation needs the "
                f"same token ids on both sides"
            )
        n = sum(p.numel() for p in self.teacher.parameters())
        print0(f"[distill] teacher {cfg.teacher_from}: {n:,} parameters | T={cfg.temperature} alpha={cfg.alpha}")

    def compute_loss(self, *, batch, num_items):
        ids, document_ids, position_ids, targets = self.unpack(batch)
        out = self.model(input_ids=ids, document_ids=document_ids, position_ids=position_ids)
        # The teacher may be any causal LM (a stock Llama ignores document_ids): it gets the packed rows' boolean
        # (B, 1, T, T) mask, built on the device from the same ids.
        teacher_mask = None if document_ids is None else document_mask(document_ids)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, attention_mask=teacher_mask, position_ids=position_ids).logits
        # (B, T, V) logits predict targets (B, T); -100 marks positions without a target. Every position is
        # computed and the others are zeroed: selecting the valid rows (logits[valid]) would ask the host how many
        # there are, a wait for the GPU in every micro-batch.
        valid = targets != -100
        student, teacher = out.logits.float(), teacher_logits.float()
        t = self.cfg.temperature
        kl_per_position = F.kl_div(
            F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="none"
        ).sum(-1)  # (B, T)
        kl = torch.where(valid, kl_per_position, 0.0).sum() * t * t
        ce = F.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        loss = (self.cfg.alpha * kl + (1 - self.cfg.alpha) * ce) / num_items
        if out.aux_loss is not None:  # an MoE student still needs its load balancing
            loss = loss + self.raw_model.config.router_aux_loss_coef * out.aux_loss * valid.sum() / num_items
        n = valid.sum().clamp(min=1)
        return loss, {"kl": kl.detach() / n / (t * t), "ce": ce.detach() / n}


class ShardDistillTrainer(DistillMixin, pretrain.PretrainTrainer):
    """Distillation on pretraining shards: every position has a target."""

    def unpack(self, batch):
        x, y = batch
        return x, None, None, y


class ChatDistillTrainer(DistillMixin, sft.SFTTrainer):
    """Distillation on chat data: only assistant tokens count, as in SFT."""

    def unpack(self, batch):
        labels = batch["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # shift: t predicts t+1
        return batch["input_ids"], batch.get("document_ids"), batch.get("position_ids"), targets


# The keys only the chat-data path reads (SFT's data keys): with data_dir they would do nothing.
CHAT_DATA_KEYS = (
    "columns",
    "system_prompt",
    "placeholders",
    "on_bad_record",
    "truncation",
    "pack",
    "val_samples",
    "max_samples",
)


def run(cfg: Config):
    if not cfg.data_dir and not cfg.data_path:
        raise ValueError("give data_dir (token shards) or data_path (chat files)")
    defaults = {f.name: f.default for f in fields(Config)}
    chat_only = [k for k in CHAT_DATA_KEYS if getattr(cfg, k) != defaults[k]]
    if cfg.data_dir and chat_only:
        raise ConfigError(
            f"{', '.join(chat_only)}: read from chat data (data_path) only, and data_dir={cfg.data_dir} (token "
            f"shards) is used; remove them, or set data_dir='' to distill on data_path"
        )
    return run_trainer(ShardDistillTrainer if cfg.data_dir else ChatDistillTrainer, cfg)
