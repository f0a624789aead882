"""
The one training core: every stage (pretrain, SFT, LoRA, DPO, reward, PPO, GRPO, distill) runs this loop.

A stage subclasses Trainer and fills in its data and its loss through a few hooks:
    build_data()              -> set self.train_data (has next_step() -> list of micro-batches,
                                 state_dict(), load_state_dict()) and optionally self.val_batches
    batch_weight(batch)       -> how many items (e.g. valid label tokens) this micro-batch contributes
    compute_loss(batch, n)    -> (loss, {metric: tensor}); loss = this micro-batch's share of a step whose
                                 whole weight is n, so the micro-batch losses of one step add up to its mean
    build_model() / setup()   -> override to load extra models (reference, reward, ...)
Everything else is here, once: device and dtype, seeding, DDP or FSDP, AdamW, warmup + cosine/WSD schedule, gradient
accumulation weighted by valid items across the whole step, clipping, logging (+ metrics.jsonl), evaluation,
self-describing atomic checkpoints, exact resume, and the final export that the next stage loads with init_from.
"""

import glob
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from model.runtime import autocast_context, check_checkpoint_dir, dtype_name, load_pretrained, resolve_device, resolve_dtype
from trainer.config import format_config, save_config
from trainer.optim import build_optimizer

# -----------------------------------------------------------------------------
# The settings every stage shares. A stage's Config subclasses this and adds only its own fields.


@dataclass
class TrainConfig:
    # --- what to train, on what ---
    model_config: str = "config/model/small.json"  # architecture preset (pretraining only; later stages inherit)
    init_from: str = ""  # checkpoint dir to start from (a stage's final/ or step_*/); "" = random init
    tokenizer_dir: str = "out/tokenizer"  # HF tokenizer folder written by the tokenizer stage
    data_dir: str = ""  # token shards (pretraining)
    data_path: str = ""  # data files, comma-separated (chat / preference stages)
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl, config.yaml
    # --- batch and schedule ---
    max_steps: int = 1000  # optimizer steps
    batch_size: int | str = 16  # micro-batch per process (sequences); "auto" = largest that fits (CUDA probe)
    global_batch_size: int = 0  # sequences per optimizer step over all processes; 0 = batch_size x processes
    seq_len: int = 512  # tokens per sequence
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    warmup_steps: int = 100  # linear warmup from 0
    lr_schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_ratio: float = 0.2  # wsd: share of steps spent in the final linear decay
    weight_decay: float = 0.1  # decay on matrices (not on norms or biases), AdamW's and Muon's
    beta1: float = 0.9  # AdamW betas (under optimizer=muon: of the embeddings, head, norms)
    beta2: float = 0.95
    optimizer: str = "adamw"  # adamw | muon: Muon for the hidden matrices, AdamW for the rest (trainer/optim.py)
    muon_lr_ratio: float = 10.0  # muon: the hidden matrices' peak lr as a multiple of lr (the AdamW groups keep
    #                              lr); Muon scales it per matrix by 0.2*sqrt(max(out, in)) (trainer/optim.py)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the hidden matrices
    grad_clip: float = 1.0  # clip the global grad norm to this; 0 = off
    # --- system ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on capable GPUs, fp16 + GradScaler on older ones, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # under torchrun: ddp (every GPU holds the whole model) | fsdp (weights, grads and optimizer
    #                        state sharded over the GPUs, for a model that does not fit one; pretrain and sft)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    loss_chunk: int = 0  # >0: cross-entropy from hidden states this many tokens at a time, never all logits at once
    #                      (less memory at big micro-batches, one extra output matmul); 0 = plain loss
    seed: int = 1337
    # --- logging, evaluation, checkpoints ---
    log_every: int = 10  # steps between status lines
    eval_every: int = 200  # steps between evaluations (also at the end); 0 = only at the end
    eval_batches: int = 20  # validation micro-batches per evaluation
    save_every: int = 500  # steps between checkpoints (also at the end); 0 = only at the end
    keep_last: int = 2  # step_* checkpoints kept on disk
    resume: str = "auto"  # auto = newest complete checkpoint in out_dir | never | path to a step_* dir
    logger: str = "none"  # none | wandb | swanlab | tensorboard
    run_name: str = ""  # name for the external logger (default: out_dir's name)


# -----------------------------------------------------------------------------
# Small helpers


def print0(*args, **kwargs):
    """Print on rank 0 only (every process runs the same code under torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# Dense bf16 peak FLOP/s per GPU, for MFU. Unknown GPUs get no MFU rather than a wrong one.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                  "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12, "V100": 125e12}


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention's 12 * L * d * T
    (nanoGPT/PaLM). N counts tied embeddings once, which stands for the lm_head matmul."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    if getattr(cfg, "use_moe", False):  # only the experts a token visits do work
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_params -= cfg.num_hidden_layers * per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def byte_level_alphabet() -> dict:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in: printable
    bytes map to themselves, the others to code points 256 and up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens): turns a loss in nats/token into bits/byte,
    which compares models with different tokenizers."""
    byte_of = {c: b for b, c in byte_level_alphabet().items()}
    special = set(tokenizer.all_special_ids)
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, idx in tokenizer.get_vocab().items():
        if idx not in special and idx < len(lengths):
            lengths[idx] = sum(1 for c in token if c in byte_of)
    return lengths


class NullLogger:
    """Stands in for wandb/swanlab/tensorboard when none is asked for (nanochat's DummyWandb)."""

    def log(self, values: dict, step: int):
        pass

    def finish(self):
        pass


class ExternalLogger:
    def __init__(self, kind: str, project: str, run_name: str, config: dict, log_dir: str):
        self.kind = kind
        if kind == "wandb":
            import wandb
            self.run = wandb.init(project=project, name=run_name, config=config)
        elif kind == "swanlab":
            import swanlab
            self.run = swanlab.init(project=project, experiment_name=run_name, config=config)
        elif kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.run = SummaryWriter(log_dir)
        else:
            raise ValueError(f"logger must be none, wandb, swanlab or tensorboard, got '{kind}'")

    def log(self, values: dict, step: int):
        if self.kind == "tensorboard":
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.run.add_scalar(key, value, step)
        else:
            self.run.log(values, step=step)

    def finish(self):
        self.run.close() if self.kind == "tensorboard" else self.run.finish()


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. a NaN loss); the message says where the last good state is."""


# -----------------------------------------------------------------------------
# Batches over an indexable dataset, resumable to the exact sample (chat and preference stages)


class IndexBatches:
    """Yields, for each optimizer step, this rank's micro-batches of dataset indices.

    Each epoch walks a permutation seeded by (seed, epoch); a step takes the next `global_batch` indices, and
    rank r takes its contiguous slice, cut into micro-batches. The position (epoch, cursor) is global, so
    resuming reproduces the same batches, also with another number of processes."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, collate=None):
        if len(dataset) < global_batch:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch ({global_batch})")
        self.dataset, self.collate = dataset, collate
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)
        self.shard_done = False  # interface parity with ShardStream

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_step(self) -> list:
        if self.cursor + self.global_batch > len(self._order):  # drop the ragged tail of an epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        ids = self._order[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        rows = self.global_batch // self.world_size
        mine = ids[self.rank * rows:(self.rank + 1) * rows]
        micro = [mine[i:i + self.micro_batch] for i in range(0, rows, self.micro_batch)]
        return [self.collate([self.dataset[int(i)] for i in m]) for m in micro]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


# -----------------------------------------------------------------------------
# The Trainer


class Trainer:
    Config = TrainConfig
    stage = "train"  # used in log lines and checkpoint metadata
    # parallel=fsdp needs every rank to run the same forwards: stages that generate (different lengths per rank)
    # or train adapters keep it off; the ones that set it True are tested against one process.
    supports_fsdp = False

    # ---- hooks a stage overrides ------------------------------------------------------------------
    def build_data(self) -> None:
        raise NotImplementedError

    def batch_weight(self, batch) -> int:
        """Items this micro-batch contributes to the step's mean: valid (non -100) next-token labels."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(self, batch, num_items) -> tuple[torch.Tensor, dict]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         labels=batch["labels"], num_items_in_batch=num_items, loss_chunk=self.cfg.loss_chunk)
        return out.loss, {}

    def batch_tokens(self, batch) -> int:
        """Tokens processed (for tokens/s)."""
        return batch["input_ids"].numel()

    def setup(self) -> None:
        """Extra models or state (reference model, reward model, ...), after the policy is built."""

    # ---- data helpers for stages whose samples sit in memory (chat, preference pairs) ------------------
    def split_held_out(self, samples: list, n_val: int) -> tuple[list, list]:
        """(train, val): the held-out split is drawn by seed, the same on every rank and on resume."""
        order = np.random.default_rng(self.cfg.seed).permutation(len(samples))
        return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]

    def use_datasets(self, train, val, collate) -> None:
        """Train through IndexBatches (exact resume) and evaluate on up to eval_batches micro-batches of val."""
        self.train_data = IndexBatches(train, self.global_batch, self.micro_batch, self.rank, self.world_size,
                                       self.cfg.seed, collate)
        rows = min(len(val), self.cfg.eval_batches * self.micro_batch) if val is not None else 0
        self.val_batches = [collate([val[j] for j in range(i, min(i + self.micro_batch, rows))])
                            for i in range(0, rows, self.micro_batch)] or None

    def trainable_parameters(self):
        return [p for p in self.raw_model.parameters() if p.requires_grad]

    def should_save(self) -> bool:
        return self.cfg.save_every > 0 and self.step % self.cfg.save_every == 0

    def on_eval(self) -> None:
        """After each evaluation (pretraining prints greedy samples here)."""

    # ---- setup ---------------------------------------------------------------------------------------
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
        if self.ddp:
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
            if backend == "nccl":
                torch.cuda.set_device(self.device)
        else:
            self.rank, self.world_size = 0, 1
            self.device = resolve_device(cfg.device)
        self.master = self.rank == 0
        if cfg.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got '{cfg.parallel}'")
        self.fsdp = self.ddp and cfg.parallel == "fsdp"
        if cfg.parallel == "fsdp" and not self.ddp:
            print0(f"[{self.stage}] parallel=fsdp: one process has nothing to shard over; training unsharded")
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.fsdp:  # fail before anything is built
            self._check_fsdp()
        self.autocast = autocast_context(self.device, self.dtype)
        # fp16 overflows without loss scaling; bf16 and fp32 do not need it.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self._seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.step, self.tokens_seen = 0, 0
        self.logger = NullLogger()

    def _seed(self, seed: int):
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.cfg.init_from:  # checked first, so a typo in init_from is not reported as a missing tokenizer
            check_checkpoint_dir(self.cfg.init_from, "init_from")
        path = self.cfg.init_from if _has_tokenizer(self.cfg.init_from) else self.cfg.tokenizer_dir
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer_dir '{self.cfg.tokenizer_dir}' does not exist: train one with "
                                    f"`python main.py --stage tokenizer` or point tokenizer_dir at one")
        return AutoTokenizer.from_pretrained(path)

    def build_model(self):
        """Random init from model_config, or the weights (and architecture) of init_from."""
        from model import SLMConfig, SLMForCausalLM

        if self.cfg.init_from:
            return load_pretrained(self.cfg.init_from)  # fp32 master weights; autocast gives the compute dtype
        config = SLMConfig.from_preset(self.cfg.model_config)
        return SLMForCausalLM(config)

    def prepare(self):
        """Build everything; after this, fit() can run. Separate from __init__ so tests can poke at parts."""
        cfg = self.cfg
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no tqdm bars from save/load inside the loop
        self.tokenizer = self.load_tokenizer()
        self.raw_model = self.build_model().to(self.device)
        if cfg.gradient_checkpointing:
            self.raw_model.activation_checkpointing_enable()
        if cfg.seq_len > self.raw_model.config.max_position_embeddings:
            raise ValueError(f"seq_len={cfg.seq_len} is over the model's max_position_embeddings="
                             f"{self.raw_model.config.max_position_embeddings}")
        self.setup()
        self.micro_batch = self._resolve_micro_batch()
        self.global_batch = cfg.global_batch_size or self.micro_batch * self.world_size
        if self.global_batch % (self.micro_batch * self.world_size) != 0:
            raise ValueError(f"global_batch_size={self.global_batch} must be a multiple of batch_size x processes "
                             f"= {self.micro_batch} x {self.world_size}")
        self.accum_steps = self.global_batch // (self.micro_batch * self.world_size)
        self.val_batches = None
        self.build_data()
        self.model_class_name = type(self.raw_model).__name__
        if self.fsdp:
            self._shard_model()  # before the optimizer, which must hold the sharded parameters
        self.optimizer = self._build_optimizer()
        self.model = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.ddp and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: our only buffers are RoPE frequencies, the same on every rank, and DDP
            # would otherwise broadcast them before every forward.
            self.model = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                                 else None, broadcast_buffers=False)
        self.peak_flops = gpu_peak_flops(self.device)
        self.flops_per_token = flops_per_token(self.raw_model, cfg.seq_len)
        if self.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
        self._maybe_resume()
        if self.master and cfg.logger != "none":
            from trainer.config import config_to_dict
            self.logger = ExternalLogger(cfg.logger, "milli-chat", cfg.run_name or os.path.basename(cfg.out_dir),
                                         config_to_dict(cfg), cfg.out_dir)
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        n_train = sum(p.numel() for p in self.trainable_parameters())
        print0(f"[{self.stage}] config:\n{format_config(cfg)}")
        print0(f"[{self.stage}] {n_params:,} parameters ({n_train:,} trainable) | device {self.device} | dtype "
               f"{dtype_name(self.dtype)} | processes {self.world_size} | micro-batch "
               f"{self.micro_batch} x accum {self.accum_steps} = global batch {self.global_batch}")

    def _check_fsdp(self):
        if not self.supports_fsdp:
            raise ValueError(f"parallel=fsdp is built for the pretrain and sft stages; use parallel=ddp for "
                             f"{self.stage}")
        if self.dtype == torch.float16:
            raise ValueError("parallel=fsdp needs bf16 or fp32 (fp16's loss scaling would have to agree across "
                             "shards); use dtype=bf16 or parallel=ddp")
        if self.cfg.batch_size == "auto":
            raise ValueError("parallel=fsdp needs an explicit batch_size (the probe runs on one unsharded GPU)")

    def _shard_model(self):
        """FSDP2: each decoder layer is one unit (its weights are gathered just before it runs and freed after),
        the root holds the embeddings, final norm and head. Every rank starts from rank 0's weights, as DDP does."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():
            for tensor in list(self.raw_model.parameters()) + list(self.raw_model.buffers()):
                dist.broadcast(tensor, src=0)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in self.raw_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.raw_model, mesh=mesh)

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
        """Double the micro-batch until a forward+backward runs out of memory; keep the last that fit,
        halved once more for headroom (optimizer state and fragmentation come later). The global batch must
        stay divisible, so only powers of two are tried."""
        target = (self.cfg.global_batch_size // self.world_size) if self.cfg.global_batch_size else 512  # per rank
        best, trial = 1, 1
        vocab = self.raw_model.config.vocab_size
        while trial <= target:
            try:
                ids = torch.randint(0, vocab, (trial, self.cfg.seq_len), device=self.device)
                with self.autocast:
                    loss = self.raw_model(input_ids=ids, labels=ids).loss
                loss.backward()
                best = trial
                trial *= 2
            except torch.OutOfMemoryError:
                break
            finally:
                self.raw_model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        best = max(1, best // 2) if best < target else best
        print0(f"[{self.stage}] batch_size=auto: micro-batch {best} (largest power of two that fit, with headroom)")
        return best

    def _build_optimizer(self):
        # Names decide the groups (trainer/optim.py); a parameter outside the policy model (PPO's value head)
        # has none and goes to AdamW.
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        named = [(names.get(id(p), f"extra.{i}"), p) for i, p in enumerate(self.trainable_parameters())]
        return build_optimizer(named, self.cfg, self.device)

    # ---- schedule ---------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        min_lr = cfg.lr * cfg.min_lr_ratio
        if cfg.lr_schedule == "wsd":
            decay_start = int(cfg.max_steps * (1 - cfg.decay_ratio))
            if step < decay_start:
                return cfg.lr
            progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
            return cfg.lr + (min_lr - cfg.lr) * progress
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
        raise ValueError(f"lr_schedule must be cosine, wsd or constant, got '{cfg.lr_schedule}'")

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self):
        cfg = self.cfg
        self.model.train()
        step_times = []
        t_last = time.time()
        while True:
            last = self.step >= cfg.max_steps
            if last or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0 and self.step > 0):
                self.log_values(self.evaluate(), prefix="eval")
            if last:
                break
            metrics = self.train_step()
            self.step += 1
            t_now = time.time()
            step_times.append(t_now - t_last)
            t_last = t_now
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.log_step(metrics, step_times)
            if (self.should_save() or self.train_data.shard_done) and self.step < cfg.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        self.export_final()
        self.logger.finish()

    def train_step(self) -> dict:
        """One optimizer step: accumulate over micro-batches, clip, update. Returns tensors to log."""
        micro_batches = self.next_step()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:  # each group's peak lr is lr_scale x cfg.lr (trainer/optim.py)
            group["lr"] = lr * group["lr_scale"]
        # Weight every valid item of the whole step (all micro-batches, all ranks) equally.
        num_items = torch.tensor(float(sum(self.batch_weight(b) for b in micro_batches)), device=self.device)
        if self.ddp:
            dist.all_reduce(num_items)
        num_items = num_items.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        extra = {}
        tokens = 0
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            sync = i == len(micro_batches) - 1
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs.
            # FSDP reduce-scatters every micro-batch instead, so only a shard of the gradients is ever kept.
            ctx = self.model.no_sync() if self.ddp and not self.fsdp and not sync else nullcontext()
            with ctx:
                with self.autocast:
                    loss, metrics = self.compute_loss(batch, num_items)
                # DDP and FSDP average gradients over ranks; our loss is already a share of the global total,
                # so multiply by the number of ranks to turn that average back into the sum.
                self.scaler.scale(loss * self.world_size).backward()
            loss_sum += loss.detach()
            for key, value in metrics.items():
                extra[key] = extra.get(key, 0) + value.detach().float() / len(micro_batches)
            tokens += self.batch_tokens(batch)
        self.scaler.unscale_(self.optimizer)
        params = self.trainable_parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else 1e30)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced over the shards
            grad_norm = grad_norm.full_tensor()
        if self.ddp:
            dist.all_reduce(loss_sum)
        if not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._stop_on_nonfinite(float(loss_sum), float(grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += tokens * self.world_size
        self._step_tokens = tokens * self.world_size
        return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, **extra}

    def next_step(self) -> list:
        """This rank's micro-batches for the next optimizer step (RL stages generate rollouts here)."""
        return self.train_data.next_step()

    def to_device(self, batch):
        if isinstance(batch, dict):
            return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for v in batch)
        return batch

    def _stop_on_nonfinite(self, loss: float, grad_norm: float):
        # The weights have not been updated by this step, so they are the last good state: save them. The data
        # position is already past the offending batch, so a resumed run skips it.
        path = self.save_checkpoint()
        raise TrainingStopped(f"[{self.stage}] loss {loss} / grad norm {grad_norm} is not finite at step "
                              f"{self.step + 1}; the last good state (step {self.step}) is saved in {path}. "
                              f"Lower lr, raise warmup_steps, or check the data, then resume.")

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
            batch = self.to_device(self.val_batches[min(index, len(self.val_batches) - 1)])
            n = self.batch_weight(batch) if index < len(self.val_batches) else 0
            with self.autocast:
                loss, metrics = self.compute_loss(batch, torch.tensor(float(max(n, 1)), device=self.device))
            loss_sum += loss.float() * n
            items += n
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0) + value.detach().float() * n
        if self.ddp:
            dist.all_reduce(loss_sum)
            dist.all_reduce(items)
            for value in metric_sums.values():
                dist.all_reduce(value)
        self.model.train()
        result = {"loss": float(loss_sum / items.clamp(min=1))}
        result.update({key: float(value / items.clamp(min=1)) for key, value in metric_sums.items()})
        result.update(self.extra_eval_metrics(result))
        self.on_eval()
        return result

    def extra_eval_metrics(self, result: dict) -> dict:
        return {}

    # ---- logging -------------------------------------------------------------------------------------------
    def log_step(self, metrics: dict, step_times: list):
        cfg = self.cfg
        values = {k: float(v) for k, v in metrics.items()}  # .item() syncs with the GPU: only at log steps
        recent = step_times[-cfg.log_every:]
        dt = sum(recent) / len(recent)
        tok_per_s = self._step_tokens / dt
        steady = step_times[3:] or step_times  # leave out compile/warm-up steps from the ETA
        eta_min = (cfg.max_steps - self.step) * (sum(steady) / len(steady)) / 60
        values.update({"tok_per_s": tok_per_s, "dt_ms": dt * 1000, "tokens_seen": self.tokens_seen})
        line = (f"[{self.stage}] step {self.step:05d}/{cfg.max_steps:05d} | loss {values['loss']:.4f} | lr "
                f"{values['lr']:.2e} | gnorm {values['grad_norm']:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f}")
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * tok_per_s / (self.peak_flops * self.world_size)
            line += f" | mfu {100 * values['mfu']:.1f}%"
        for key in metrics:
            if key not in ("loss", "lr", "grad_norm"):
                line += f" | {key} {values[key]:.4f}"
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
            print0(f"[{self.stage}] step {self.step:05d} {prefix}: " + " | ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def full_model_state(self) -> dict | None:
        """The whole state dict on rank 0 (None elsewhere). Under FSDP gathering the shards is collective: every
        rank must call this."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
            return state if self.master else None
        return self.raw_model.state_dict() if self.master else None

    def full_optimizer_state(self) -> dict | None:
        """Rank 0's optimizer state. Under FSDP it is gathered and keyed by parameter name (collective)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            state = get_optimizer_state_dict(self.raw_model, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state if self.master else None
        return self.optimizer.state_dict() if self.master else None

    def save_pretrained_to(self, path: str, dtype: torch.dtype | None = None, state: dict | None = None):
        """Weights (+ config) and the tokenizer into `path`, loadable with from_pretrained alone. `state` is the
        full state dict (from full_model_state) where the model is sharded."""
        model = self.raw_model  # never the compiled/DDP wrapper, so no `_orig_mod.` / `module.` prefixes
        if state is None:
            state = model.state_dict()
        if model.config.tie_word_embeddings:  # one copy of a tied matrix (a gathered or cast state has two)
            tied = getattr(model, "_tied_weights_keys", None) or {}
            state = {k: v for k, v in state.items() if k not in tied}
        if dtype is not None and dtype != torch.float32:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.save_pretrained(path, state_dict=state)
        if self.fsdp:  # save_pretrained names the class it was called on, here FSDP's wrapper subclass
            model.config.architectures = [self.model_class_name]
            model.config.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def save_checkpoint(self) -> str:
        """step_NNNNNN/: weights + tokenizer + trainer_state.pt, written to a .tmp dir then renamed."""
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rngs = [None] * self.world_size
        if self.ddp:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        weights, optimizer = self.full_model_state(), self.full_optimizer_state()  # collective under FSDP
        path = os.path.join(self.cfg.out_dir, f"step_{self.step:06d}")
        if self.master:
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.save_pretrained_to(tmp, state=weights)
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "stage": self.stage,
                     "optimizer": optimizer, "optimizer_by_name": self.fsdp, "scaler": self.scaler.state_dict(),
                     "data": self.train_data.state_dict(), "rng": rngs, "world_size": self.world_size,
                     "global_batch": self.global_batch, "extra": self.extra_state()}
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            with open(os.path.join(self.cfg.out_dir, "latest.tmp"), "w") as f:
                f.write(os.path.basename(path) + "\n")
            os.replace(os.path.join(self.cfg.out_dir, "latest.tmp"), os.path.join(self.cfg.out_dir, "latest"))
            self._prune_checkpoints()
            print0(f"[{self.stage}] saved {path}")
        if self.ddp:
            dist.barrier()
        return path

    def extra_state(self) -> dict:
        """Stage-specific state to checkpoint (e.g. a value head's optimizer)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def _prune_checkpoints(self):
        steps = sorted(glob.glob(os.path.join(self.cfg.out_dir, "step_[0-9]*[0-9]")))
        for old in steps[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def export_final(self):
        """final/: weights only, in the training dtype (bf16 on GPU), the `init_from` of the next stage."""
        weights = self.full_model_state()  # collective under FSDP
        if not self.master:
            return
        path = os.path.join(self.cfg.out_dir, "final")
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_pretrained_to(tmp, dtype=self.dtype if self.dtype != torch.float16 else torch.bfloat16,
                                state=weights)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        print0(f"[{self.stage}] final weights in {path}{self.next_stage_hint(path)}")

    def next_stage_hint(self, path: str) -> str:
        """How the next stage uses final/ (a LoRA adapter is not a full model: that stage says so itself)."""
        return f" (next stage: init_from={path})"

    def _maybe_resume(self):
        cfg = self.cfg
        if cfg.resume == "never":
            return
        candidates = ([cfg.resume] if cfg.resume != "auto" else
                      sorted(glob.glob(os.path.join(cfg.out_dir, "step_[0-9]*[0-9]")), reverse=True))
        for path in candidates:
            try:
                state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
                weights = self.read_checkpoint_weights(path)
            except Exception as e:  # a torn or partial checkpoint: never load it, try the one before
                if cfg.resume != "auto":
                    raise
                print0(f"[{self.stage}] WARNING: skipping unreadable checkpoint {path} ({type(e).__name__}: {e})")
                continue
            self._restore(path, state, weights)
            return

    def read_checkpoint_weights(self, path: str) -> dict:
        """The weights that save_pretrained_to wrote into a step_* dir (a stage that saves other files, e.g.
        only a LoRA adapter, overrides this and load_checkpoint_weights). Read before anything is restored, so
        a torn checkpoint is skipped whole."""
        from safetensors.torch import load_file

        return load_file(os.path.join(path, "model.safetensors"))

    def load_checkpoint_weights(self, path: str, weights: dict) -> None:
        if self.fsdp:  # every rank read the whole file; each keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            missing, unexpected = set_model_state_dict(self.raw_model, weights, options=StateDictOptions(
                full_state_dict=True, strict=False))
        else:
            missing, unexpected = self.raw_model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not self.raw_model.config.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")

    def _restore(self, path: str, state: dict, weights: dict):
        self.load_checkpoint_weights(path, weights)
        self._load_optimizer_state(state)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if state["global_batch"] != self.global_batch:
            print0(f"[{self.stage}] WARNING: global batch changed from {state['global_batch']} to "
                   f"{self.global_batch}; the data position stays exact in tokens but the run is no longer the same")
        self.train_data.load_state_dict(state["data"])
        self.load_extra_state(state.get("extra", {}))
        rngs = state["rng"]
        if len(rngs) == self.world_size:  # same layout: every rank gets its own generator state back
            rng = rngs[self.rank]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:  # another number of processes: reseed deterministically from the step
            self._seed(self.cfg.seed + self.step)
        self._truncate_metrics()
        print0(f"[{self.stage}] resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def _load_optimizer_state(self, state: dict):
        """Optimizer state from a checkpoint written with or without FSDP, into a run with or without it. FSDP
        checkpoints key it by parameter name, others by position; convert where the two differ."""
        saved = state["optimizer"]
        by_name = state.get("optimizer_by_name", False)
        if not self.fsdp and not by_name:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:  # positions follow the optimizer's groups, which list parameters in model order
            names = {id(p): n for n, p in self.raw_model.named_parameters()}
            position = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
            saved = {"state": {position[i]: v for i, v in saved["state"].items()},
                     "param_groups": [{**g, "params": [position[i] for i in g["params"]]}
                                      for g in saved["param_groups"]]}
        set_optimizer_state_dict(self.raw_model, self.optimizer, optim_state_dict=saved,
                                 options=StateDictOptions(full_state_dict=True))

    def _truncate_metrics(self):
        """Drop metrics logged after the checkpoint we resume from, so the file reads as one clean run."""
        path = os.path.join(self.cfg.out_dir, "metrics.jsonl")
        if not self.master or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(keep)


def _has_tokenizer(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "tokenizer.json"))


def run_trainer(trainer_cls, cfg) -> Trainer:
    """What a stage's run(cfg) calls: build, train, and tear down the process group."""
    trainer = trainer_cls(cfg)
    try:
        trainer.prepare()
        trainer.fit()
    finally:
        if trainer.ddp and dist.is_initialized():
            dist.destroy_process_group()
    return trainer
