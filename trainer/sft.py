"""
Full-parameter supervised fine-tuning on chat data: the loss is on assistant tokens only.

    python main.py --stage sft --config config/sft.yaml
    python main.py --stage sft --config config/sft.yaml init_from=out/pretrain/final pack=true max_steps=500

Starts from init_from (a pretraining final/ or step_*/ directory) and takes the architecture and tokenizer from
it. Data formats, labels, truncation and packing are in dataset/chat_data.py. The loop, checkpoints
(self-describing step_*/ dirs, final/) and exact resume (`resume=auto`) are the shared core's. Training and
validation loss are the mean cross-entropy over assistant tokens (the reply and its <|im_end|>).
"""

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

from dataset.batches import held_out_split, in_memory_batches
from dataset.chat_data import (
    ChatDataset,
    collate_chat,
    load_conversations,
    parse_columns,
    parse_placeholders,
    tokenize_conversations,
)
from trainer.common import print0, skipped_records
from trainer.config import Evaluation, FileData, TokenLoss, TrainConfig, at_least, setting
from trainer.core import Trainer, run_trainer


@dataclass
class ChatData(FileData):
    """What SFTTrainer reads of its data (distillation on chat files reads it too)."""

    data_path: str = "dataset/sft/*.json*"  # chat files, globs or parquet/Arrow/save_to_disk data, comma-separated
    system_prompt: str = ""  # system turn added to conversations that have none; "" = none
    placeholders: str = "name=Milli-Chat,author=Milli-Chat"  # key=value pairs that fill {{key}} (identity data)
    truncation: Literal["turns", "tokens"] = "turns"  # turns = keep whole turns up to seq_len | tokens = cut there
    pack: bool = False  # pack several conversations per sequence (block-diagonal attention)
    val_samples: int = setting(200, bound=at_least(0))  # conversations held out for validation; 0 = none


@dataclass
class Config(ChatData, TokenLoss, Evaluation, TrainConfig):
    # batch_size / global_batch_size count conversations (packed sequences of them when pack=true)
    batch_unit: ClassVar[str] = "sequences"
    init_from: str = "out/pretrain/final"  # the pretrained model (architecture and tokenizer come with it)
    out_dir: str = "out/sft"
    max_steps: int = 2000
    lr: float = 1e-4
    warmup_steps: int = 50


class SFTTrainer(Trainer):
    stage = "sft"
    supports_fsdp = True

    def build_data(self):
        cfg = self.cfg
        stats = Counter()
        conversations, _ = load_conversations(
            cfg.data_path,
            parse_placeholders(cfg.placeholders),
            cfg.system_prompt,
            cfg.on_bad_record,
            max_samples=cfg.max_samples,
            stats=stats,
            log=print0,
            columns=parse_columns(cfg.columns),
        )
        samples = tokenize_conversations(conversations, self.tokenizer, cfg.seq_len, cfg.truncation, stats)
        train, val = held_out_split(samples, cfg.val_samples, cfg.seed)
        train = ChatDataset(train, cfg.seq_len, pack=cfg.pack)
        pad_id = self.tokenizer.pad_token_id

        def collate(items):
            # Padded to a few fixed lengths (length_bucket): with compile=true, one graph per length, not per batch.
            return collate_chat(items, pad_id, seq_len=cfg.seq_len)

        # The validation set is never packed: the loss is the same, the code simpler.
        batches = in_memory_batches(
            train,
            ChatDataset(val, cfg.seq_len) if val else None,
            collate,
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            rank=self.rank,
            world_size=self.world_size,
            seed=cfg.seed,
            eval_batches=cfg.eval_batches,
        )
        trained = sum(int((lab != -100).sum()) for _, lab in train.samples)
        tokens = sum(len(ids) for ids, _ in train.samples)
        print0(
            f"[{self.stage}] {stats['records']:,} records -> {len(train.samples):,} train + {len(val):,} val "
            f"conversations | {tokens:,} tokens, {100 * trained / max(1, tokens):.0f}% of them trained | "
            f"{skipped_records(stats)}"
        )
        if cfg.pack:
            print0(
                f"[{self.stage}] packed into {len(train):,} sequences of <= {cfg.seq_len} tokens "
                f"({100 * train.fill_ratio(cfg.seq_len):.0f}% full)"
            )
        epochs = cfg.max_steps * self.global_batch / len(train)
        print0(f"[{self.stage}] {cfg.max_steps} steps x {self.global_batch} sequences = {epochs:.2f} epochs")
        return batches

    def compute_loss(self, *, batch, num_items):
        # document_ids/position_ids are present only for packed rows (see collate_chat); no batch has a mask.
        out = self.model(
            input_ids=batch["input_ids"],
            document_ids=batch.get("document_ids"),
            position_ids=batch.get("position_ids"),
            labels=batch["labels"],
            num_items_in_batch=num_items,
            loss_chunk=self.cfg.loss_chunk,
        )
        return out.loss, {}

    def count_tokens(self, *, batch) -> int:
        return batch["num_tokens"]  # real tokens, not padding: packing's gain shows in tok/s


def run(cfg: Config):
    return run_trainer(SFTTrainer, cfg)
