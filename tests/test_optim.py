"""optimizer=adamw | muon (trainer/optim.py): which parameter gets which optimizer (by name), per-group lrs under the
schedule, GradScaler, BatchedMuon against torch.optim.Muon (fp32, fp16, bf16), a step skipped on a device flag, the
ops of one step (at most 150 for the small preset), exact resume, DDP == one process, the FSDP refusal, and Muon
learning faster than AdamW."""

import collections
import contextlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from model import SLMConfig, SLMForCausalLM
from model.runtime import newton_schulz_dtype_for
from tests.helpers import losses, make_pretrain_cfg, pretrain_args, read_metrics, run_main_py, tiny_model
from trainer.config import TrainConfig
from trainer.core import run_trainer
from trainer.lora import add_lora, add_trainable_tokens
from trainer.optim import BatchedMuon, MuonWithAdamW, build_optimizer, split_parameters
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


@pytest.mark.parametrize("tied", [True, False])
def test_lora_adapters_and_trained_token_rows_stay_on_adamw(tied):
    """The trained token rows are embedding rows, 2-D like a hidden matrix: AdamW takes them, never Muon, and
    decay_embeddings=false keeps them out of weight decay like the embedding itself."""
    model = tiny_model(tie_word_embeddings=tied)
    add_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.0)
    add_trainable_tokens(model, [1, 2])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = {"model.embed_tokens.token_adapter.trainable_tokens_delta"}
    if not tied:  # an untied head has rows of its own
        rows.add("lm_head.token_adapter.trainable_tokens_delta")
    assert split_parameters(trainable, "muon")["muon"] == []
    optimizer = build_optimizer(trainable, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    found = groups_of(optimizer, model)
    assert found["decay"] == {n for n, _ in trainable} and len(found["decay"]) == 2 * 3 * 4 + len(rows)
    assert {n for n in found["decay"] if ".lora_A." not in n and ".lora_B." not in n} == rows
    assert set(split_parameters(trainable, "muon", decay_embeddings=False)["no_decay"]) == rows


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


# Matrices of three shapes, two of them repeated (stacked together), one tall, one wide, one square
SHAPES = [(32, 16), (32, 16), (16, 48), (32, 16), (16, 16), (16, 48)]


def muon_steps(muon_cls, grads_of_step, flags=None, **kwargs):
    """The SHAPES matrices through len(grads_of_step) steps of muon_cls; flags[i] = (found_inf, grad_scale) set on
    the optimizer before step i as GradScaler does, or None. -> (weights, momentum buffers, initial weights)."""
    torch.manual_seed(0)
    params = [torch.randn(*shape, requires_grad=True) for shape in SHAPES]
    initial = [p.detach().clone() for p in params]
    muon = muon_cls([{"params": params, "lr": 0.02, "weight_decay": 0.1}], adjust_lr_fn="match_rms_adamw", **kwargs)
    for i, grads in enumerate(grads_of_step):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if flags and flags[i]:
            muon.found_inf, muon.grad_scale = flags[i]
        muon.step()
        for name in ("found_inf", "grad_scale"):
            muon.__dict__.pop(name, None)
    return [p.detach() for p in params], [muon.state[p]["momentum_buffer"] for p in params], initial


def random_grads(steps: int, scale: float = 1.0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(*shape, generator=g) * scale for shape in SHAPES] for _ in range(steps)]


def assert_close_to(ours, reference, share: float) -> None:
    """Every weight within `share` of how far the reference moved that matrix over the run (max abs)."""
    for a, b, start in zip(ours[0], reference[0], reference[2]):
        assert (a - b).abs().max() <= share * (b - start).abs().max(), (a - b).abs().max() / (b - start).abs().max()


@pytest.fixture
def torch_muon_in_fp32(monkeypatch):
    """torch.optim.Muon with its one bf16 cast (grad.bfloat16() in _zeropower_via_newtonschulz) made fp32: torch's
    own algorithm, every line of it, in fp32."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.float())
    return torch.optim.Muon


def test_batched_muon_is_torchs_muon_in_fp32(torch_muon_in_fp32):
    """The stacked step with Newton-Schulz in fp32 (CPUs without native bf16) against torch's Muon in fp32:
    tight (1e-6 of the weights' movement; batched and single matmuls may sum in another order)."""
    grads = random_grads(5)
    reference = muon_steps(torch_muon_in_fp32, grads)
    ours = muon_steps(BatchedMuon, grads, ns_dtype=torch.float32)
    assert_close_to(ours, reference, 1e-6)
    for a, b in zip(ours[1], reference[1]):  # the momentum buffers: the same element-wise ops, bit for bit
        assert torch.equal(a, b)


def test_batched_muon_in_fp16_is_torchs_muon_up_to_rounding(torch_muon_in_fp32):
    """fp16 (GPUs below sm80) has 11 significant bits: ~0.1% of the movement from fp32, 0.5% allowed. Gradients
    of 1e-6 stay exact too: each matrix is normalised before the cast (cast first, most of them would be fp16
    subnormals or 0)."""
    grads = random_grads(5)
    reference = muon_steps(torch_muon_in_fp32, grads)
    assert_close_to(muon_steps(BatchedMuon, grads, ns_dtype=torch.float16), reference, 5e-3)
    tiny = [[g * 1e-6 for g in step] for step in grads]  # Muon's update does not depend on the gradients' scale
    assert_close_to(muon_steps(BatchedMuon, tiny, ns_dtype=torch.float16), reference, 5e-3)


def test_batched_muon_in_bf16_is_torchs_muon_up_to_rounding():
    """bf16 (GPUs from sm80, CPUs with AVX512_BF16 or AMX) against torch.optim.Muon as it is (bf16 too): each is
    ~1% of the movement away from the fp32 result, and they round differently (we normalise before the cast, torch
    after), so 3% allowed."""
    grads = random_grads(5)
    assert_close_to(muon_steps(BatchedMuon, grads, ns_dtype=torch.bfloat16), muon_steps(torch.optim.Muon, grads), 3e-2)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_batched_muon_skips_on_a_device_flag(ns_dtype):
    grads = random_grads(3)
    plain = muon_steps(BatchedMuon, grads, ns_dtype=ns_dtype)
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    same = [(zero, None)] * 3
    # found_inf = 0 on every step: the same numbers as without the flag, bit for bit
    flagged = muon_steps(BatchedMuon, grads, same, ns_dtype=ns_dtype)
    assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], flagged[0] + flagged[1]))
    # an inf gradient with found_inf = 1 between them: that step changes nothing, weights or momentum
    inf = [torch.full_like(t, float("inf")) for t in grads[0]]
    skipped = muon_steps(BatchedMuon, grads[:2] + [inf] + grads[2:], same[:2] + [(one, None), None], ns_dtype=ns_dtype)
    assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], skipped[0] + skipped[1]))
    # gradients still scaled (GradScaler.step without unscale_): divided by grad_scale first
    scale = torch.tensor(1024.0)
    scaled = muon_steps(
        BatchedMuon, [[t * 1024 for t in step] for step in grads], [(zero, scale)] * 3, ns_dtype=ns_dtype
    )
    assert all(torch.equal(a, b) for a, b in zip(plain[0] + plain[1], scaled[0] + scaled[1]))


def test_the_combined_optimizer_skips_by_itself_and_picks_the_devices_dtype():
    model = SLMForCausalLM(SLMConfig.from_preset("tiny"))
    optimizer = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert optimizer._step_supports_amp_scaling and optimizer.adamw.defaults["fused"]  # AdamW fused: CPU and CUDA
    assert optimizer.muon.ns_dtype == newton_schulz_dtype_for(torch.device("cpu"))


# -----------------------------------------------------------------------------
# What a step costs: ops (each a kernel launch on a GPU), counted on the CPU


class OpCount(TorchDispatchMode):
    """Counts the aten ops that do work (not views, not profiler markers) while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view:
            self.ops[func.name()] += 1  # e.g. aten::bmm
        return func(*args, **(kwargs or {}))


def ops_per_step(preset: str, fake: bool, **sizes) -> collections.Counter:
    """Non-view aten ops of one optimizer=muon step of `preset` as the Trainer drives it (a skip flag set by the
    StepGuard), after a first step has made the momentum and AdamW state. fake: CPU tensors of FakeTensorMode,
    which dispatch the same ops on the exact shapes and compute nothing."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = SLMForCausalLM(SLMConfig.from_preset(preset, **sizes))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer = build_optimizer(list(model.named_parameters()), TrainConfig(optimizer="muon"), torch.device("cpu"))
        optimizer.found_inf, optimizer.grad_scale = torch.zeros(()), None
        optimizer.step()
        with OpCount() as counted:
            optimizer.step()
    return counted.ops


def test_a_muon_step_of_the_small_preset_is_at_most_150_ops():
    """torch.optim.Muon stepped the small preset's 56 matrices one at a time: ~1,300-1,550 ops a step (issue 21).
    Stacked by shape, a step's ops depend on the number of distinct shapes, not of matrices."""
    ops = ops_per_step("small", fake=True)
    assert sum(ops.values()) <= 150, ops.most_common()
    assert ops["aten::bmm"] + ops["aten::baddbmm"] == 4 * 3 * 5  # 4 shapes x 3 matmuls x 5 Newton-Schulz iterations
    assert ops_per_step("small", fake=True, num_hidden_layers=2) == ops  # 14 matrices or 56: the same ops
    # fake tensors dispatch what real ones do (a narrow small, which computes in a blink)
    assert ops_per_step("small", fake=False, hidden_size=64, intermediate_size=176, num_attention_heads=4) == ops


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
