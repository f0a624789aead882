"""
The one training core: every stage (pretrain, SFT, LoRA, DPO, reward, PPO, GRPO, distill) runs this loop.

A stage subclasses Trainer and fills in its data and its loss through the hooks listed in Trainer's docstring.
Everything else is here, once: device and dtype, seeding, DDP or FSDP, AdamW, warmup + cosine/WSD schedule,
gradient accumulation weighted by loss items across the whole step, clipping, logging (+ metrics.jsonl) and
evaluation. When to checkpoint is decided here; how a checkpoint is written and read back (atomic step_* dirs,
exact resume, the final/ export that the next stage loads with init_from) is trainer/checkpoint.py.
"""

import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from dataset.batches import IndexBatches, PrefetchBatches, StepBatches
from model import SLMConfig, SLMForCausalLM
from model.attention import device_capability, flex_attention_available
from model.hub import make_readable, set_generation_defaults
from model.runtime import autocast_context, dtype_name, load_pretrained, resolve_device, resolve_dtype
from trainer import checkpoint, parallel
from trainer.common import (
    ExternalLogger,
    NullLogger,
    TrainingStopped,
    device_peak_flops,
    flops_per_token,
    load_tokenizer,
    move_to,
    print0,
    probe_micro_batch,
    status_line,
)
from trainer.config import TrainConfig, config_to_dict, format_config, save_config, validate
from trainer.guard import StepGuard
from trainer.optim import build_optimizer, lr_at

# -----------------------------------------------------------------------------
# The Trainer


class Trainer:
    """The loop, and every hook a stage overrides today (arguments are keyword-only):

    data and loss (every stage)
      build_data() -> (train_data, val_batches): train_data is a StepBatches (dataset/batches.py: next_step() ->
          micro-batches, state_dict(), load_state_dict()); val_batches a list of micro-batches or None (no eval)
      compute_loss(*, batch, num_items) -> (loss, {name: tensor}): this micro-batch's share of a step that holds
          num_items loss items in all, so the micro-batch losses add up to the step's mean
      count_loss_items(*, batch) -> int: what the loss averages over: valid labels (default), pairs (DPO, reward),
          reply tokens or replies (PPO/GRPO)
      count_tokens(*, batch) -> int: tokens processed, for tok/s and tokens_seen
    models
      load_tokenizer(), build_model(): default init_from's, else tokenizer_dir / model_config
      setup(): after the policy is built: frozen reference, reward model, teacher, value head, LoRA adapters
      probe_step(*, micro_batch): batch_size=auto's trial: forward+backward of that many batch units of random
          data at seq_len (DPO: 2 rows per pair plus the reference's forward)
      trainable_parameters() -> [Parameter]: what AdamW updates and the clip covers (PPO adds its critic)
    the step (RL stages)
      next_step() -> micro-batches: default train_data.next_step(); PPO/GRPO roll out here
      train_step() -> (metrics, tokens): one optimizer step; RolloutTrainer adds rollout statistics
    evaluation and saving
      extra_eval_metrics(*, result) -> dict: more numbers from the mean eval loss (pretraining's bpb)
      on_eval(): after each evaluation (pretraining prints samples)
      should_save() -> bool: after a step; default every save_every (pretraining: also after every shard)
      extra_state() -> dict, load_extra_state(*, state): stage state in trainer_state.pt (rollout buffer, critic)
      save_pretrained_to(*, path, dtype, state): what step_*/ and final/ hold (LoRA: the adapter only), and
          read_checkpoint_weights(*, path) -> dict, load_checkpoint_weights(*, path, weights): reading it back
      next_stage_hint(*, path) -> str: the end-of-run line about final/
    class attributes: stage (log prefix, checkpoint metadata), supports_fsdp; RolloutTrainer adds token_level and
    its own hook score_rollout(buf). Helpers a stage calls: split_held_out, in_memory_batches, to_device, autocast.
    """

    stage = "train"  # used in log lines and checkpoint metadata
    # parallel=fsdp needs every rank to run the same forwards: stages that generate (different lengths per rank)
    # or train adapters keep it off; the ones that set it True are tested against one process.
    supports_fsdp = False

    # ---- hooks a stage overrides (see the docstring) -----------------------------------------------------
    def build_data(self) -> tuple[StepBatches, list | None]:
        raise NotImplementedError

    def count_loss_items(self, *, batch) -> int:
        """Valid (non -100) next-token labels."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(self, *, batch, num_items) -> tuple[torch.Tensor, dict]:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
            num_items_in_batch=num_items,
            loss_chunk=self.cfg.loss_chunk,
        )
        return out.loss, {}

    def count_tokens(self, *, batch) -> int:
        return batch["input_ids"].numel()

    def setup(self) -> None:
        pass

    def probe_step(self, *, micro_batch: int) -> None:
        """batch_size=auto: forward+backward of a random micro-batch of `micro_batch` sequences."""
        ids = torch.randint(0, self.raw_model.config.vocab_size, (micro_batch, self.cfg.seq_len), device=self.device)
        with self.autocast:
            loss = self.raw_model(input_ids=ids, labels=ids).loss
        loss.backward()

    def trainable_parameters(self) -> list:
        return [p for p in self.raw_model.parameters() if p.requires_grad]

    def next_step(self) -> list:
        return self.train_data.next_step()

    def extra_eval_metrics(self, *, result: dict) -> dict:
        return {}

    def on_eval(self) -> None:
        pass

    def should_save(self) -> bool:
        return self.cfg.save_every > 0 and self.step % self.cfg.save_every == 0

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, *, state: dict) -> None:
        pass

    def save_pretrained_to(self, *, path: str, dtype: torch.dtype | None = None, state: dict | None = None) -> None:
        """Weights (+ config) and tokenizer, loadable with from_pretrained alone; `state` is the full state dict
        (checkpoint.full_model_state) where the model is sharded."""
        checkpoint.save_pretrained(
            self.raw_model,
            self.tokenizer,
            path,
            state=state,
            dtype=dtype,
            architecture=self.model_class_name if self.fsdp else None,
        )
        make_readable(path)  # safetensors writes 0600; a docker/ollama service account must be able to read it

    def read_checkpoint_weights(self, *, path: str) -> dict:
        return checkpoint.read_weights(path)

    def load_checkpoint_weights(self, *, path: str, weights: dict) -> None:
        checkpoint.load_model_weights(self.raw_model, weights, fsdp=self.fsdp, where=path)

    def next_stage_hint(self, *, path: str) -> str:
        return f" (next stage: init_from={path})"

    # ---- data helpers for stages whose samples sit in memory (chat, preference pairs) ------------------
    def split_held_out(self, samples: list, n_val: int) -> tuple[list, list]:
        """(train, val): the held-out split is drawn by seed, the same on every rank and on resume."""
        order = np.random.default_rng(self.cfg.seed).permutation(len(samples))
        return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]

    def in_memory_batches(self, train, val, collate) -> tuple[IndexBatches, list | None]:
        """build_data's result for datasets in memory: train through IndexBatches (exact resume), evaluate on
        up to eval_batches micro-batches of val."""
        train_data = IndexBatches(
            train, self.global_batch, self.micro_batch, self.rank, self.world_size, self.cfg.seed, collate
        )
        rows = min(len(val), self.cfg.eval_batches * self.micro_batch) if val is not None else 0
        val_batches = [
            collate([val[j] for j in range(i, min(i + self.micro_batch, rows))])
            for i in range(0, rows, self.micro_batch)
        ]
        return train_data, val_batches or None

    # ---- setup ---------------------------------------------------------------------------------------
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # One process per device under torchrun, with DDP or FSDP (self.fsdp) over them.
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed:
            self.rank, self.world_size, self.device = parallel.init_process_group(cfg.device)
        else:
            self.rank, self.world_size = 0, 1
            self.device = resolve_device(cfg.device)
        self.master = self.rank == 0
        if cfg.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got '{cfg.parallel}'")
        self.fsdp = self.distributed and cfg.parallel == "fsdp"
        if cfg.parallel == "fsdp" and not self.distributed:
            print0(f"[{self.stage}] parallel=fsdp: one process has nothing to shard over; training unsharded")
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.fsdp:  # fail before anything is built
            parallel.check_fsdp(
                supported=self.supports_fsdp, stage=self.stage, dtype=self.dtype, batch_size=cfg.batch_size
            )
        self.autocast = autocast_context(self.device, self.dtype)
        self.guard = StepGuard(self.device, self.dtype, cfg.fp16_init_scale)  # fp16 loss scaling + skipped steps
        self.scaler = self.guard.scaler  # the GradScaler itself, for code that inspects the scale
        self._seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.step, self.tokens_seen, self.logger = 0, 0, NullLogger()

    def _seed(self, seed: int):
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

    def load_tokenizer(self):
        return load_tokenizer(init_from=self.cfg.init_from, tokenizer_dir=self.cfg.tokenizer_dir)

    def build_model(self):
        """Random init from model_config, or the weights (and architecture) of init_from."""
        if self.cfg.init_from:
            return load_pretrained(self.cfg.init_from)  # fp32 master weights; autocast gives the compute dtype
        return SLMForCausalLM(SLMConfig.from_preset(self.cfg.model_config))

    def prepare(self):
        """Build everything; after this, fit() can run. Separate from __init__ so tests can poke at parts."""
        cfg = self.cfg
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no tqdm bars from save/load inside the loop
        self.tokenizer = self.load_tokenizer()
        self.raw_model = self.build_model().to(self.device)
        set_generation_defaults(self.raw_model, self.tokenizer)  # saved folders stop at <|im_end|> in generate()
        if cfg.gradient_checkpointing:
            self.raw_model.activation_checkpointing_enable()
        if cfg.seq_len > self.raw_model.config.max_position_embeddings:
            raise ValueError(
                f"seq_len={cfg.seq_len} is over the model's max_position_embeddings="
                f"{self.raw_model.config.max_position_embeddings}"
            )
        self.setup()
        self.micro_batch = self._resolve_micro_batch()
        self.global_batch = cfg.global_batch_size or self.micro_batch * self.world_size
        if self.global_batch % (self.micro_batch * self.world_size) != 0:
            raise ValueError(
                f"global_batch_size={self.global_batch} must be a multiple of batch_size x processes "
                f"= {self.micro_batch} x {self.world_size}"
            )
        self.accum_steps = self.global_batch // (self.micro_batch * self.world_size)
        self.train_data, self.val_batches = self.build_data()
        if cfg.prefetch:  # collation off the critical path; pinned so that to_device's copies are asynchronous
            self.train_data = PrefetchBatches(self.train_data, pin_memory=self.device.type == "cuda")
        self.model_class_name = type(self.raw_model).__name__
        if self.fsdp:
            parallel.shard_model(self.raw_model, self.device, self.world_size)  # before the optimizer
        # Names decide the groups (trainer/optim.py); a parameter outside the policy model (PPO's value head) has
        # none and goes to AdamW.
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        named = [(names.get(id(p), f"extra.{i}"), p) for i, p in enumerate(self.trainable_parameters())]
        self.optimizer = build_optimizer(named, cfg, self.device)
        self.model = self.raw_model
        # The attention plan reads the GPU's capability and whether FlexAttention can run once per process; read
        # here, before compiling, the traced forward finds both cached instead of calling into torch.cuda.
        device_capability(self.device)
        flex_attention_available(self.device)
        if cfg.compile:
            # dynamic=False: one static graph per input shape, and the collates pad to a few fixed lengths. The
            # compiled module is what DDP wraps, as the torch docs recommend (compile the inner module): its forward
            # runs inside DDP's, so dynamo's DDPOptimizer cuts the graph at DDP's bucket boundaries and each
            # bucket's all-reduce overlaps the rest of backward. raw_model itself stays uncompiled (saving, Engine).
            self.model = torch.compile(self.model, dynamic=False)
        if self.distributed and not self.fsdp:
            self.model = parallel.wrap_ddp(self.model, self.device)
        self.peak_flops = device_peak_flops(self.device, self.dtype)
        self.flops_per_token = flops_per_token(self.raw_model, cfg.seq_len)
        if self.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
        self.resume()
        if self.master and cfg.logger != "none":
            self.logger = ExternalLogger(
                cfg.logger,
                "milli-chat",
                cfg.run_name or os.path.basename(cfg.out_dir),
                config_to_dict(cfg),
                cfg.out_dir,
            )
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        n_train = sum(p.numel() for p in self.trainable_parameters())
        print0(f"[{self.stage}] config:\n{format_config(cfg)}")
        print0(
            f"[{self.stage}] {n_params:,} parameters ({n_train:,} trainable) | device {self.device} | dtype "
            f"{dtype_name(self.dtype)} | processes {self.world_size} | micro-batch "
            f"{self.micro_batch} x accum {self.accum_steps} = global batch {self.global_batch} {cfg.batch_unit}"
        )

    def _resolve_micro_batch(self) -> int:
        bs = self.cfg.batch_size
        if isinstance(bs, int):
            return bs
        if bs != "auto":
            raise ValueError(f"batch_size must be an integer or 'auto', got {bs!r}")
        if self.device.type != "cuda":
            print0(f"[{self.stage}] batch_size=auto probes GPU memory; on {self.device.type} it uses 8")
            return 8
        return self._probe_micro_batch()

    def _probe_micro_batch(self) -> int:
        target = (self.cfg.global_batch_size // self.world_size) if self.cfg.global_batch_size else 512  # per rank
        best = probe_micro_batch(
            lambda n: self.probe_step(micro_batch=n), model=self.raw_model, target=target, device=self.device
        )
        print0(f"[{self.stage}] batch_size=auto: micro-batch {best} (largest power of two that fit, with headroom)")
        return best

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self):
        cfg = self.cfg
        self.model.train()
        step_times = []
        t_last = time.time()
        while True:
            last = self.step >= cfg.max_steps
            if last or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0 and self.step > 0):
                self.last_eval = self.evaluate()
                self.log_values(self.last_eval, prefix="eval")
            if last:
                break
            metrics, tokens = self.train_step()
            self.step += 1
            t_now = time.time()
            step_times.append(t_now - t_last)
            t_last = t_now
            log, save = self.step % cfg.log_every == 0 or self.step == cfg.max_steps, self.should_save()
            if log:
                self.log_step(metrics, step_times, tokens)
            if log or save:
                self.stop_if_diverged()  # reads the guard's device counters: host syncs only on these steps
            if save and self.step < cfg.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        self.export_final()
        self.logger.finish()

    def train_step(self) -> tuple[dict, int]:
        """One optimizer step: accumulate over micro-batches, clip, update. Returns (tensors to log, tokens this
        step processed over all ranks)."""
        micro_batches = self.next_step()
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:  # each group's peak lr is lr_scale x cfg.lr (trainer/optim.py)
            group["lr"] = lr * group["lr_scale"]
        # Weight every loss item of the whole step (all micro-batches, all ranks) equally. Both counts are taken
        # from the host batches, before to_device: on device tensors each int() would wait for the GPU.
        num_items = torch.tensor(float(sum(self.count_loss_items(batch=b) for b in micro_batches)), device=self.device)
        tokens = sum(self.count_tokens(batch=b) for b in micro_batches)
        if self.distributed:
            dist.all_reduce(num_items)
        num_items = num_items.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        extra = {}
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            sync = i == len(micro_batches) - 1
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs.
            # FSDP reduce-scatters every micro-batch instead, so only a shard of the gradients is ever kept.
            ctx = self.model.no_sync() if self.distributed and not self.fsdp and not sync else nullcontext()
            with ctx:
                with self.autocast:
                    loss, metrics = self.compute_loss(batch=batch, num_items=num_items)
                # DDP and FSDP average gradients over ranks; our loss is already a share of the global total,
                # so multiply by the number of ranks to turn that average back into the sum.
                self.guard.scale(loss * self.world_size).backward()
            loss_sum += loss.detach()
            for key, value in metrics.items():
                extra[key] = extra.get(key, 0) + value.detach().float() / len(micro_batches)
        self.guard.unscale_(self.optimizer)
        params = self.trainable_parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else 1e30)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced over the shards
            grad_norm = grad_norm.full_tensor()
        if self.distributed:
            dist.all_reduce(loss_sum)
        # Skipped on the device when the loss or a gradient is not finite (an fp16 overflow): see trainer/guard.py.
        self.guard.step(self.optimizer, loss=loss_sum, grad_norm=grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += tokens * self.world_size
        return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, **extra}, tokens * self.world_size

    def to_device(self, batch):
        return move_to(batch, self.device)

    def stop_if_diverged(self):
        """TrainingStopped after a non-finite loss or max_skipped_steps skips in a row (noticed on log and
        checkpoint steps). No non-finite step reached the weights (trainer/guard.py), so the current state is
        the last good one: it is saved, and its data position is past the offending batches."""
        if (why := self.guard.stop_reason(max_skipped_steps=self.cfg.max_skipped_steps)) is None:
            return
        self.guard.forget_runs()
        path = self.save_checkpoint()
        raise TrainingStopped(
            f"[{self.stage}] {why}; the last good state (step {self.step}, non-finite steps "
            f"skipped) is saved in {path}. Lower lr, raise warmup_steps, or check the data, "
            f"then resume."
        )

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the validation micro-batches (each rank takes every world_size-th one)."""
        if not self.val_batches:
            return {}
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        items = torch.zeros((), device=self.device)
        metric_sums = {}  # the stage's own metrics (e.g. DPO reward accuracy), weighted like the loss
        # Every rank runs the same number of forwards (FSDP gathers weights collectively in each one): a rank past
        # the end repeats the last batch with weight 0.
        for i in range(math.ceil(len(self.val_batches) / self.world_size)):
            index = self.rank + i * self.world_size
            batch = self.val_batches[min(index, len(self.val_batches) - 1)]
            n = self.count_loss_items(batch=batch) if index < len(self.val_batches) else 0  # on the host batch
            batch = self.to_device(batch)
            with self.autocast:
                loss, metrics = self.compute_loss(
                    batch=batch, num_items=torch.tensor(float(max(n, 1)), device=self.device)
                )
            loss_sum += loss.float() * n
            items += n
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0) + value.detach().float() * n
        if self.distributed:
            dist.all_reduce(loss_sum)
            dist.all_reduce(items)
            for value in metric_sums.values():
                dist.all_reduce(value)
        self.model.train()
        result = {"loss": float(loss_sum / items.clamp(min=1))}
        result.update({key: float(value / items.clamp(min=1)) for key, value in metric_sums.items()})
        result.update(self.extra_eval_metrics(result=result))
        self.on_eval()
        return result

    # ---- logging -------------------------------------------------------------------------------------------
    def log_step(self, metrics: dict, step_times: list, step_tokens: int):
        cfg = self.cfg
        values = {k: float(v) for k, v in metrics.items()}  # .item() syncs with the GPU: only at log steps
        values.update(self.guard.log_values())  # skipped_steps (+ loss_scale in fp16)
        recent = step_times[-cfg.log_every :]
        dt = sum(recent) / len(recent)
        tok_per_s = step_tokens / dt
        steady = step_times[3:] or step_times  # leave out compile/warm-up steps from the ETA
        eta_min = (cfg.max_steps - self.step) * (sum(steady) / len(steady)) / 60
        values.update({"tok_per_s": tok_per_s, "dt_ms": dt * 1000, "tokens_seen": self.tokens_seen})
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * tok_per_s / (self.peak_flops * self.world_size)
        line = status_line(
            self.stage,
            self.step,
            cfg.max_steps,
            values,
            stage_metrics=[k for k in metrics if k not in ("loss", "lr", "grad_norm")],
        )
        if self.device.type == "cuda":
            values["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        print0(line + f" | eta {eta_min:.1f}m")
        self.log_values(values)

    def log_values(self, values: dict, prefix: str = "train"):
        if not values or not self.master:
            return
        record = {"step": self.step, "split": prefix, "time": time.time(), **values}
        with open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.logger.log({f"{prefix}/{k}": v for k, v in values.items()}, self.step)
        if prefix != "train":
            print0(
                f"[{self.stage}] step {self.step:05d} {prefix}: "
                + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            )

    # ---- checkpoints: when is decided in fit(); what and how is trainer/checkpoint.py -------------------------
    def save_checkpoint(self) -> str:
        """step_NNNNNN/: weights + tokenizer + trainer_state.pt, written atomically (collective under FSDP)."""
        return checkpoint.save_trainer(self)

    def export_final(self):
        """final/: weights only, in the training dtype (bf16 on GPU), the `init_from` of the next stage."""
        checkpoint.export_trainer(self)

    def resume(self):
        """Continue from the newest readable checkpoint (resume=auto), a given one, or not at all (never)."""
        checkpoint.resume_trainer(self)


def run_trainer(trainer_cls, cfg) -> Trainer:
    """What a stage's run(cfg) calls: check the config (values, then, after the device and parallel checks of
    __init__, the paths; before any model is built), build, train, and tear down the process group."""
    validate(cfg, paths=False)
    trainer = trainer_cls(cfg)
    try:
        validate(cfg)
        trainer.prepare()
        trainer.fit()
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return trainer
