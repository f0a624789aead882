"""optimizer=adamw | muon (trainer/optim.py): which parameter gets which optimizer (by name), per-group lrs under the
schedule, GradScaler, a step skipped on a device flag, exact resume, DDP == one process, the FSDP refusal, and Muon
learning faster than AdamW."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import SLMConfig, SLMForCausalLM
from tests.helpers import losses, make_pretrain_cfg, pretrain_args, read_metrics, run_main_py, tiny_model
from trainer.config import TrainConfig
from trainer.core import run_trainer
from trainer.lora import add_lora
from trainer.optim import MuonWithAdamW, SkippableMuon, build_optimizer, split_parameters
from trainer.pretrain import PretrainTrainer

PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def groups_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, set[str]]:
    """Parameter names per kind of group, read back from the optimizer itself (not from split_parameters)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {"muon": set(), "decay": set(), "no_decay": set()}
    for group in optimizer.param_groups:
        kind = "muon" if "ns_steps" in group else "decay" if group["weight_decay"] > 0 else "no_decay"
        found[kind] |= {names[id(p)] for p in group["params"]}
    return found


def norms(n_layers: int) -> set[str]:
    return {
        f"model.layers.{i}.{n}.weight" for i in range(n_layers) for n in ("input_layernorm", "post_attention_layernorm")
    } | {"model.norm.weight"}


@pytest.mark.parametrize("tied", [True, False])
def test_groups_by_name_dense(tied):
    model = tiny_model(tie_word_embeddings=tied)
    n = model.config.num_hidden_layers
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr_ratio=4.0)
    optimizer = build_optimizer(list(model.named_parameters()), cfg, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    found = groups_of(optimizer, model)
    assert found["muon"] == {f"model.layers.{i}.{p}.weight" for i in range(n) for p in PROJECTIONS}
    # the output head is AdamW's whether it is the embedding (tied) or its own matrix
    assert found["decay"] == {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    assert found["no_decay"] == norms(n)
    lrs = {"muon" if "ns_steps" in g else "adamw": (g["lr"], g["lr_scale"]) for g in optimizer.param_groups}
    assert lrs == {"muon": (4e-3, 4.0), "adamw": (1e-3, 1.0)}
    # adamw: the same two groups as before the option existed, nothing on Muon
    adamw = build_optimizer(list(model.named_parameters()), TrainConfig(), torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW
    found = groups_of(adamw, model)
    assert not found["muon"] and found["no_decay"] == norms(n)
    assert len(found["decay"]) == 7 * n + (1 if tied else 2)
    # decay_embeddings=false moves the embedding and the head (only those) to the group without decay
    for optimizer_name in ("muon", "adamw"):
        cfg = TrainConfig(optimizer=optimizer_name, decay_embeddings=False)
        found = groups_of(build_optimizer(list(model.named_parameters()), cfg, torch.device("cpu")), model)
        embeddings = {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
        assert found["no_decay"] == norms(n) | embeddings
        assert not found["decay"] & embeddings and len(found["decay"]) == (0 if optimizer_name == "muon" else 7 * n)


def test_groups_by_name_moe():
    model = SLMForCausalLM(
        SLMConfig.from_preset(
            "moe", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, moe_intermediate_size=32
        )
    )
    cfg = model.config
    found = groups_of(
        build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon"), torch.device("cpu")), model
    )
    mlps = [f"mlp.experts.{e}.{p}" for e in range(cfg.num_experts) for p in ("gate_proj", "up_proj", "down_proj")]
    mlps += [f"mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    attn = [p for p in PROJECTIONS if p.startswith("self_attn")]
    assert found["muon"] == {f"model.layers.{i}.{p}.weight" for i in range(2) for p in attn + mlps}
    # the router is a classifier over experts (one row each), not a hidden map: AdamW
    assert found["decay"] == {"model.embed_tokens.weight"} | {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert found["no_decay"] == norms(2)


def test_lora_adapters_stay_on_adamw():
    model = tiny_model()
    add_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.0)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert split_parameters(trainable, "muon")["muon"] == []
    optimizer = build_optimizer(trainable, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    found = groups_of(optimizer, model)
    assert found["decay"] == {n for n, _ in trainable} and len(found["decay"]) == 2 * 3 * 4
    assert all(".lora_A." in n or ".lora_B." in n for n in found["decay"])


def test_unknown_optimizer_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon"):
        build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="lion"), torch.device("cpu"))


# -----------------------------------------------------------------------------
# The combined optimizer under GradScaler, the schedule and a state_dict round trip


def test_grad_scaler_unscales_both_halves_and_skips_inf_steps():
    model = tiny_model()
    optimizer = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon"), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
    scaled = {n: p.grad.clone() for n, p in model.named_parameters()}
    scaler.unscale_(optimizer)
    for n, p in model.named_parameters():  # Muon's matrices and AdamW's embedding and norms alike
        torch.testing.assert_close(p.grad, scaled[n] / 1024.0, rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # both halves stepped
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
    model.model.layers[0].self_attn.q_proj.weight.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(optimizer)  # an inf anywhere skips the whole step, Muon's half and AdamW's
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scaler.get_scale() == 1024.0 * scaler.get_backoff_factor()


def muon_steps(muon_cls, grads_of_step, flags=None):
    """Two matrices through len(grads_of_step) steps of muon_cls; flags[i] = (found_inf, grad_scale) set on the
    optimizer before step i as GradScaler does, or None. -> (weights, momentum buffers)."""
    torch.manual_seed(0)
    params = [torch.randn(16, 8, requires_grad=True), torch.randn(8, 24, requires_grad=True)]
    muon = muon_cls([{"params": params, "lr": 0.02, "weight_decay": 0.1}], adjust_lr_fn="match_rms_adamw")
    for i, grads in enumerate(grads_of_step):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if flags and flags[i]:
            muon.found_inf, muon.grad_scale = flags[i]
        muon.step()
        for name in ("found_inf", "grad_scale"):
            muon.__dict__.pop(name, None)
    return [p.detach() for p in params], [muon.state[p]["momentum_buffer"] for p in params]


def test_skippable_muon_is_torchs_muon_and_skips_on_a_device_flag():
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(16, 8, generator=g), torch.randn(8, 24, generator=g)] for _ in range(3)]
    reference = muon_steps(torch.optim.Muon, grads)
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    # found_inf = 0 on every step: torch's numbers, bit for bit
    same = muon_steps(SkippableMuon, grads, [(zero, None)] * 3)
    assert all(torch.equal(a, b) for a, b in zip(reference[0] + reference[1], same[0] + same[1]))
    # an inf gradient with found_inf = 1 between them: that step changes nothing, weights or momentum
    inf = [torch.full_like(t, float("inf")) for t in grads[0]]
    skipped = muon_steps(SkippableMuon, grads[:2] + [inf] + grads[2:], [(zero, None), (zero, None), (one, None), None])
    assert all(torch.equal(a, b) for a, b in zip(reference[0] + reference[1], skipped[0] + skipped[1]))
    # gradients still scaled (GradScaler.step without unscale_): divided by grad_scale first
    scale = torch.tensor(1024.0)
    scaled = muon_steps(SkippableMuon, [[t * 1024 for t in step] for step in grads], [(zero, scale)] * 3)
    assert all(torch.equal(a, b) for a, b in zip(reference[0] + reference[1], scaled[0] + scaled[1]))
    # the combined optimizer can skip by itself where its AdamW half is fused (CPU and CUDA)
    model = SLMForCausalLM(SLMConfig.from_preset("tiny"))
    optimizer = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert optimizer._step_supports_amp_scaling and optimizer.adamw.defaults["fused"]


def test_state_dict_round_trip_keeps_lr_scales_and_both_states():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr_ratio=2.0)
    optimizer = build_optimizer(list(model.named_parameters()), cfg, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    saved = optimizer.state_dict()
    kinds = {tuple(sorted(s)) for s in saved["state"].values()}
    assert kinds == {("momentum_buffer",), ("exp_avg", "exp_avg_sq", "step")}
    # a new run with another muon_lr_ratio loads it: the moments come back, the lr scales are this run's
    other = build_optimizer(
        list(model.named_parameters()), TrainConfig(optimizer="muon", lr=1e-3, muon_lr_ratio=5.0), torch.device("cpu")
    )
    other.load_state_dict(saved)
    assert [g["lr_scale"] for g in other.param_groups] == [5.0, 1.0, 1.0]
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(other.muon.state[q]["momentum_buffer"], optimizer.state[q]["momentum_buffer"])
    assert other.muon.param_groups[0] is other.param_groups[0] and other.adamw.state is other.state
    other.param_groups[0]["lr"] = 0.5  # what the schedule does: seen by the inner Muon
    assert other.muon.param_groups[0]["lr"] == 0.5


# -----------------------------------------------------------------------------
# Through the Trainer: resume, fp16, DDP, FSDP


class DiesAtStep4(PretrainTrainer):
    def train_step(self):
        if self.step == 4:  # one step after the step-3 checkpoint
            raise RuntimeError("interrupted")
        return super().train_step()


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_muon_resume_is_bit_identical(tiny_tokenizer_dir, shards, tmp_path):
    settings = dict(optimizer="muon", max_steps=6, save_every=3, eval_every=0)
    straight = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "straight", **settings)
    run_trainer(PretrainTrainer, straight)
    crashed = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "crashed", **settings)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_trainer(DiesAtStep4, crashed)
    state = torch.load(Path(crashed.out_dir) / "step_000003" / "trainer_state.pt", weights_only=False)
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())  # Muon's state is saved
    run_trainer(PretrainTrainer, crashed)  # resume=auto from step 3
    assert len(losses(crashed.out_dir)) == 6
    assert losses(crashed.out_dir) == losses(straight.out_dir)  # exact equality, not a tolerance
    a = load_file(Path(straight.out_dir) / "final" / "model.safetensors")
    b = load_file(Path(crashed.out_dir) / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_muon_fp16_grad_scaler_on_cpu(tiny_tokenizer_dir, shards, tmp_path):
    """fp16 autocast + GradScaler: the logged grad norm is of unscaled gradients (a missed unscale would show the
    scale, 65536x), and training stays finite and learns."""
    common = dict(optimizer="muon", max_steps=8, eval_every=0, save_every=0, lr_schedule="constant")
    fp32 = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "fp32", dtype="fp32", **common)
    fp16 = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "fp16", dtype="fp16", **common)
    run_trainer(PretrainTrainer, fp32)
    trainer = run_trainer(PretrainTrainer, fp16)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1
    norms32, norms16 = ([r["grad_norm"] for r in read_metrics(c.out_dir)] for c in (fp32, fp16))
    assert norms16[0] == pytest.approx(norms32[0], rel=2e-2)
    curve = losses(fp16.out_dir)
    assert all(torch.isfinite(torch.tensor(curve))) and curve[-1] < 0.8 * curve[0]
    assert curve == pytest.approx(losses(fp32.out_dir), rel=5e-2)


def main_args(tiny_tokenizer_dir, shards) -> list[str]:
    return pretrain_args(tiny_tokenizer_dir, shards, optimizer="muon")


@pytest.mark.slow
def test_muon_ddp_two_processes_match_one(tiny_tokenizer_dir, shards, tmp_path):
    args = ["--stage", "pretrain", *main_args(tiny_tokenizer_dir, shards)]
    run_main_py(tmp_path / "one", args)
    two = run_main_py(tmp_path / "two", args, processes=2)
    assert "processes 2" in two.stdout
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    ours, ref = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("two", "one"))
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_muon_refused_under_fsdp(tiny_tokenizer_dir, shards, tmp_path):
    args = ["--stage", "pretrain", *main_args(tiny_tokenizer_dir, shards), "batch_size=2", "max_steps=1"]
    result = run_main_py(tmp_path / "fsdp", [*args, "parallel=fsdp"], processes=2, check=False)
    assert result.returncode != 0 and "optimizer=muon cannot run under parallel=fsdp" in result.stderr


# -----------------------------------------------------------------------------
# The point of it: more learning per step


@pytest.mark.slow
def test_muon_defaults_beat_adamw_defaults_at_equal_steps(tiny_tokenizer_dir, shards, tmp_path):
    """Tiny preset, the same data, seed and schedule; only `optimizer` differs (each with its own defaults)."""
    results = {}
    for name in ("adamw", "muon"):
        cfg = make_pretrain_cfg(
            tiny_tokenizer_dir,
            shards,
            tmp_path / name,
            optimizer=name,
            lr=TrainConfig.lr,
            max_steps=40,
            warmup_steps=4,
            seq_len=64,
            eval_every=0,
            eval_batches=4,
            save_every=0,
            log_every=10,
        )
        run_trainer(PretrainTrainer, cfg)
        results[name] = read_metrics(cfg.out_dir, "eval")[-1]["loss"]
    assert results["muon"] < results["adamw"], results
