"""
The optimizer every stage trains with: AdamW, or Muon for the hidden matrices with AdamW for the rest.

    optimizer=adamw   AdamW on everything; decay on matrices (embeddings, projections), never on norms or biases
    optimizer=muon    Muon (momentum orthogonalised by Newton-Schulz, torch.optim.Muon) on the 2-D hidden matrices:
                      attention q/k/v/o and MLP gate/up/down projections, MoE experts included. AdamW keeps the
                      embedding, the output head (tied or not), norms, biases, the MoE router, LoRA adapters and any
                      parameter outside the policy model (e.g. PPO's value head), as nanochat and modded-nanogpt do.

Learning rates. Muon's step is an orthogonal matrix whose entries have RMS ~ 1/sqrt(max(out, in)); torch's Muon
scales its lr per matrix by 0.2 * sqrt(max(out, in)) (adjust_lr_fn="match_rms_adamw", from Moonlight, "Muon is
Scalable for LLM Training"), which gives every matrix, whatever its shape or the model's width, an update of RMS
0.2 x lr: the RMS of a steady-state AdamW step. An AdamW step early in training is closer to lr itself (m/sqrt(v)
starts near +-1), so at our run lengths the matrices need a larger lr: muon_lr_ratio x lr. How much larger falls
as runs grow (bench/bench_recipe.py; the sweep is in bench/RESULTS.md, "Learning rates: the sweep"), so
TrainConfig's default of 10 suits short runs and the pretraining configs set 5. The AdamW groups keep lr. Keller
Jordan's and nanochat's sqrt(max(1, out/in)) instead ties the update's RMS to the width and needs a Muon lr tuned
per model size; match_rms_adamw lets one ratio serve every preset.

Parallel runs: under DDP every rank orthogonalises every matrix from the same all-reduced gradient, so all ranks
take the same step (nanochat's DistMuon splits that work by matrix instead; not needed at our sizes). Under FSDP a
rank holds only a shard of each matrix and Newton-Schulz needs the whole of it: optimizer=muon is refused there.

Cost (BatchedMuon). torch.optim.Muon steps one matrix at a time, ~25 ops each (15 of them Newton-Schulz matmuls):
~1,300 ops for the `small` preset's 56 matrices, every one a kernel launch on a GPU. Here the matrices of one shape
(a dense model has 4: q/o, k/v, gate/up, down) are stacked into one (n, rows, cols) tensor and stepped together
with batched matmuls, as modded-nanogpt and nanochat do: ~30 ops per shape. Newton-Schulz runs in the fastest
dtype that is exact enough on the device (model/runtime.newton_schulz_dtype): bf16 on Ampere and later GPUs and
on CPUs with native bf16, fp16 on older GPUs, fp32 on other CPUs, where bf16 matmuls are emulated and 20x slower.

Skipped steps without a host read (trainer/guard.py): fused AdamW skips a step whose gradients overflowed on a
device flag inside its kernel, and BatchedMuon does the same for the Muon half, so MuonWithAdamW tells GradScaler
and the StepGuard it can skip by itself (`_step_supports_amp_scaling`) and the loop never waits for the GPU to
decide. AdamW is fused wherever torch has the kernel (CUDA, CPU, MPS: model/runtime.py fuses_adamw), so the CPU
tests run the optimizer a GPU gets.

Each param group carries `lr_scale`, its peak lr as a multiple of cfg.lr; the Trainer sets
group["lr"] = lr_at(step) * group["lr_scale"] every step, so warmup and decay apply to every group alike.
"""

import math

import torch
from torch.distributed.tensor import DTensor
from torch.optim._muon import _adjust_lr

from model.runtime import fuses_adamw, newton_schulz_dtype_for
from trainer.config import OPTIMIZERS, TrainConfig

# -----------------------------------------------------------------------------
# Which parameter goes where, decided by name (the HF/Llama module names of model/model_slm.py)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D projection inside a decoder layer: q/k/v/o_proj, gate/up/down_proj, also in every (shared) expert.
    Not the router (mlp.gate.weight, one row per expert: a classifier, not a hidden map) and not LoRA's rank-r
    adapters (named ...q_proj.lora_A.weight)."""
    return param.ndim == 2 and ".layers." in name and name.endswith("_proj.weight")


def is_embedding(name: str) -> bool:
    """The token embedding or the output head (one tensor when tied), or LoRA's trained rows of them."""
    return name.endswith(("embed_tokens.weight", "lm_head.weight", "trainable_tokens_delta"))


def split_parameters(
    named_params: list[tuple[str, torch.Tensor]], optimizer: str, decay_embeddings: bool = True
) -> dict[str, list[str]]:
    """{"muon": [...], "decay": [...], "no_decay": [...]}: parameter names per group. "decay" is AdamW with weight
    decay (matrices: embeddings, head, router, adapters), "no_decay" AdamW without (norms, biases, other vectors;
    the embedding and head too when decay_embeddings is false)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    groups = {"muon": [], "decay": [], "no_decay": []}
    for name, param in named_params:
        if optimizer == "muon" and is_hidden_matrix(name, param):
            groups["muon"].append(name)
        elif param.dim() >= 2 and (decay_embeddings or not is_embedding(name)):
            groups["decay"].append(name)
        else:
            groups["no_decay"].append(name)
    return groups


# -----------------------------------------------------------------------------
# Muon and AdamW as one torch.optim.Optimizer


def orthogonalize(update: torch.Tensor, ns_coefficients: tuple, ns_steps: int, eps: float, dtype: torch.dtype):
    """Newton-Schulz on a stack of same-shape matrices (n, rows, cols) at once: torch's _zeropower_via_newtonschulz
    with batched matmuls (3 per iteration for the whole stack, not 3 per matrix), in `dtype` (the runtime policy's
    newton_schulz_dtype). Each matrix is scaled to Frobenius norm 1 *before* the cast, so its spectral norm is <= 1
    and every value fits fp16 too (torch casts first: in bf16 that differs only by rounding, in fp16 it would flush
    small gradients to zero). Returns the stack in `dtype`."""
    a, b, c = ns_coefficients
    x = update / update.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius norm >= spectral norm
    x = x.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side, so that the Gram matrix x @ x^T is the smaller of the two
        x = x.mT
    for _ in range(ns_steps):
        gram = torch.bmm(x, x.mT)  # (n, r, r), r = min(rows, cols)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    return x.mT if tall else x


def muon_step_stacked(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_bufs: list[torch.Tensor],
    group: dict,
    ns_dtype: torch.dtype,
    skip: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
) -> None:
    """One Muon step (torch's _single_tensor_muon) for matrices that all have one shape, done on their stack:
    a dozen element-wise ops and 3 x ns_steps matmuls for the whole stack, whatever its length. The new weights
    and momentum are computed out of place and written back in one foreach copy each; with a skip flag, torch.where
    keeps the old values of a skipped step (a 0 x update mask would not do: an overflowed gradient is inf, and
    0 x inf is NaN). The price is memory while it runs: ~6 copies of the stack (small's 16 gate/up matrices: 46 MB
    each), freed before the next shape."""
    lr, momentum = group["lr"], group["momentum"]
    grad = torch.stack(grads)  # (n, rows, cols): a copy, the .grad tensors stay as they were
    if grad_scale is not None:  # GradScaler.step without unscale_: the gradients still carry the scale
        grad.div_(grad_scale)
    old_buf, old_param = torch.stack(momentum_bufs), torch.stack(params)
    buf = old_buf.lerp(grad, 1 - momentum)  # momentum * buf + (1 - momentum) * grad
    update = grad.lerp_(buf, momentum) if group["nesterov"] else buf  # in place: grad is our own copy
    ortho = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], ns_dtype)
    param = old_param * (1 - lr * group["weight_decay"])  # decoupled weight decay
    param.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], params[0].shape))  # the same lr for the stack
    if skip is not None:
        buf, param = torch.where(skip, old_buf, buf), torch.where(skip, old_param, param)
    torch._foreach_copy_(momentum_bufs, buf.unbind(0))
    torch._foreach_copy_(params, param.unbind(0))


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon (its arguments, checks and state: one "momentum_buffer" per matrix) with a step built for
    GPUs: the matrices of one shape are stacked and stepped together (muon_step_stacked), so a step costs a few
    ops per distinct shape (4 in a dense model) instead of ~25 per matrix, each one a kernel launch on a GPU.
    Newton-Schulz runs in `ns_dtype` (model/runtime.newton_schulz_dtype: bf16, fp16 or fp32, whichever is fastest
    on the device); with ns_dtype=bf16 the numbers are torch's up to bf16 rounding (tests/test_optim.py).

    It skips a step on the device, as fused AdamW does: GradScaler and the StepGuard set two attributes before
    step(): `found_inf` (a 0-dim device tensor, > 0: skip this step) and `grad_scale` (the scale still on the
    gradients, or None once unscale_ ran). A skipped step leaves weights and momentum as they were without the host
    ever reading the flag. Muon keeps no step count."""

    _step_supports_amp_scaling = True

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype  # not in the param groups: a checkpoint resumes on any device with its own

    @torch.no_grad()
    def step(self, closure=None):
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        loss = None
        if closure is not None:
            if found_inf is not None or grad_scale is not None:
                raise RuntimeError("a closure cannot be used with a device-side skip (GradScaler refuses it too)")
            with torch.enable_grad():
                loss = closure()
        skip = None if found_inf is None else found_inf > 0
        for group in self.param_groups:
            params, grads, momentum_bufs = [], [], []
            self._init_group(group, params, grads, momentum_bufs)
            same_shape = {}  # (shape, dtype, device) -> indices, in parameter order
            for i, param in enumerate(params):
                same_shape.setdefault((param.shape, param.dtype, param.device), []).append(i)
            for indices in same_shape.values():
                muon_step_stacked(
                    [params[i] for i in indices],
                    [grads[i] for i in indices],
                    [momentum_bufs[i] for i in indices],
                    group,
                    self.ns_dtype,
                    skip,
                    grad_scale,
                )
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over some groups and torch.optim.AdamW over the others, seen from outside as one optimizer:
    GradScaler.unscale_/step, clip_grad_norm_, zero_grad and the lr schedule walk `param_groups`; checkpoints save
    one state_dict. The two inner optimizers hold the very same group dicts and state dict as this one, so a
    change made through either view (an lr set by the schedule, a state loaded from a checkpoint) is seen by both.
    A skip flag set on this optimizer (found_inf, grad_scale: see BatchedMuon) is passed on to both halves; the
    whole can skip on the device when its AdamW half can, i.e. when that is fused."""

    def __init__(
        self,
        muon_groups: list[dict],
        adamw_groups: list[dict],
        momentum: float,
        betas: tuple[float, float],
        fused: bool,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        self.muon = BatchedMuon(
            muon_groups, ns_dtype=ns_dtype, momentum=momentum, nesterov=True, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(adamw_groups, betas=betas, fused=fused)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self._step_supports_amp_scaling = getattr(self.adamw, "_step_supports_amp_scaling", False)
        self._share()
        self._built = True

    def _share(self) -> None:
        n_muon = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n_muon], self.param_groups[n_muon:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for half in (self.muon, self.adamw):
            half.grad_scale, half.found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            try:
                half.step()
            finally:
                del half.grad_scale, half.found_inf
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with the loaded ones
        self._share()

    def add_param_group(self, param_group: dict) -> None:
        # Only the constructor may add groups: a later one would reach neither inner optimizer.
        if getattr(self, "_built", False):
            raise NotImplementedError("MuonWithAdamW takes its groups at construction")
        super().add_param_group(param_group)


# -----------------------------------------------------------------------------
# What the Trainer calls


def build_optimizer(
    named_params: list[tuple[str, torch.Tensor]], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer for these trainable (name, parameter) pairs, as cfg.optimizer asks. Every group carries
    `lr_scale` (its lr / cfg.lr) and starts at that share of cfg.lr."""
    groups = split_parameters(named_params, cfg.optimizer, cfg.decay_embeddings)
    by_name = dict(named_params)
    adamw_groups = [
        {"params": [by_name[n] for n in groups["decay"]], "weight_decay": cfg.weight_decay},
        {"params": [by_name[n] for n in groups["no_decay"]], "weight_decay": 0.0},
    ]
    for group in adamw_groups:
        group.update(lr=cfg.lr, lr_scale=1.0)
    if groups["muon"]:
        return keep_lr_scales(muon_with_adamw([(n, by_name[n]) for n in groups["muon"]], adamw_groups, cfg, device))
    # adamw, or nothing Muon could take (a LoRA stage trains only adapters). Fused wherever torch has the kernel: one
    # launch for all parameters on CUDA, and (on every device that fuses) a step skipped on a device flag instead of
    # a host read (trainer/guard.py).
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fuses_adamw(device))
    return keep_lr_scales(adamw)


def muon_with_adamw(
    named_matrices: list[tuple[str, torch.Tensor]], adamw_groups: list[dict], cfg: TrainConfig, device: torch.device
) -> MuonWithAdamW:
    """optimizer=muon: Muon for the hidden matrices at muon_lr_ratio x lr, AdamW (fused where torch has the kernel,
    as in build_optimizer) for the non-empty adamw_groups."""
    sharded = [n for n, p in named_matrices if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"optimizer=muon cannot run under parallel=fsdp: Newton-Schulz orthogonalises the whole "
            f"matrix, and FSDP gives each rank only a shard of it (e.g. {sharded[0]}). Use "
            f"parallel=ddp, or optimizer=adamw with fsdp"
        )
    muon_groups = [
        {
            "params": [p for _, p in named_matrices],
            "weight_decay": cfg.weight_decay,
            "lr": cfg.lr * cfg.muon_lr_ratio,
            "lr_scale": cfg.muon_lr_ratio,
        }
    ]
    return MuonWithAdamW(
        muon_groups,
        [g for g in adamw_groups if g["params"]],
        momentum=cfg.muon_momentum,
        betas=(cfg.beta1, cfg.beta2),
        fused=fuses_adamw(device),
        ns_dtype=newton_schulz_dtype_for(device),
    )


def keep_lr_scales(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Loading a checkpoint replaces the group dicts with the saved ones; put this run's lr_scale back, so the
    lrs follow the config of the run (a changed muon_lr_ratio applies on resume; a checkpoint from before lr_scale
    existed loads)."""
    scales = [group["lr_scale"] for group in optimizer.param_groups]

    def restore(opt: torch.optim.Optimizer) -> None:
        for group, scale in zip(opt.param_groups, scales):
            group["lr_scale"] = scale

    optimizer.register_load_state_dict_post_hook(restore)
    return optimizer


# -----------------------------------------------------------------------------
# The schedule


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): a linear warmup from 0, then cfg.lr_schedule's."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    schedule = LR_SCHEDULES.get(cfg.lr_schedule)
    if schedule is None:
        raise ValueError(f"lr_schedule must be cosine, wsd or constant, got '{cfg.lr_schedule}'")
    return schedule(cfg, step)


def cosine_lr(cfg: TrainConfig, step: int) -> float:
    """From lr down to lr x min_lr_ratio along half a cosine, from the end of the warmup to max_steps."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def wsd_lr(cfg: TrainConfig, step: int) -> float:
    """Warmup-stable-decay: lr until the last decay_ratio of the steps, then linearly down to lr x min_lr_ratio."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    decay_start = int(cfg.max_steps * (1 - cfg.decay_ratio))
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return cfg.lr + (min_lr - cfg.lr) * progress


def constant_lr(cfg: TrainConfig, step: int) -> float:
    return cfg.lr


LR_SCHEDULES = {"cosine": cosine_lr, "wsd": wsd_lr, "constant": constant_lr}  # TrainConfig.lr_schedule's choices
