"""
What DPO and the reward model share: preference pairs read, held out and batched the same way, and counted the same
way (a pair is one loss item). Not a stage itself; trainer/dpo.py and trainer/reward.py subclass PairTrainer.

Pairs come in any format of dataset/preference_data.py; a micro-batch is [chosen rows; rejected rows], padded to a
few fixed lengths (length_bucket), so that with compile=true there is one graph per length, not per batch.
"""

import functools

from dataset.batches import held_out_split, in_memory_batches
from dataset.chat_data import parse_columns
from dataset.preference_data import PairDataset, collate_pairs, read_pair_samples
from trainer.common import print0, skipped_records
from trainer.core import Trainer

# -----------------------------------------------------------------------------


class PairTrainer(Trainer):
    """build_data, count_loss_items and count_tokens for preference pairs. A subclass adds compute_loss; DPO also
    extends read_pairs (its reference log-probs, precomputed once over both splits)."""

    def read_pairs(self) -> tuple[PairDataset, PairDataset, functools.partial]:
        """(train pairs, held-out pairs, collate): the split is dataset/batches.py held_out_split's."""
        cfg = self.cfg
        samples, stats = read_pair_samples(
            cfg.data_path,
            self.tokenizer,
            cfg.seq_len,
            cfg.on_bad_record,
            cfg.max_samples,
            print0,
            parse_columns(cfg.columns),
        )
        train, val = held_out_split(samples, cfg.val_samples, cfg.seed)
        print0(
            f"[{self.stage}] {stats['records']:,} records -> {len(train):,} train + {len(val):,} val pairs | "
            f"{skipped_records(stats)}"
        )
        collate = functools.partial(collate_pairs, pad_id=self.tokenizer.pad_token_id, seq_len=cfg.seq_len)
        return PairDataset(train), PairDataset(val), collate

    def build_data(self):
        return in_memory_batches(
            *self.read_pairs(),
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.seed,
            eval_batches=self.cfg.eval_batches,
        )

    def count_loss_items(self, *, batch) -> int:
        return batch["num_pairs"]

    def count_tokens(self, *, batch) -> int:
        return batch["num_tokens"]  # counted on the host by collate_pairs
