"""
Weight-only int8 / int4 quantization of a model's linear layers, for CPU (or small-GPU) inference.

    from model.quantize import quantize_model
    model = quantize_model(model, "int8")            # or "int4" (group_size=32); "none" leaves the model alone
    Engine.from_pretrained(path, quantize="int8")    # what chat_terminal.py / serve_api.py --quantize use

Every nn.Linear except those named in `skip` (default: lm_head) becomes a QuantLinear that keeps its weight as
integers plus float scales and dequantizes on the fly; activations stay in float (weight-only, like llama.cpp's
q8_0/q4_0 and torchao's int8/int4 weight-only). Embeddings and norms stay in float.
- int8: one scale per output row (symmetric, 127 levels). On CPU the matmul runs in torch's int8-weight kernel
  (aten._weight_int8pack_mm), so the float weight is never rebuilt.
- int4: one scale per `group_size` input columns of each row (symmetric, -8..7), two values packed per byte.
  The group is rebuilt in float for each forward: ~7x less weight memory than fp32, but not faster.
Quantization is for inference only: a quantized model has no trainable weights and is never saved. It is refused
on CUDA: there int8 would rebuild every float weight on each forward (torch's int8-weight kernel used here is the CPU
one) and int4 always does, which is slower than plain bf16/fp16; GPU users get low-bit inference from llama.cpp with
a GGUF export (q8_0/q4_0) instead.
"""

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "int4")


# -----------------------------------------------------------------------------
# The quantized layer


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored as int8 (per-row scales) or packed int4 (per-group scales)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 32):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits = bits
        w = linear.weight.detach().float()  # (out, in); scales are computed in fp32 whatever the model dtype
        dtype = linear.weight.dtype
        if bits == 8:
            self.group_size = self.in_features  # one group = one whole row
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        else:
            if self.in_features % group_size != 0 or group_size % 2 != 0:
                raise ValueError(
                    f"int4 needs in_features ({self.in_features}) divisible by an even group_size ({group_size})"
                )
            self.group_size = group_size
            groups = w.view(self.out_features, -1, group_size)  # (out, in/g, g)
            scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / 7  # (out, in/g)
            q = torch.round(groups / scale[..., None]).clamp(-8, 7).to(torch.int8).view(self.out_features, -1)
            q = (q + 8).to(torch.uint8)  # 0..15
            q = q[:, 0::2] | (q[:, 1::2] << 4)  # (out, in/2): even column in the low nibble, odd in the high
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def dequantize(self) -> torch.Tensor:
        """The float weight (out, in) this layer stands for, in the scales' dtype."""
        if self.bits == 8:
            return self.qweight.to(self.scale.dtype) * self.scale[:, None]
        low, high = self.qweight & 0x0F, self.qweight >> 4
        q = torch.stack((low, high), dim=-1).view(self.out_features, -1, self.group_size)  # (out, in/g, g)
        return ((q.to(self.scale.dtype) - 8) * self.scale[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8 and x.device.type == "cpu":
            # int8 weight kernel: x (M, in) float, weight (out, in) int8, per-row scales in x's dtype.
            flat = x.reshape(-1, self.in_features).to(self.scale.dtype).contiguous()
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale).view(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )


# -----------------------------------------------------------------------------
# Whole models


def check_quantize_device(mode: str, device: torch.device | str) -> None:
    """Weight-only quantization is a CPU feature here (see the module docstring): refuse it elsewhere, saying what
    to use instead."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got '{mode}'")
    if mode != "none" and torch.device(device).type != "cpu":
        raise ValueError(
            f"quantize={mode} runs on the CPU only: on {torch.device(device).type} it would dequantize "
            f"every weight on each forward (slower than no quantization). Use quantize=none (the GPU "
            f"runs bf16/fp16), or export GGUF q8_0/q4_0 (scripts/export_gguf.py) for llama.cpp"
        )


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 32, skip: tuple = ("lm_head",)) -> nn.Module:
    """Replace (in place) every nn.Linear whose name's last part is not in `skip` by a QuantLinear; returns model.

    lm_head is skipped by default: it is tied to the embedding in our models, and its rounding error lands
    directly on every logit. mode: "none" | "int8" | "int4"."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got '{mode}'")
    if mode == "none":
        return model
    bits = 8 if mode == "int8" else 4
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(linear, bits, group_size))
    model.requires_grad_(False)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (the memory a forward pass streams through)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:  # tied weights count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


__all__ = ["MODES", "QuantLinear", "check_quantize_device", "quantize_model", "weight_bytes"]
