"""
The attention plan (model/attention.py): which kernel each GPU our users have gets, decided by a pure function and
checked here with faked device properties; the model wired to it; packed rows kept apart without a host mask.

    python -m pytest tests/test_attention.py
"""

import types
import warnings

import pytest
import torch

from model import attention, model_slm
from model.attention import (
    AttentionPlan,
    attention_plan,
    device_capability,
    document_mask,
)
from tests.helpers import tiny_model

T4, V100, A100, RTX4090, H100 = (7, 5), (7, 0), (8, 0), (8, 9), (9, 0)
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def plan(capability, dtype, has_mask=False, heads=(8, 2), head_dim=64, **kw):
    return attention_plan(capability, dtype, has_mask, not has_mask, heads[0], heads[1], head_dim, **kw)


# -----------------------------------------------------------------------------
# the pure plan, per GPU


@pytest.mark.parametrize("capability,dtype", [(T4, FP16), (V100, FP16)])
def test_pre_ampere_gets_the_efficient_kernel_with_expanded_kv(capability, dtype):
    # No flash below sm80: with or without a mask the efficient kernel runs, and it needs equal head counts.
    for has_mask in (False, True):
        p = plan(capability, dtype, has_mask)
        assert p == AttentionPlan("efficient", enable_gqa=False, expand_kv=True, documents="none")
    # Plain multi-head attention needs neither.
    assert plan(capability, dtype, heads=(8, 8)) == AttentionPlan("efficient", False, False, "none")
    # bf16 there has no fused kernel at all: math (what dtype=auto must never pick on these parts).
    assert plan(capability, BF16).kernel == "math"


@pytest.mark.parametrize("capability", [A100, RTX4090, H100])
def test_ampere_and_later_use_flash_with_native_gqa_unless_masked(capability):
    for dtype in (BF16, FP16):
        assert plan(capability, dtype) == AttentionPlan("flash", enable_gqa=True, expand_kv=False, documents="none")
        # flash takes no arbitrary mask: the efficient kernel takes it, with K/V expanded.
        assert plan(capability, dtype, has_mask=True) == AttentionPlan("efficient", False, True, "none")
    # fp32 never runs flash; the efficient kernel takes fp32.
    assert plan(capability, FP32) == AttentionPlan("efficient", False, True, "none")
    # On a torch whose efficient kernel takes enable_gqa (pytorch#191085) no copy is made.
    assert plan(capability, BF16, has_mask=True, efficient_gqa=True) == AttentionPlan("efficient", True, False, "none")


def test_head_dim_and_training_limits():
    assert plan(H100, BF16, head_dim=256).kernel == "flash"
    assert plan(H100, BF16, head_dim=320).kernel == "efficient"  # flash stops at 256
    # flash's backward on sm86/sm89 has no kernel for 192 < head_dim <= 224; inference is fine.
    assert plan(RTX4090, BF16, head_dim=208, requires_grad=True).kernel == "efficient"
    assert plan(RTX4090, BF16, head_dim=208).kernel == "flash"
    assert plan(A100, BF16, head_dim=208, requires_grad=True).kernel == "flash"
    # The efficient kernel's fp16 GEMMs need head_dim % 8 == 0; otherwise math is all that is left.
    assert plan(T4, FP16, head_dim=36).kernel == "math"
    assert plan(T4, FP32, head_dim=36).kernel == "efficient"  # fp32 below sm80 has no tensor-core alignment
    with pytest.raises(ValueError, match="not both"):
        attention_plan(T4, FP16, True, True, 8, 2, 64)


def test_packed_rows_flex_where_it_compiles_else_a_device_mask():
    for capability in (A100, RTX4090, H100):
        assert plan(capability, BF16, documents=True, flex_available=True) == AttentionPlan("flex", True, False, "flex")
        # Without Triton: the device mask on the efficient kernel, K/V expanded (never math).
        assert plan(capability, BF16, documents=True) == AttentionPlan("efficient", False, True, "mask")
    # Turing's shared memory is too small for flex's kernels: the mask on the efficient fp16 kernel.
    assert plan(T4, FP16, documents=True, flex_available=True) == AttentionPlan("efficient", False, True, "mask")
    assert plan(V100, FP16, documents=True, flex_available=True) == AttentionPlan("efficient", False, True, "mask")
    assert plan(H100, BF16, head_dim=256, documents=True, flex_available=True).documents == "mask"
    assert plan(H100, BF16, documents=True, flex_available=True, dropout=True).documents == "mask"


def test_cpu_keeps_enable_gqa_and_the_device_mask():
    for has_mask in (False, True):
        assert plan(None, FP32, has_mask) == AttentionPlan("cpu", enable_gqa=True, expand_kv=False, documents="none")
    assert plan(None, BF16, documents=True, flex_available=True) == AttentionPlan("cpu", True, False, "mask")
    assert plan(None, FP32, heads=(4, 4)).enable_gqa is False


def test_device_capability_reads_cuda_once_and_only_for_cuda(monkeypatch):
    calls = []

    def fake_properties(index):
        calls.append(index)
        return types.SimpleNamespace(major=7, minor=5)

    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties)
    monkeypatch.setattr(attention, "_CAPABILITY", {})
    assert device_capability(torch.device("cpu")) is None and device_capability(torch.device("meta")) is None
    assert calls == []  # no torch.cuda call for a tensor that is not on CUDA
    assert device_capability(torch.device("cuda:0")) == T4
    assert device_capability(torch.device("cuda:0")) == T4
    assert calls == [0]  # cached per device


def test_flex_is_available_only_on_cuda_with_triton(monkeypatch):
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(attention, "_FLEX_AVAILABLE", [])
    monkeypatch.setattr(triton_utils, "has_triton", lambda: True)
    assert not attention.flex_attention_available(torch.device("cpu"))
    assert attention.flex_attention_available(torch.device("cuda:0"))
    monkeypatch.setattr(attention, "_FLEX_AVAILABLE", [])
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    assert not attention.flex_attention_available(torch.device("cuda:0"))


def test_the_trainer_reads_the_plans_device_facts_before_compiling(tiny_tokenizer_dir, shards, tmp_path, monkeypatch):
    """Trainer.prepare reads its device's capability and FlexAttention's availability before torch.compile, so the
    traced forward finds them cached (on a GPU the first read calls torch.cuda.get_device_properties)."""
    import trainer.core as core
    from tests.helpers import make_pretrain_cfg
    from trainer.pretrain import PretrainTrainer

    events = []
    monkeypatch.setattr(core, "device_capability", lambda device: events.append(("capability", device.type)))
    monkeypatch.setattr(core, "flex_attention_available", lambda device: events.append(("flex", device.type)))
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: events.append("compile") or model)
    PretrainTrainer(make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path, compile=True, device="cpu")).prepare()
    assert events == [("capability", "cpu"), ("flex", "cpu"), "compile"]


def test_a_padding_mask_on_a_device_is_never_read():
    # A meta tensor has no values: reading it (the old bool(mask.all()) host sync) would raise.
    assert model_slm.may_be_padded(torch.ones(2, 8, dtype=torch.long, device="meta"))
    assert not model_slm.may_be_padded(torch.ones(2, 8, dtype=torch.long))  # on the host it is free to look
    assert model_slm.may_be_padded(torch.tensor([[1, 1, 0]]))
    assert not model_slm.may_be_padded(None)


# -----------------------------------------------------------------------------
# the model wired to the plan


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(128).eval()  # 4 query heads, 2 kv heads


def spy_plans(monkeypatch, capability=None):
    """Record the plans the model's layers receive; optionally pretend the tensors sit on a given GPU."""
    seen = []
    real_attend = model_slm.attend

    def attend(q, k, v, plan, *args):
        seen.append(plan)
        return real_attend(q, k, v, plan, *args)

    monkeypatch.setattr(model_slm, "attend", attend)
    if capability is not None:
        monkeypatch.setattr(model_slm, "device_capability", lambda device: capability)
    return seen


def test_expanded_kv_gives_the_same_logits_as_enable_gqa(tiny, monkeypatch):
    ids = torch.randint(0, 128, (2, 24))
    pad = torch.ones(2, 24, dtype=torch.long)
    pad[1, 18:] = 0
    with torch.no_grad():
        native = [tiny(input_ids=ids).logits, tiny(input_ids=ids, attention_mask=pad).logits]
        seen = spy_plans(monkeypatch, capability=T4)  # the plan a T4 gets, executed by the CPU kernel
        expanded = [tiny(input_ids=ids).logits, tiny(input_ids=ids, attention_mask=pad).logits]
    assert len(seen) == 8 and all(p.expand_kv and not p.enable_gqa for p in seen)  # 2 forwards x 4 layers
    for a, b in zip(native, expanded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_model_plans_once_from_the_autocast_dtype(tiny, monkeypatch):
    ids = torch.randint(0, 128, (1, 16))
    seen = spy_plans(monkeypatch, capability=A100)
    with torch.no_grad():
        tiny(input_ids=ids)  # fp32 on an A100: efficient kernel, kv expanded
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tiny(input_ids=ids)  # bf16 autocast: flash with native GQA
    assert {p.kernel for p in seen[:4]} == {"efficient"} and {p.kernel for p in seen[4:]} == {"flash"}
    assert all(p.enable_gqa for p in seen[4:])


# -----------------------------------------------------------------------------
# packed rows: document ids instead of a (B, 1, T, T) mask from the host


def old_dense_mask(document_ids):
    """The mask collate_chat used to build on the host (padding sees only itself)."""
    T = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    mask = same & torch.ones(T, T, dtype=torch.bool).tril() & (document_ids[:, None, :] > 0)
    return (mask | torch.eye(T, dtype=torch.bool))[:, None]


def pack_three():
    lengths = [11, 7, 13]
    docs = [torch.randint(0, 128, (n,)) for n in lengths]
    T = 40
    ids = torch.zeros(1, T, dtype=torch.long)
    ids[0, : sum(lengths)] = torch.cat(docs)
    positions = torch.zeros(1, T, dtype=torch.long)
    positions[0, : sum(lengths)] = torch.cat([torch.arange(n) for n in lengths])
    document_ids = torch.zeros(1, T, dtype=torch.long)
    document_ids[0, : sum(lengths)] = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lengths)])
    return docs, ids, positions, document_ids


@pytest.mark.parametrize("documents", ["mask", "flex"])
def test_three_packed_conversations_get_their_own_logits(tiny, monkeypatch, documents):
    torch.manual_seed(1)
    docs, ids, positions, document_ids = pack_three()
    with torch.no_grad():
        alone = [tiny(input_ids=d[None]).logits[0] for d in docs]
        dense = tiny(input_ids=ids, attention_mask=old_dense_mask(document_ids), position_ids=positions).logits
        if documents == "flex":  # what an H100 with Triton gets, run here by eager FlexAttention on the CPU
            monkeypatch.setattr(model_slm, "flex_attention_available", lambda device: True)
        seen = spy_plans(monkeypatch, capability=H100 if documents == "flex" else None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            packed = tiny(input_ids=ids, document_ids=document_ids, position_ids=positions).logits
    assert {p.documents for p in seen} == {documents}
    start = 0
    for d, logits in zip(docs, alone):
        torch.testing.assert_close(packed[0, start : start + len(d)], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            packed[0, start : start + len(d)], dense[0, start : start + len(d)], atol=1e-5, rtol=1e-5
        )
        start += len(d)


def test_packed_loss_and_gradients_match_the_dense_mask(tiny):
    torch.manual_seed(2)
    _, ids, positions, document_ids = pack_three()
    labels = torch.where(document_ids > 0, ids, -100)
    grads = []
    for kwargs in ({"document_ids": document_ids}, {"attention_mask": old_dense_mask(document_ids)}):
        tiny.zero_grad()
        loss = tiny(input_ids=ids, position_ids=positions, labels=labels, **kwargs).loss
        loss.backward()
        grads.append((loss.detach(), tiny.model.layers[0].self_attn.k_proj.weight.grad.clone()))
    tiny.zero_grad()
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)


def test_document_mask_is_block_diagonal_causal():
    ids = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = document_mask(ids)[0, 0]
    assert m.shape == (6, 6) and m.dtype == torch.bool
    assert m[1, 0] and not m[0, 1] and not m[2, 1] and m[4, 2] and not m[5, 4] and m[5, 5]
    assert m.sum(-1).min() >= 1  # no empty row (SDPA gives NaN there)
    with pytest.raises(ValueError, match="document_ids"):
        tiny_model(16)(input_ids=torch.zeros(1, 6, dtype=torch.long), document_ids=ids, attention_mask=torch.ones(1, 6))


def test_packed_rows_under_bf16_autocast_give_flex_one_dtype(tiny, monkeypatch):
    """torch 2.9's FlexAttention refuses q, k, v of different dtypes. Under bf16 autocast the projections give bf16,
    and RoPE's fp32 cos/sin used to turn q and k (not v) into fp32: packed SFT crashed on every sm80+ GPU on that
    torch (newer ones accept the mix). The check is applied here to the call an H100 gets, run by eager
    FlexAttention on the CPU; the loss must stay what it was with the fp32 rotation, and near the fp32 loss."""
    torch.manual_seed(3)
    _, ids, positions, document_ids = pack_three()
    labels = torch.where(document_ids > 0, ids, -100)
    with torch.no_grad():
        fp32_loss = tiny(input_ids=ids, position_ids=positions, labels=labels, document_ids=document_ids).loss
    calls, real_flex = [], attention.flex_attention_call

    def flex_of_torch_2_9(q, k, v, *args):
        calls.append((q.dtype, k.dtype, v.dtype))
        if not q.dtype == k.dtype == v.dtype:  # torch 2.9's _validate_sdpa_input, as flex_attention applies it
            raise ValueError(f"Expected query, key, and value to have the same dtype, got {q.dtype, k.dtype, v.dtype}")
        return real_flex(q, k, v, *args)

    monkeypatch.setattr(attention, "flex_attention_call", flex_of_torch_2_9)
    monkeypatch.setattr(model_slm, "flex_attention_available", lambda device: True)
    seen = spy_plans(monkeypatch, capability=H100)

    def packed_loss():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return tiny(input_ids=ids, position_ids=positions, labels=labels, document_ids=document_ids).loss

    loss = packed_loss()
    assert {p.documents for p in seen} == {"flex"} and calls == [(BF16, BF16, BF16)] * 4  # every layer, one dtype

    def fp32_cos_sin(self, x, position_ids):  # as they were: in the residual stream's dtype, fp32 under autocast
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def fp32_rotation(q, k, cos, sin):  # the rotation as it was: fp32 cos/sin promote q and k
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + model_slm.rotate_half(q) * sin, k * cos + model_slm.rotate_half(k) * sin

    monkeypatch.setattr(model_slm.SLMRotaryEmbedding, "forward", fp32_cos_sin)
    monkeypatch.setattr(model_slm, "apply_rotary_pos_emb", fp32_rotation)
    with pytest.raises(ValueError, match="same dtype"):  # the check catches the old path
        packed_loss()
    monkeypatch.setattr(attention, "flex_attention_call", real_flex)  # which newer torch runs, mixed dtypes and all
    old_loss = packed_loss()
    torch.testing.assert_close(loss, old_loss, atol=0, rtol=5e-3)
    torch.testing.assert_close(loss.float(), fp32_loss, atol=0, rtol=2e-2)
