"""
The step guard: an optimizer step whose loss or gradients are not finite is skipped on the device, counted, and
read by the host only on log and checkpoint steps, so the loop never waits for the GPU to decide.

fp16 needs this every few hundred steps: GradScaler multiplies the loss by a large scale so small gradients do
not flush to zero; when a gradient overflows, the step is skipped and the scale halved (GradScaler's own work).
bf16 and fp32 use the same guard with no scaling, so a non-finite loss never reaches the weights in any dtype.

What a skipped step does (GradScaler's semantics, as in every AMP loop): its data is consumed, and the step
counter and the lr schedule move on; only the weights and the optimizer state stay as they were. Not moving the
counter would need the host to know, i.e. a sync on every step. Training stops (Trainer.stop_if_diverged) on a
non-finite loss, which no scale can fix, or after `max_skipped_steps` skips in a row; both are noticed on the next
log or checkpoint step, at most log_every steps late. The state saved then is still good: every step since the
bad one was either skipped or a finite update.
"""

import torch

from model.runtime import scales_loss


class StepGuard:
    def __init__(self, device: torch.device, dtype: torch.dtype, init_scale: float = 2.0**16):
        # Loss scaling only for fp16: bf16 and fp32 have fp32's exponent range.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=scales_loss(dtype))
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = zero.clone()  # skipped steps of the whole run
        self.in_a_row = zero.clone()  # the current run of consecutive skips
        self.longest = zero.clone()  # the longest such run so far
        self.steps = zero.clone()  # guarded steps, to name the first one whose loss was not finite
        self.first_bad_loss = zero.clone()  # 0 = none yet

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size, before clipping (a no-op without fp16)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """optimizer.step() unless the loss or the (unscaled) gradient norm is not finite; any non-finite gradient
        makes the norm non-finite, so one flag covers both. Then the scale update and the counters."""
        loss_ok = torch.isfinite(loss)
        skip = ~(loss_ok & torch.isfinite(grad_norm))
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused AdamW and MuonWithAdamW (trainer/optim.py) skip on a device flag, as GradScaler.step drives them:
            # no sync. build_optimizer gives every stage such an optimizer on CUDA and CPU.
            optimizer.grad_scale, optimizer.found_inf = None, skip.float()
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
        elif not skip.item():  # an optimizer that cannot skip by itself (unfused AdamW): one sync per step
            optimizer.step()
        self.scaler.update()  # fp16: halve the scale after an overflow, grow it after growth_interval clean steps
        self.steps += 1
        self.skipped += skip
        self.in_a_row.copy_((self.in_a_row + 1) * skip)
        torch.maximum(self.longest, self.in_a_row, out=self.longest)
        first = (self.first_bad_loss == 0) & ~loss_ok
        self.first_bad_loss.copy_(torch.where(first, self.steps, self.first_bad_loss))

    def read(self) -> dict:
        """The counters on the host (one sync): for log lines, checkpoints and the stop decision."""
        values = {
            "skipped_steps": int(self.skipped),
            "longest_skip_run": int(self.longest),
            "first_bad_loss_step": int(self.first_bad_loss),
        }
        if self.scaler.is_enabled():
            values["loss_scale"] = float(self.scaler.get_scale())
        return values

    def log_values(self) -> dict:
        return {k: v for k, v in self.read().items() if k in ("skipped_steps", "loss_scale")}

    def stop_reason(self, *, max_skipped_steps: int, non_finite_weights: torch.Tensor | None = None) -> str | None:
        """Why training must stop, or None (reads the counters: one sync). non_finite_weights: a device count of
        the weight tensors holding a NaN or inf (non_finite_count), read in the same sync: a finite loss and
        gradient can still make an update that overflows (a huge lr), and such weights are no good state."""
        seen = self.read()
        if non_finite_weights is not None and int(non_finite_weights):
            return f"the weights are not finite at step {int(self.steps)} (an update overflowed: is lr too high?)"
        if seen["first_bad_loss_step"]:
            return f"loss is not finite at step {seen['first_bad_loss_step']}"
        if seen["longest_skip_run"] >= max_skipped_steps:
            return (
                f"{seen['longest_skip_run']} steps in a row were skipped for non-finite gradients "
                f"(max_skipped_steps={max_skipped_steps})"
            )
        return None

    def forget_runs(self) -> None:
        """After a stop: the saved state resumes with no skip run and no bad loss behind it (the user has changed
        something), instead of stopping again at once."""
        for counter in (self.in_a_row, self.longest, self.first_bad_loss):
            counter.zero_()

    def state_dict(self) -> dict:
        # `longest` is not saved: a checkpoint is written only while it is below max_skipped_steps, where only the
        # current run (in_a_row) can still decide a stop, so the resumed run decides as the straight one would.
        return {
            "scaler": self.scaler.state_dict(),
            "skipped": int(self.skipped),
            "in_a_row": int(self.in_a_row),
            "steps": int(self.steps),
        }

    def load_state_dict(self, state: dict) -> None:
        scaler = state.get("scaler", state)  # older checkpoints saved GradScaler's alone
        if scaler and self.scaler.is_enabled():  # a disabled scaler saves {} (an fp32/bf16 run)
            self.scaler.load_state_dict(scaler)
        for name in ("skipped", "in_a_row", "steps"):
            getattr(self, name).fill_(state.get(name, 0))
        self.longest.copy_(self.in_a_row)


def non_finite_count(tensors) -> torch.Tensor:
    """How many of `tensors` hold a NaN or inf, as a device scalar (no sync). A DTensor (FSDP) is counted by its
    local shard: the caller sums the counts over the ranks."""
    counts = [(~torch.isfinite(t.to_local() if hasattr(t, "to_local") else t.detach())).any() for t in tensors]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64)
