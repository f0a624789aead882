"""The SLM model family: shapes, causality, KV cache, generation, save/load, Auto classes, MoE, config checks."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

from model import SLMConfig, SLMForCausalLM, SLMForSequenceClassification
from tests.helpers import spawn_ranks, tiny_config, tiny_model

# The tiny preset made smaller still; initializer_range 0.2 gives random weights with peaked, varied logits, so
# greedy paths differ per prompt.
SMALLER = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128, initializer_range=0.2)


def tiny(**overrides) -> SLMConfig:
    return tiny_config(**{**SMALLER, **overrides})


def make(**overrides) -> SLMForCausalLM:
    return tiny_model(**{**SMALLER, **overrides}).eval()


MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, num_shared_experts=1)


def test_shapes_and_loss():
    model = make()
    ids = torch.randint(4, 256, (3, 17))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 17, 256)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model(ids, logits_to_keep=1).logits.shape == (3, 1, 256)
    # the label shift is inside the model: shift_labels gives the same loss on the shifted targets
    shifted = model(ids, shift_labels=torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)).loss
    assert torch.allclose(shifted, out.loss, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, MOE, {"num_key_value_heads": 1}])
def test_causality(overrides):
    model = make(**overrides)
    ids = torch.randint(4, 256, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 256
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("overrides", [{}, MOE, {"num_key_value_heads": 1}, {"num_key_value_heads": 4}])
def test_kv_cache_matches_full_forward(overrides):
    model = make(**overrides)
    ids = torch.randint(4, 256, (2, 20))
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    pieces = [model(ids[:, :12], cache=cache, use_cache=True).logits]
    for t in range(12, 20):
        pieces.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, MOE])
def test_left_padded_batch_generate_equals_unbatched(overrides):
    model = make(**overrides)
    prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [30, 31, 32, 33]]
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=3)
    for row, prompt in enumerate(prompts):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=3)
        assert batched[row, width:].tolist() == single[0, len(prompt) :].tolist()
    outputs = {tuple(batched[r, width:].tolist()) for r in range(3)}
    assert len(outputs) > 1  # the test would be vacuous if every prompt produced the same tokens


def test_static_cache_generate_equals_dynamic():
    model = make()
    ids = torch.tensor([[5, 6, 7, 8]])
    a = model.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    b = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert a.tolist() == b.tolist()


def test_gradient_checkpointing_same_gradients():
    model = make()
    model.train()
    ids = torch.randint(4, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for g, p in zip(ref, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, MOE])
def test_chunked_loss_equals_plain_loss_and_gradients(overrides):
    """loss_chunk computes the loss without the full logits; it must give the plain loss and gradients, with
    ignored labels, shifted targets, a per-step item count, chunks that do not divide the rows, and bf16."""
    model = make(**overrides).train()
    ids = torch.randint(4, 256, (3, 21))
    labels = ids.clone()
    labels[0, :9] = -100
    for kwargs in (dict(labels=labels), dict(shift_labels=labels, num_items_in_batch=torch.tensor(37.0))):
        results = []
        for chunk in (0, 16, 5):
            model.zero_grad()
            out = model(ids, loss_chunk=chunk, **kwargs)
            out.loss.backward()
            assert (out.logits is None) == (chunk > 0)
            results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        for loss, grads in results[1:]:
            assert torch.allclose(loss, results[0][0], atol=1e-6)
            for got, want in zip(grads, results[0][1]):
                assert torch.allclose(got, want, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, chunked = (model(ids, labels=labels, loss_chunk=c).loss for c in (0, 8))
    assert torch.allclose(plain, chunked, rtol=1e-3)


def test_save_load_round_trip_and_auto_classes(tmp_path):
    for overrides in ({}, {"tie_word_embeddings": False}, MOE):
        model = make(**overrides)
        model.save_pretrained(tmp_path / "m")
        assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "slm"
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        assert type(loaded) is SLMForCausalLM
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        ids = torch.randint(4, 256, (2, 9))
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings


def test_sequence_classification_from_causal_checkpoint(tmp_path, caplog):
    model = make()
    model.save_pretrained(tmp_path / "lm")
    with caplog.at_level(logging.WARNING):
        reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)
    assert type(reward) is SLMForSequenceClassification
    assert torch.equal(reward.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert "score head is new" in caplog.text
    # the score is read at the last real token: right padding does not change it
    ids = torch.tensor([[5, 6, 7, 8, 3, 3], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    scores = reward(ids, attention_mask=mask).logits
    alone = reward(ids[:1, :4]).logits
    assert scores.shape == (2, 1) and torch.allclose(scores[0], alone[0], atol=1e-5)


def test_moe_routes_to_several_experts_and_aux_loss():
    model = make(**MOE)
    ids = torch.randint(4, 256, (4, 32))
    used = set()
    for layer in model.model.layers:
        hook = layer.mlp.gate.register_forward_hook(
            lambda m, i, o: used.update(o.topk(2, dim=-1).indices.flatten().tolist())
        )
        model(ids)
        hook.remove()
    assert len(used) > 1
    out = model(ids, labels=ids)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    dense_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, dense_loss + 0.01 * out.aux_loss, atol=1e-5)  # aux is added to the loss


def test_moe_all_experts_path_equals_routed_path():
    """The compiled MoE path (every expert on every row, weighted) gives the eager routed loop's output,
    aux loss and gradients."""
    model = make(**MOE)
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 10, 64, requires_grad=True)
    flat = x.reshape(-1, 64)
    probs = torch.softmax(moe.gate(flat).float(), dim=-1)
    w, idx = probs.topk(2, dim=-1)
    routed, dense = moe.routed_experts(flat, w, idx), moe.all_experts(flat, w, idx)
    assert torch.allclose(routed, dense, atol=1e-6)
    g_routed = torch.autograd.grad(routed.square().sum(), [x, moe.experts[1].up_proj.weight], retain_graph=True)
    g_dense = torch.autograd.grad(dense.square().sum(), [x, moe.experts[1].up_proj.weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_routed, g_dense))


def test_reward_scores_at_last_index_without_mask_equal_masked_scores():
    config = tiny()
    config.num_labels = 1  # a transformers setting, not an SLMConfig field (presets take fields only)
    torch.manual_seed(0)
    reward = SLMForSequenceClassification(config).eval()
    ids = torch.randint(4, 256, (3, 16))
    lengths = torch.tensor([16, 9, 4])
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 3)  # right padding
    masked = reward(ids, attention_mask=mask).logits
    unmasked = reward(ids, last_index=lengths - 1).logits
    assert torch.allclose(masked, unmasked, atol=1e-5)
    at_end = reward(ids, last_index=torch.full((3,), 15)).logits  # the last slot of a padded row is not the score
    assert not torch.allclose(masked[1:], at_end[1:], atol=1e-3)


def _moe_ddp_worker(rank: int) -> dict:
    """One rank of spawn_ranks' 2-process gloo group: two DDP steps of a MoE model whose expert 0 gets no token
    of rank 1's batch."""
    torch.manual_seed(0)
    model = tiny_model(**{**SMALLER, **MOE}).train()
    seen = torch.zeros((), dtype=torch.long)  # rows expert 0 received in layer 0 on this rank

    def count_rows(module, inputs, output):
        seen.add_(len(inputs[0]))

    model.model.layers[0].mlp.experts[0].register_forward_hook(count_rows)
    if rank == 1:  # a router bias on this rank only: no token of its batch goes to expert 0, in any layer
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(lambda m, i, o: o - 1e4 * (torch.arange(o.shape[-1]) == 0))
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # as trainer/core.py wraps it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        ids = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
        ddp(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return {"seen": seen, "expert0": model.model.layers[0].mlp.experts[0].up_proj.weight.detach()}


@pytest.mark.slow
def test_moe_under_ddp_when_an_expert_gets_no_token(tmp_path):
    # A stuck all-reduce (a rank that never reduced the gradients of an expert that got no token) fails at the
    # timeout, with both ranks' stacks.
    r0, r1 = spawn_ranks(_moe_ddp_worker, (), tmp_path, timeout=240)
    assert int(r1["seen"].sum()) == 0 and int(r0["seen"].sum()) > 0  # the crafted imbalance happened
    assert torch.equal(r0["expert0"], r1["expert0"])  # its gradient was all-reduced: the ranks stay in sync


def test_dense_path_has_no_moe_parts():
    model = make()
    assert not any(
        "experts" in name or "gate." in name and "gate_proj" not in name for name, _ in model.named_parameters()
    )
    assert model(torch.tensor([[4, 5, 6]])).aux_loss is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 65, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "must divide num_attention_heads"),
        ({"use_moe": True, "num_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 15}, "even"),
        ({"residual_init": "ones"}, "residual_init"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLMConfig(**kwargs)


def test_zero_residual_init_starts_every_block_as_the_identity():
    model = tiny_model(residual_init="zero")
    for name, param in model.named_parameters():
        writes_residual = name.endswith(("o_proj.weight", "down_proj.weight"))
        assert (param.abs().sum() == 0) == writes_residual, name
    ids = torch.tensor([[4, 5, 6, 7]])
    inner = model.model
    expected = model.lm_head(inner.norm(inner.embed_tokens(ids)))  # no block adds anything yet
    torch.testing.assert_close(model(ids).logits, expected)
    default = tiny_model()
    assert all(p.abs().sum() > 0 for n, p in default.named_parameters() if n.endswith("o_proj.weight"))


def test_presets_load_strictly(tmp_path):
    counts = {}
    for name in ("tiny", "small", "base", "moe"):
        config = SLMConfig.from_preset(name)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in SLMForCausalLM(config).parameters())
    assert 0.5e6 < counts["tiny"] < 2e6
    assert 24e6 < counts["small"] < 28e6
    assert 115e6 < counts["base"] < 130e6
    assert SLMConfig.from_preset("moe").use_moe
    bad = tmp_path / "bad.json"
    bad.write_text('{"hiden_size": 64}')
    with pytest.raises(ValueError, match="hiden_size"):
        SLMConfig.from_preset(str(bad))
