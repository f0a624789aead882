"""
Which SDPA kernel our attention plan picks for the shapes that matter, and whether that kernel really accepts them
on this GPU: training, packed SFT, the engine's prefill (masked) and one decode step against a KV cache.

    python bench/gpu_attention.py            # on a GPU: plan, and a run with only the planned kernel allowed
    python bench/gpu_attention.py --smoke    # on a CPU: plans for faked GPUs only (checks the script)

For each shape it prints the plan of model/attention.py and, on CUDA, runs F.scaled_dot_product_attention inside
torch.nn.attention.sdpa_kernel([planned backend]) (so a fall-back to math would raise instead of running silently)
and times it against the math kernel on the same inputs. Packed rows planned for FlexAttention (sm80+) run through
the model's own call (compiled flex with the document BlockMask) and are timed against math SDPA with the same
documents as a dense mask.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: repo root on path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import SLMConfig  # noqa: E402
from model.attention import (  # noqa: E402
    attention_plan,
    device_capability,
    document_block_mask,
    document_mask,
    flex_attention_available,
    flex_attention_call,
)
from model.runtime import dtype_name, resolve_device, resolve_dtype  # noqa: E402

FAKED = {"T4": (7, 5), "V100": (7, 0), "A100": (8, 0), "RTX 4090": (8, 9), "H100": (9, 0)}


def shapes(cfg, batch: int, seq_len: int) -> list[dict]:
    """(name, B, q_len, kv_len, has_mask, is_causal) of the calls a run makes."""
    return [
        dict(name="train", B=batch, q=seq_len, kv=seq_len, mask=False, causal=True),
        dict(name="packed_sft", B=batch, q=seq_len, kv=seq_len, mask=False, causal=False, documents=True),
        dict(name="prefill", B=8, q=seq_len // 2, kv=seq_len // 2, mask=True, causal=False),
        dict(name="decode", B=8, q=1, kv=seq_len, mask=True, causal=False),
    ]


def plan_for(s: dict, capability, dtype, head: dict, flex: bool):
    return attention_plan(
        capability,
        dtype,
        has_mask=s["mask"],
        is_causal=s["causal"] and not s.get("documents"),
        documents=s.get("documents", False),
        flex_available=flex,
        requires_grad=s["name"] != "decode" and s["name"] != "prefill",
        **head,
    )


def timed(fn, device, repeats: int = 10) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1000


def run_flex(q, k, v, s: dict, plan, device) -> str:
    """Packed rows on the flex plan: four documents per row, the model's compiled flex call against math SDPA
    with the same documents as a dense mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    document_ids = torch.arange(s["q"], device=device).div(s["q"] // 4, rounding_mode="floor").expand(s["B"], -1) + 1
    block_mask = document_block_mask(document_ids)
    try:
        ms = timed(lambda: flex_attention_call(q, k, v, block_mask, plan.enable_gqa), device)
    except Exception as e:  # a refused dtype or shape, a failed compile: said, not fatal to the other shapes
        return f"REFUSED by flex: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    mask = document_mask(document_ids)
    with sdpa_kernel([SDPBackend.MATH]):
        math_ms = timed(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=plan.enable_gqa), device
        )
    return f"ran on flex: {ms:.3f} ms vs math {math_ms:.3f} ms ({math_ms / ms:.1f}x)"


def run_shape(s: dict, cfg, device, dtype, plan) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = torch.randn(s["B"], H, s["q"], hd, device=device, dtype=dtype)
    k = torch.randn(s["B"], KV, s["kv"], hd, device=device, dtype=dtype)
    v = torch.randn_like(k)
    if plan.kernel == "flex":
        return run_flex(q, k, v, s, plan, device)
    if plan.expand_kv:
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    mask = (
        torch.ones(s["B"], 1, s["q"], s["kv"], dtype=torch.bool, device=device).tril(s["kv"] - s["q"])
        if s["mask"]
        else None
    )
    if s.get("documents") and plan.documents == "mask":  # four documents per row, kept apart by the device mask
        mask = document_mask(
            torch.arange(s["q"], device=device).div(s["q"] // 4, rounding_mode="floor").expand(s["B"], -1) + 1
        )
    kwargs = dict(attn_mask=mask, is_causal=s["causal"] and mask is None, enable_gqa=plan.enable_gqa)
    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }.get(plan.kernel)
    if backend is None:  # cpu: not an SDPA kernel choice
        return "not an SDPA kernel"
    try:
        with sdpa_kernel([backend]):
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs), device)
    except RuntimeError as e:
        return f"REFUSED by {plan.kernel}: {str(e).splitlines()[0][:120]}"
    with sdpa_kernel([SDPBackend.MATH]):
        math_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs), device)
    return f"ran on {plan.kernel}: {ms:.3f} ms vs math {math_ms:.3f} ms ({math_ms / ms:.1f}x)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="faked GPUs only, no CUDA needed")
    args = parser.parse_args(argv)
    import transformers

    here = resolve_device("auto")
    print(
        f"device {torch.cuda.get_device_name(here) if here.type == 'cuda' else 'CPU'} | capability "
        f"{device_capability(here)} | dtype=auto -> {dtype_name(resolve_dtype('auto', here))} | torch "
        f"{torch.__version__} | transformers {transformers.__version__}",
        flush=True,
    )
    cfg = SLMConfig.from_preset(args.preset)
    head = dict(n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
    for gpu, capability in FAKED.items():
        dtype = resolve_dtype("auto", torch.device("cuda"), capability=capability)
        plans = [
            f"{s['name']}={plan_for(s, capability, dtype, head, flex=capability >= (8, 0)).kernel}"
            for s in shapes(cfg, args.batch, args.seq_len)
        ]
        print(f"plan {gpu:<9} sm{capability[0]}{capability[1]} {str(dtype)[6:]:<9} " + " ".join(plans), flush=True)
    if args.smoke or not torch.cuda.is_available():
        return 0
    device = torch.device("cuda")
    capability = device_capability(device)
    dtype = resolve_dtype("auto", device)
    print(f"this GPU: {torch.cuda.get_device_name(device)} sm{capability[0]}{capability[1]}, dtype {dtype}")
    # Packed rows last: their flex plan compiles first (seconds), which must not cost the other shapes' lines.
    for s in sorted(shapes(cfg, args.batch, args.seq_len), key=lambda s: s.get("documents", False)):
        plan = plan_for(s, capability, dtype, head, flex=flex_attention_available(device))
        print(
            f"{s['name']:<11} B={s['B']} q={s['q']} kv={s['kv']} mask={s['mask']}: plan {plan.kernel} "
            f"(gqa={plan.enable_gqa}, expand_kv={plan.expand_kv}) -> {run_shape(s, cfg, device, dtype, plan)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
