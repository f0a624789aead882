"""
Pretraining on uint16 token shards (from scripts/prepare_shards.py, i.e. dataset/shard_writer.py), streamed in order.

    python main.py --stage pretrain --config config/pretrain.yaml data_dir=dataset/shards max_steps=2000
    torchrun --nproc_per_node=2 main.py --stage pretrain --config config/pretrain.yaml

A checkpoint is written after every shard (a dying session loses at most one shard of work) and every
save_every steps; `resume=auto` continues from the exact token. Evaluation reports validation loss and
bits-per-byte and prints greedy continuations of a few fixed Chinese prompts.
"""

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dataset.shards import ShardStream, check_meta, load_meta, tokenizer_fingerprint, val_windows
from dataset.tokenizer import token_byte_lengths
from model import SLMConfig, SLMForCausalLM
from model.engine import Engine
from trainer.common import print0
from trainer.config import Architecture, Evaluation, ShardData, TokenLoss, TrainConfig, at_least, setting
from trainer.core import Trainer, run_trainer


@dataclass
class ShardSamples(ShardData):
    """What PretrainTrainer reads beyond the loop's settings: the shards, the greedy samples at each evaluation and
    the vocabulary size and context of a model built from model_config (distillation on shards reads them too)."""

    data_dir: str = "dataset/shards"
    sample_prompts: str = "中国的首都是,人工智能是,从前有一座山，"  # comma-separated; greedy samples at each eval
    sample_tokens: int = setting(32, bound=at_least(0))  # new tokens per sample (0 = no samples)
    # 0 = the preset's; set to the tokenizer's size when it differs (e.g. a 32000 tokenizer)
    vocab_size: int = setting(0, bound=at_least(0))
    # 0 = the preset's; the context the model is built for, which may exceed seq_len (RoPE adds no weights): the demo
    # trains on 128 tokens but serves prompts with a tools block of ~560
    max_position_embeddings: int = setting(0, bound=at_least(0))


@dataclass
class Config(ShardSamples, Architecture, TokenLoss, Evaluation, TrainConfig):
    # batch_size / global_batch_size count windows of seq_len tokens
    batch_unit: ClassVar[str] = "sequences"
    out_dir: str = "out/pretrain"


class PretrainTrainer(Trainer):
    stage = "pretrain"
    supports_fsdp = True

    def build_model(self):
        overrides = {k: getattr(self.cfg, k) for k in ("vocab_size", "max_position_embeddings") if getattr(self.cfg, k)}
        if self.cfg.init_from or not overrides:
            return super().build_model()
        return SLMForCausalLM(SLMConfig.from_preset(self.cfg.model_config, **overrides))

    def build_data(self):
        cfg = self.cfg
        meta = load_meta(cfg.data_dir)
        check_meta(meta, cfg.data_dir, self.raw_model.config.vocab_size, tokenizer_fingerprint(self.tokenizer))
        stream = ShardStream(
            cfg.data_dir, meta, cfg.seq_len, self.global_batch, self.micro_batch, self.rank, self.world_size
        )
        tokens_needed = cfg.max_steps * self.global_batch * cfg.seq_len
        epochs = tokens_needed / max(1, stream.tokens_per_epoch())
        print0(
            f"[pretrain] {len(meta['train_shards'])} shards, {stream.tokens_per_epoch():,} usable tokens; "
            f"{cfg.max_steps} steps x {self.global_batch * cfg.seq_len:,} tokens = {epochs:.2f} epochs"
        )
        windows = val_windows(cfg.data_dir, meta, cfg.seq_len, cfg.eval_batches * self.micro_batch)
        if windows is None:
            print0("[pretrain] no validation shard (or it is shorter than seq_len): evaluation is skipped")
            return stream, None
        windows = torch.from_numpy(windows.astype("int64"))
        val_batches = [
            (windows[i : i + self.micro_batch, :-1], windows[i : i + self.micro_batch, 1:])
            for i in range(0, len(windows), self.micro_batch)
        ]
        self.val_targets = windows[:, 1:]
        return stream, val_batches

    @functools.cached_property
    def val_bytes(self) -> int:
        """The UTF-8 bytes behind every target token of the validation set (bits per byte), at the first eval."""
        byte_lengths = torch.tensor(token_byte_lengths(self.tokenizer))
        return int(byte_lengths[self.val_targets.clamp(max=len(byte_lengths) - 1)].sum())

    def count_loss_items(self, *, batch) -> int:
        return batch[1].numel()  # every position of a pretraining window has a target

    def count_tokens(self, *, batch) -> int:
        return batch[0].numel()

    def compute_loss(self, *, batch, num_items):
        x, y = batch
        out = self.model(input_ids=x, shift_labels=y, num_items_in_batch=num_items, loss_chunk=self.cfg.loss_chunk)
        metrics = {"aux_loss": out.aux_loss} if out.aux_loss is not None else {}
        return out.loss, metrics

    def should_save(self) -> bool:
        # Also after the step that used a shard's last full span: a dying session loses at most one shard of work.
        return super().should_save() or self.train_data.shard_done

    def extra_eval_metrics(self, *, result: dict) -> dict:
        # nats per token -> bits per byte: comparable across tokenizers (nanochat's evaluate_bpb).
        return {"bpb": result["loss"] * self.val_targets.numel() / (math.log(2) * max(1, self.val_bytes))}

    def on_eval(self):
        """Greedy continuations of the fixed prompts, through the one generation path (model/engine.py)."""
        # Under FSDP every rank must run the same forwards (weights are gathered collectively), so all ranks
        # generate the same greedy samples and rank 0 prints them.
        if (not self.master and not self.fsdp) or self.cfg.sample_tokens <= 0:
            return
        # Restores train mode afterwards. Eager: a few short samples per eval would not pay for a compiled step.
        engine = Engine(self.raw_model, self.tokenizer, device=self.device, compile=False)
        prompts = [p for p in self.cfg.sample_prompts.split(",") if p]
        with self.autocast:
            outputs = engine.generate(
                [self.tokenizer.encode(p) for p in prompts], max_new_tokens=self.cfg.sample_tokens, stop_token_ids=[]
            )
        for prompt, out in zip(prompts, outputs):
            print0(f"[pretrain] sample: {prompt}|{self.tokenizer.decode(out)!r}")


def run(cfg: Config):
    return run_trainer(PretrainTrainer, cfg)
