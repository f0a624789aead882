"""
The one training core: every stage (pretrain, SFT, LoRA, DPO, reward, PPO, GRPO, distill) runs this loop.

A stage subclasses Trainer and fills in its data and its loss through the hooks listed in Trainer's docstring.
Everything else is here, once: device and dtype, seeding, DDP or FSDP, AdamW, warmup + cosine/WSD schedule,
gradient accumulation weighted by loss items across the whole step, clipping and evaluation. When to log and when
to checkpoint is decided here; what a log line and metrics.jsonl hold is trainer/common.py's MetricsLog, and how a
checkpoint is written and read back (atomic step_* dirs, exact resume, the final/ export that the next stage loads
with init_from) is trainer/checkpoint.py.
"""

import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from transformers.utils import logging as hf_logging

from dataset.batches import PrefetchBatches, StepBatches
from model import SLMConfig, SLMForCausalLM
from model.attention import device_capability, flex_attention_available
from model.hub import set_generation_defaults
from model.runtime import (
    autocast_context,
    compiles,
    dtype_name,
    load_pretrained,
    pins_memory,
    resolve_device,
    resolve_dtype,
    set_cpu_threads,
)
from trainer import checkpoint, parallel
from trainer.common import (
    ExternalLogger,
    MetricsLog,
    NullLogger,
    TrainingStopped,
    device_peak_flops,
    flops_per_token,
    host_to_device,
    load_tokenizer,
    move_to,
    print0,
    probe_micro_batch,
    resume_candidates,
    seed_rngs,
)
from trainer.config import (
    Architecture,
    ConfigError,
    Evaluation,
    TrainConfig,
    config_to_dict,
    format_config,
    save_config,
    validate,
)
from trainer.guard import StepGuard, non_finite_count
from trainer.optim import build_optimizer, lr_at
from trainer.run_lock import out_dir_lock

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
      load_tokenizer(), build_model(): default init_from's, else tokenizer_dir / model_config (only where the
          Config mixes in Architecture; elsewhere an empty init_from is refused in __init__)
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
    class attributes: stage (log prefix, checkpoint metadata), supports_fsdp, weights (what step_*/ and final/
    hold and how a resume reads it: checkpoint.ModelWeights, LoRA's AdapterWeights); RolloutTrainer adds token_level and
    its own hook score_rollout(buf), PairTrainer (DPO, reward) read_pairs(). Helpers a stage calls: to_device,
    autocast; for data held in memory, dataset/batches.py held_out_split and in_memory_batches.
    """

    stage = "train"  # used in log lines and checkpoint metadata
    # parallel=fsdp needs every rank to run the same forwards: stages that generate (different lengths per rank)
    # or train adapters keep it off; the ones that set it True are tested against one process.
    supports_fsdp = False
    weights = checkpoint.ModelWeights()  # what checkpoints hold of the model: all of it

    # ---- hooks a stage overrides (see the docstring) -----------------------------------------------------
    def build_data(self) -> tuple[StepBatches, list | None]:
        raise NotImplementedError

    def count_loss_items(self, *, batch) -> int:
        """Valid (non -100) next-token labels."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(self, *, batch, num_items) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

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

    # ---- setup ---------------------------------------------------------------------------------------
    def __init__(self, cfg: TrainConfig):
        # The values first, on every path into the Trainer (run_trainer, tests and benchmarks that build one):
        # choices such as parallel and batch_size's "auto" are checked there, not again below.
        validate(cfg, paths=False)
        if not cfg.init_from and not isinstance(cfg, Architecture):  # a stage with no model_config to build from
            raise self._no_init_from_error()
        self.cfg = cfg
        # One process per device under torchrun, with DDP or FSDP (self.fsdp) over them.
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed:
            self.rank, self.world_size, self.device = parallel.init_process_group(cfg.device)
        else:
            self.rank, self.world_size = 0, 1
            self.device = resolve_device(cfg.device)
        self.master = self.rank == 0
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.cpu_threads = set_cpu_threads(cfg.threads) if self.device.type == "cpu" else None
        self.fsdp = cfg.parallel == "fsdp" and self._fsdp_applies()
        self.autocast = autocast_context(self.device, self.dtype)
        self.guard = StepGuard(self.device, self.dtype, cfg.fp16_init_scale)  # fp16 loss scaling + skipped steps
        self.scaler = self.guard.scaler  # the GradScaler itself, for code that inspects the scale
        seed_rngs(cfg.seed, rank=self.rank)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.step, self.tokens_seen = 0, 0

    def _no_init_from_error(self) -> ConfigError:
        return ConfigError(
            f"init_from is empty: stage {self.stage} starts from a saved model (its architecture and tokenizer "
            f"come from init_from's config.json); give a checkpoint dir, e.g. an earlier stage's final/"
        )

    def _fsdp_applies(self) -> bool:
        """parallel=fsdp: under torchrun, once the stage, dtype and batch size allow it (checked here, before anything
        is built); in one process there is nothing to shard over."""
        if not self.distributed:
            print0(f"[{self.stage}] parallel=fsdp: one process has nothing to shard over; training unsharded")
            return False
        parallel.check_fsdp(
            supported=self.supports_fsdp, stage=self.stage, dtype=self.dtype, batch_size=self.cfg.batch_size
        )
        return True

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
        hf_logging.disable_progress_bar()  # no tqdm bars from save/load inside the loop
        self.tokenizer = self.load_tokenizer()
        self.raw_model = self.build_model().to(self.device)
        set_generation_defaults(self.raw_model, self.tokenizer)  # saved folders stop at <|im_end|> in generate()
        if cfg.gradient_checkpointing:
            self.raw_model.activation_checkpointing_enable()
        if cfg.seq_len > self.raw_model.config.max_position_embeddings:
            raise self._seq_len_error()
        self.setup()
        # validate() let through only an integer >= 1 or "auto"
        self.micro_batch = self._auto_micro_batch() if cfg.batch_size == "auto" else cfg.batch_size
        self.global_batch = cfg.global_batch_size or self.micro_batch * self.world_size
        if self.global_batch % (self.micro_batch * self.world_size) != 0:
            raise self._global_batch_error()
        self.accum_steps = self.global_batch // (self.micro_batch * self.world_size)
        self.train_data, self.val_batches = self.build_data()
        if cfg.prefetch:  # collation off the critical path; pinned so that to_device's copies are asynchronous
            self.train_data = PrefetchBatches(self.train_data, pin_memory=pins_memory(self.device))
        self.model_class_name = type(self.raw_model).__name__
        if self.fsdp:
            parallel.shard_model(self.raw_model, self.device, self.world_size)  # before the optimizer
        # Names decide the groups (trainer/optim.py); a parameter outside the policy model (PPO's value head) has
        # none and goes to AdamW.
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        named = [(names.get(id(p), f"extra.{i}"), p) for i, p in enumerate(self.trainable_parameters())]
        self.optimizer = build_optimizer(named, cfg, self.device)
        # What the loop calls; raw_model itself stays unwrapped (saving, Engine).
        self.model = self._compiled_or_wrapped() if cfg.compile or self.distributed else self.raw_model
        if self.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
        self.resume()
        # After resume: a resumed run's metrics.jsonl is cut back first.
        logger = self._external_logger() if self.master and cfg.logger != "none" else NullLogger()
        self.metrics_log = MetricsLog(
            stage=self.stage,
            out_dir=cfg.out_dir,
            master=self.master,
            logger=logger,
            max_steps=cfg.max_steps,
            log_every=cfg.log_every,
            flops_per_token=flops_per_token(self.raw_model, cfg.seq_len),
            peak_flops=device_peak_flops(self.device, self.dtype),
            world_size=self.world_size,
            device=self.device,
        )
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        n_train = sum(p.numel() for p in self.trainable_parameters())
        print0(f"[{self.stage}] config:\n{format_config(cfg)}")
        print0(
            f"[{self.stage}] {n_params:,} parameters ({n_train:,} trainable) | device {self.device}"
            f"{f' ({self.cpu_threads} threads)' if self.cpu_threads else ''} | dtype "
            f"{dtype_name(self.dtype)} | processes {self.world_size} | micro-batch "
            f"{self.micro_batch} x accum {self.accum_steps} = global batch {self.global_batch} {cfg.batch_unit}"
        )

    def _seq_len_error(self) -> ValueError:
        context = self.raw_model.config.max_position_embeddings
        return ValueError(f"seq_len={self.cfg.seq_len} is over the model's max_position_embeddings={context}")

    def _global_batch_error(self) -> ValueError:
        return ValueError(
            f"global_batch_size={self.global_batch} must be a multiple of batch_size x processes "
            f"= {self.micro_batch} x {self.world_size}"
        )

    def _auto_micro_batch(self) -> int:
        """batch_size=auto: the largest micro-batch that fits (a CUDA probe); 8 elsewhere."""
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

    def _compiled_or_wrapped(self):
        """raw_model under torch.compile (compile=true) and DDP (under torchrun, unless FSDP sharded it)."""
        model = self.raw_model
        # The attention plan reads the GPU's capability and whether FlexAttention can run once per process; read
        # here, before compiling, the traced forward finds both cached instead of calling into torch.cuda.
        device_capability(self.device)
        flex_attention_available(self.device)
        if compiles(self.device, self.cfg.compile):
            # dynamic=False: one static graph per input shape, and the collates pad to a few fixed lengths. The
            # compiled module is what DDP wraps, as the torch docs recommend (compile the inner module): its forward
            # runs inside DDP's, so dynamo's DDPOptimizer cuts the graph at DDP's bucket boundaries and each
            # bucket's all-reduce overlaps the rest of backward.
            model = torch.compile(model, dynamic=False)
        if self.distributed and not self.fsdp:
            model = parallel.wrap_ddp(model, self.device)
        return model

    def _external_logger(self):
        """logger=wandb|swanlab|tensorboard, on rank 0: the run under run_name (default: out_dir's name)."""
        cfg = self.cfg
        run_name = cfg.run_name or os.path.basename(cfg.out_dir)
        return ExternalLogger(cfg.logger, "milli-chat", run_name, config_to_dict(cfg), cfg.out_dir)

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self):
        cfg = self.cfg
        self.model.train()
        step_times = []
        t_last = time.time()
        evaluation = {}  # the newest, for final/'s model card
        while True:
            last = self.step >= cfg.max_steps
            every = cfg.eval_every if isinstance(cfg, Evaluation) else 0  # rollout stages: the final one only
            if last or (every > 0 and self.step % every == 0 and self.step > 0):
                evaluation = self.evaluate()
                self.metrics_log.write(evaluation, step=self.step, split="eval")
            if last:
                break
            metrics, tokens = self.train_step()
            self.step += 1
            t_now = time.time()
            step_times.append(t_now - t_last)
            t_last = t_now
            log, save = self.step % cfg.log_every == 0 or self.step == cfg.max_steps, self.should_save()
            if log:
                self.metrics_log.log_step(
                    metrics,
                    step=self.step,
                    step_times=step_times,
                    step_tokens=tokens,
                    tokens_seen=self.tokens_seen,
                    guard_values=self.guard.log_values(),  # skipped_steps (+ loss_scale in fp16)
                )
            if log or save:
                self.stop_if_diverged()  # reads the guard's device counters: host syncs only on these steps
            if save and self.step < cfg.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        self.export_final(evaluation=evaluation)
        self.metrics_log.finish()

    def train_step(self) -> tuple[dict, int]:
        """One optimizer step: accumulate over micro-batches, clip, update. Returns (tensors to log, tokens this
        step processed over all ranks)."""
        micro_batches = self.next_step()
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:  # each group's peak lr is lr_scale x cfg.lr (trainer/optim.py)
            group["lr"] = lr * group["lr_scale"]
        # Weight every loss item of the whole step (all micro-batches, all ranks) equally. Both counts are taken
        # from the host batches, before to_device: on device tensors each int() would wait for the GPU.
        num_items = host_to_device(sum(self.count_loss_items(batch=b) for b in micro_batches), self.device)
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
        the last good one: it is saved, and its data position is past the offending batches. Unless the weights
        themselves are not finite (a finite update that overflowed them): checked here, on every log and save step,
        before anything is saved, so no checkpoint ever holds them; the newest saved one is named instead."""
        bad_weights = non_finite_count(self.trainable_parameters())
        if self.distributed:  # FSDP ranks hold different shards: all must agree to stop
            dist.all_reduce(bad_weights)
        why = self.guard.stop_reason(max_skipped_steps=self.cfg.max_skipped_steps, non_finite_weights=bad_weights)
        if why is None:
            return
        self.guard.forget_runs()
        advice = "Lower lr, raise warmup_steps, or check the data, then resume."
        if int(bad_weights):  # the current state is not good: never save it, name the newest checkpoint instead
            newest = checkpoint.latest_step_dir(self.cfg.out_dir)
            where = (
                f"the last good state is {newest}, the newest checkpoint (checked finite before it was saved)"
                if newest
                else "no checkpoint was saved before it: start again"
            )
            raise TrainingStopped(f"[{self.stage}] {why}; they are not saved; {where}. {advice}")
        path = self.save_checkpoint()
        raise TrainingStopped(
            f"[{self.stage}] {why}; the last good state (step {self.step}, non-finite steps "
            f"skipped) is saved in {path}. {advice}"
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
                loss, metrics = self.compute_loss(batch=batch, num_items=host_to_device(max(n, 1), self.device))
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

    # ---- checkpoints: when is decided in fit(); what and how is trainer/checkpoint.py -------------------------
    def checkpoint_parts(self) -> checkpoint.Parts:
        """What a checkpoint saves, restores and records, handed to trainer/checkpoint.py explicitly."""
        return checkpoint.Parts(
            cfg=self.cfg,
            stage=self.stage,
            model=self.raw_model,
            model_class=self.model_class_name,
            tokenizer=self.tokenizer,
            weights=self.weights,
            optimizer=self.optimizer,
            guard=self.guard,
            data=self.train_data,
            extra_state=self.extra_state,
            load_extra_state=self.load_extra_state,
            global_batch=self.global_batch,
            dtype=self.dtype,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            fsdp=self.fsdp,
        )

    def save_checkpoint(self) -> str:
        """step_NNNNNN/: weights + tokenizer + trainer_state.pt, written atomically (collective under FSDP)."""
        return checkpoint.save(self.checkpoint_parts(), step=self.step, tokens_seen=self.tokens_seen)

    def export_final(self, *, evaluation: dict | None = None):
        """final/: weights only, in the training dtype (bf16 on GPU), the `init_from` of the next stage; its model
        card lists `evaluation` (the last one's numbers)."""
        checkpoint.export(self.checkpoint_parts(), step=self.step, tokens_seen=self.tokens_seen, evaluation=evaluation)

    def resume(self):
        """Continue from the newest readable checkpoint (resume=auto), a given one, or not at all (never)."""
        candidates = resume_candidates(self.cfg.out_dir, self.cfg.resume)
        if candidates:  # a fresh out_dir has none: no checkpoint code runs
            self._restore_checkpoint(candidates)

    def _restore_checkpoint(self, candidates: list[str]):
        """The first readable of `candidates`, when one is: weights, optimizer, data position and step counts."""
        found = checkpoint.newest_readable(
            candidates, explicit=self.cfg.resume != "auto", stage=self.stage, read_weights=self.weights.read
        )
        if found is not None:
            self.step, self.tokens_seen = checkpoint.restore(self.checkpoint_parts(), *found)


def run_trainer(trainer_cls, cfg) -> Trainer:
    """What a stage's run(cfg) calls: check the config (values, then, after the device and parallel checks of
    __init__, the paths; before any model is built), take out_dir's lock, build, train, and tear down the process
    group."""
    trainer = trainer_cls(cfg)  # validates the values first
    finished = False
    try:
        validate(cfg)
        # One run per out_dir (trainer/run_lock.py): a second one stops here, naming the first. Rank 0 holds it.
        with out_dir_lock(cfg.out_dir, stage=trainer.stage, enabled=trainer.master):
            trainer.prepare()
            trainer.fit()
        finished = True
    finally:
        if trainer.distributed:
            parallel.end_process_group(finished=finished)
    return trainer
