"""
Which attention kernel runs, decided before the call: a pure function of the device, dtype, mask and head counts.

    from model.attention import attention_plan, device_capability
    plan = attention_plan(device_capability(q.device), q.dtype, has_mask=False, is_causal=True,
                          n_heads=8, n_kv_heads=2, head_dim=64)
    y = attend(q, k, v, plan, mask=None, is_causal=True)

F.scaled_dot_product_attention picks its CUDA kernel at run time (aten/src/ATen/native/transformers/cuda/
sdp_utils.cpp) and silently falls back to the math kernel (fp32 scores, the whole T x T matrix, K/V repeated)
when no fused kernel accepts the inputs. The rules that matter for us:
    flash      sm80 .. sm121, fp16/bf16, no attn_mask, head_dim <= 256; takes enable_gqa (differing Q/KV heads).
               Training with 192 < head_dim <= 224 is refused on sm86/sm89/sm120/sm121.
    efficient  sm50 .. sm121, fp16/fp32 (bf16 only from sm80), takes an attn_mask, head_dim divisible by the GEMM
               alignment (8 for fp16/bf16; 4 for fp32 from sm80; 1 below). In the torch releases users run it
               refuses differing Q/KV head counts even with enable_gqa (native GQA only landed in pytorch#191085),
               so we expand K/V to the query heads ourselves (repeat_interleave) and it runs.
    math       everything else: what this module exists to avoid on CUDA.
On CPU SDPA's own kernel takes masks and enable_gqa, so nothing changes there.

Packed rows (several documents per row) need attention kept inside each document. With FlexAttention (compiled,
Triton) a block mask built from per-token document ids skips whole blocks of other documents; without it we build
the (B, 1, T, T) boolean mask on the device from the same ids (never on the host) and SDPA runs it on the
efficient kernel. Eager FlexAttention materialises the full score matrix, so on CPU the device mask is used.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionPlan:
    kernel: str  # what runs: flash | efficient | math (CUDA SDPA kernels), cpu (SDPA on CPU), flex
    enable_gqa: bool  # pass enable_gqa=True: the kernel maps each query head to its kv head itself
    expand_kv: bool  # repeat K/V to the query heads before the call (the kernel refuses differing head counts)
    documents: str  # packed rows: none | flex (block mask from document ids) | mask (dense mask on the device)


def flash_can_run(
    capability: tuple[int, int],
    dtype: torch.dtype,
    has_mask: bool,
    head_dim: int,
    requires_grad: bool = False,
    dropout: bool = False,
) -> bool:
    if has_mask or dtype not in HALF or not (8, 0) <= capability <= (12, 1) or head_dim > 256:
        return False
    if requires_grad and ((8, 6) <= capability <= (8, 9) or (12, 0) <= capability <= (12, 1)):
        # flash's backward on these parts has no kernel for 192 < head_dim <= 224 (or up to 256 with dropout)
        return head_dim <= 192 or (head_dim > 224 and not dropout)
    return True


def efficient_can_run(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> bool:
    if not (5, 0) <= capability <= (12, 1):
        return False
    if dtype not in (
        (torch.float16, torch.float32, torch.bfloat16) if capability >= (8, 0) else (torch.float16, torch.float32)
    ):
        return False
    # the CUTLASS kernels' GEMM alignment: 128-bit tensor-core loads for fp16/bf16 (and fp32 from sm80)
    if dtype in HALF:
        alignment = 8
    else:
        alignment = 4 if capability >= (8, 0) else 1
    return head_dim % alignment == 0


def attention_plan(
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    has_mask: bool,
    is_causal: bool,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    *,
    documents: bool = False,
    flex_available: bool = False,
    efficient_gqa: bool = False,
    requires_grad: bool = False,
    dropout: bool = False,
) -> AttentionPlan:
    """The attention path for one forward.

    capability: the CUDA compute capability, None for the CPU (or any non-CUDA device).
    has_mask: an explicit attn_mask is passed (padding, a cache longer than the queries). is_causal: the mask-free
    causal kernel over square q/kv (the model sets it only when q_len == kv_len). documents: the rows are packed and
    carry document ids. flex_available: FlexAttention can be compiled here (torch >= 2.5 with Triton).
    efficient_gqa: this torch's efficient kernel takes enable_gqa (pytorch#191085); off by default, since
    expanding K/V is correct whatever the version."""
    if has_mask and is_causal:
        raise ValueError("pass either an explicit mask or is_causal, not both (SDPA refuses the pair)")
    if documents and has_mask:
        raise ValueError("packed rows carry document ids; an extra explicit mask is not supported")
    grouped = n_heads != n_kv_heads
    if capability is None:
        return AttentionPlan("cpu", grouped, False, "mask" if documents else "none")
    if documents:
        # Flex's Triton kernels need the shared memory of sm80+ parts for head_dim up to 128 (Turing and the
        # consumer parts run out of it at larger sizes); elsewhere the device mask and the efficient kernel.
        if flex_available and capability >= (8, 0) and head_dim <= 128 and not dropout:
            return AttentionPlan("flex", grouped, False, "flex")
        has_mask = True
    doc_mode = "mask" if documents else "none"
    if flash_can_run(capability, dtype, has_mask, head_dim, requires_grad, dropout):
        return AttentionPlan("flash", grouped, False, doc_mode)
    if efficient_can_run(capability, dtype, head_dim):
        native = grouped and efficient_gqa
        return AttentionPlan("efficient", native, grouped and not native, doc_mode)
    return AttentionPlan("math", grouped, False, doc_mode)  # math repeats K/V itself; a copy would not help


# -----------------------------------------------------------------------------
# Reading the device (only for CUDA tensors) and executing a plan

_CAPABILITY: dict[int, tuple[int, int]] = {}  # CUDA device index -> (major, minor), read once per device


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) for a CUDA device, None for any other; torch.cuda is touched only for CUDA devices."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        props = torch.cuda.get_device_properties(index)
        _CAPABILITY[index] = (props.major, props.minor)
    return _CAPABILITY[index]


_FLEX_AVAILABLE: list[bool] = []  # filled on the first CUDA forward: the answer does not change in a process


def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention can run compiled here: CUDA with Triton (on CPU the plan never asks for it)."""
    if device.type != "cuda":
        return False
    if not _FLEX_AVAILABLE:
        try:
            from torch.utils._triton import has_triton  # private module: where it is missing, so is compiled flex

            _FLEX_AVAILABLE.append(has_triton())
        except ImportError:
            _FLEX_AVAILABLE.append(False)
    return _FLEX_AVAILABLE[0]


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) boolean mask, built where the ids live: True where query i may see key j
    (same document, j <= i). Padding (id 0) is a document of its own, so no row is all-False (SDPA gives NaN)."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return ((document_ids[:, :, None] == document_ids[:, None, :]) & causal)[:, None]


def document_block_mask(document_ids: torch.Tensor):
    """The same rule as document_mask as a FlexAttention BlockMask: blocks of other documents are skipped."""
    B, T = document_ids.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (kv_idx <= q_idx)

    return create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device)


_COMPILED_FLEX = None


def flex_attention_call(q, k, v, block_mask, enable_gqa: bool):
    """flex_attention, compiled once per process on CUDA (eager flex materialises every score; CPU tests use it)."""
    global _COMPILED_FLEX
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        # Inside a compiled model Inductor fuses it already; on the CPU only tests ask for it.
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def attend(q, k, v, plan: AttentionPlan, mask=None, is_causal: bool = False, dropout: float = 0.0):
    """Run attention as planned. q (B, nh, T, hd); k, v (B, nkv, S, hd); mask: a (B, 1, T, S) boolean tensor, or
    a FlexAttention BlockMask when plan.documents == "flex"."""
    if plan.documents == "flex":
        if dropout:
            raise ValueError("attention_dropout is not supported with FlexAttention document masking")
        return flex_attention_call(q, k, v, mask, plan.enable_gqa)
    if plan.expand_kv:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=plan.enable_gqa
    )
