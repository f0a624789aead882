"""
The Trainer's hook surface (trainer/core.py): every override point a stage uses is documented in one place and
takes keyword-only arguments, the shared loop knows nothing about any one kind of data, and checkpoints hold the
parts the Trainer hands them (trainer/checkpoint.py Parts).

    python -m pytest tests/test_core.py
"""

import dataclasses
import importlib
import inspect
import math

import pytest

from tests.helpers import make_pretrain_cfg, read_metrics
from trainer.config import ConfigError
from trainer.core import Trainer, run_trainer
from trainer.pretrain import PretrainTrainer

STAGES = ("pretrain", "sft", "lora", "dpo", "reward", "ppo", "grpo", "distill", "rollout", "pairs")
PRIVATE_HELPERS = {"policy_loss", "score_rollout", "make_rollout", "reference_logps", "unpack", "values"}


def stage_trainers() -> list[type]:
    classes = []
    for name in STAGES:
        module = importlib.import_module(f"trainer.{name}")
        classes += [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, Trainer) and c is not Trainer and c.__module__ == module.__name__
        ]
    return classes


def overridden_hooks() -> dict[str, list[str]]:
    """Trainer methods that some stage class defines again -> the classes that do."""
    hooks = {}
    for cls in stage_trainers():
        for name, value in vars(cls).items():
            if callable(value) and not name.startswith("__") and hasattr(Trainer, name):
                hooks.setdefault(name, []).append(cls.__name__)
    return hooks


def test_every_hook_a_stage_overrides_is_documented_with_keyword_only_arguments():
    hooks = overridden_hooks()
    assert {
        "build_data",
        "compute_loss",
        "count_loss_items",
        "count_tokens",
        "setup",
        "build_model",
        "should_save",
        "on_eval",
        "next_step",
        "train_step",
        "extra_state",
        "load_extra_state",
        "trainable_parameters",
        "extra_eval_metrics",
    } <= set(hooks)
    for name in hooks:
        assert f"{name}(" in Trainer.__doc__, f"{name} is overridden by {hooks[name]} but not in Trainer's docstring"
        for cls in [Trainer] + [c for c in stage_trainers() if name in vars(c)]:
            params = list(inspect.signature(getattr(cls, name)).parameters.values())[1:]
            positional = [p.name for p in params if p.kind != p.KEYWORD_ONLY]
            assert not positional, f"{cls.__name__}.{name}: {positional} should be keyword-only"


class Opaque:
    """A micro-batch the loop can only hand back to the stage's hooks: no tensor, dict, tuple or length."""

    def __init__(self, inner):
        self.inner = inner


def unwrap(batch):
    return batch.inner if isinstance(batch, Opaque) else batch  # evaluation's batches come from build_data as they are


class OpaqueStage(PretrainTrainer):
    """Pretraining whose micro-batches the loop cannot look into, that saves when it alone decides, and whose steps
    report their own token count: the loop must run on the hooks and on train_step's return value alone."""

    STEP_TOKENS = 777

    def next_step(self):
        return [Opaque(b) for b in super().next_step()]

    def count_loss_items(self, *, batch):
        return super().count_loss_items(batch=unwrap(batch))

    def count_tokens(self, *, batch):
        return super().count_tokens(batch=unwrap(batch))

    def compute_loss(self, *, batch, num_items):
        return super().compute_loss(batch=unwrap(batch), num_items=num_items)

    def should_save(self):
        return self.step == 3

    def train_step(self):
        metrics, _ = super().train_step()
        return metrics, self.STEP_TOKENS


def test_the_loop_knows_no_kind_of_data_and_passes_no_state_on_the_side(tiny_tokenizer_dir, shards, tmp_path):
    """What replaced a read of the loop's source: fit() trains on batches it cannot look into, saves when the
    stage's should_save says (pretraining's per-shard checkpoint lives there, not in the loop), and logs the tokens
    train_step returns (an override, as RolloutTrainer's, is believed; nothing is passed on the side)."""
    cfg = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "run", max_steps=4, save_every=0, eval_every=0)
    trainer = run_trainer(OpaqueStage, cfg)
    rows = read_metrics(cfg.out_dir)
    assert trainer.step == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # tok_per_s is the step's tokens over its time (log_every=1): the step's tokens are train_step's return value
    assert [r["tok_per_s"] * r["dt_ms"] / 1000 for r in rows] == pytest.approx([OpaqueStage.STEP_TOKENS] * 4)
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_000003", "step_000004"]
    assert read_metrics(cfg.out_dir, split="eval")  # evaluation ran on build_data's own batches


def test_a_checkpoint_holds_the_parts_it_is_given_and_reads_no_trainer(tiny_tokenizer_dir, shards, tmp_path):
    """trainer/checkpoint.py takes its parts explicitly: parts that no Trainer built save a step, and it comes back
    whole into other parts (weights, optimizer moments, data position, the stage's own state, the RNG)."""
    import torch
    from transformers import AutoTokenizer

    from dataset.batches import IndexBatches
    from tests.helpers import tiny_model
    from trainer import checkpoint
    from trainer.common import resume_candidates
    from trainer.guard import StepGuard

    cfg = make_pretrain_cfg(tiny_tokenizer_dir, shards, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cpu = torch.device("cpu")
    loaded_extra = {}

    def parts(seed: int) -> checkpoint.Parts:
        model = tiny_model(len(tokenizer), seed=seed)
        return checkpoint.Parts(
            cfg=cfg,
            stage="unit",
            model=model,
            model_class=type(model).__name__,
            tokenizer=tokenizer,
            weights=checkpoint.ModelWeights(),
            optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
            guard=StepGuard(cpu, torch.float32),
            data=IndexBatches(list(range(16)), global_batch=4, micro_batch=2, collate=list),
            extra_state=lambda: {"queue": [1, 2]},
            load_extra_state=lambda *, state: loaded_extra.update(state),
            global_batch=4,
            dtype=torch.float32,
            device=cpu,
            rank=0,
            world_size=1,
            fsdp=False,
        )

    saved = parts(seed=0)
    ids = torch.arange(16)[None]
    saved.model(input_ids=ids, labels=ids).loss.backward()
    saved.optimizer.step()
    saved.data.next_step()
    path = checkpoint.save(saved, step=7, tokens_seen=700)
    after_save = torch.rand(4)

    fresh = parts(seed=1)  # other weights, no optimizer state, the data at its start, the RNG elsewhere
    candidates = resume_candidates(cfg.out_dir, "auto")
    found = checkpoint.newest_readable(candidates, explicit=False, stage="unit", read_weights=fresh.weights.read)
    assert found[0] == path
    assert checkpoint.restore(fresh, *found) == (7, 700)
    for (name, a), b in zip(saved.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in saved.optimizer.state_dict()["state"].values()]
    restored = [(s["exp_avg"], s["exp_avg_sq"]) for s in fresh.optimizer.state_dict()["state"].values()]
    assert len(moments) == len(restored) > 0
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(moments, restored))
    assert fresh.data.state_dict() == {"epoch": 0, "cursor": 4}
    assert loaded_extra == {"queue": [1, 2]}
    assert torch.equal(torch.rand(4), after_save)


FROM_A_CHECKPOINT = ("sft", "lora", "dpo", "reward", "ppo", "grpo")  # their Config refuses model_config


@pytest.mark.parametrize("stage", FROM_A_CHECKPOINT)
def test_a_stage_without_an_architecture_of_its_own_needs_init_from(stage):
    """A stage whose Config refuses model_config builds its model from init_from only: an empty init_from is a
    ConfigError before anything is loaded, not a random model of the default preset."""
    module = importlib.import_module(f"trainer.{stage}")
    trainer_cls = next(c for c in stage_trainers() if c.__module__ == module.__name__)
    assert "model_config" not in {f.name for f in dataclasses.fields(module.Config)}
    with pytest.raises(ConfigError, match=f"init_from is empty: stage {trainer_cls.stage} starts from a saved model"):
        trainer_cls(module.Config(init_from="", device="cpu"))


@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_stages_with_a_model_config_may_start_from_random_weights(stage):
    module = importlib.import_module(f"trainer.{stage}")
    trainer_cls = next(c for c in stage_trainers() if c.__module__ == module.__name__)
    assert trainer_cls(module.Config(init_from="", device="cpu")).cfg.init_from == ""


def test_gpu_peak_flops_matches_whole_names_and_follows_the_dtype():
    import torch

    from trainer.common import gpu_peak_flops

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    expected = {
        ("NVIDIA H100 80GB HBM3", bf16): 989e12,
        ("NVIDIA H100 PCIe", bf16): 756e12,
        ("NVIDIA H100 NVL", bf16): 835e12,
        ("NVIDIA H200", bf16): 989e12,
        ("NVIDIA A100-SXM4-80GB", bf16): 312e12,
        ("NVIDIA A100 80GB PCIe", fp16): 312e12,
        ("NVIDIA A100-SXM4-40GB", fp32): 156e12,  # TF32
        ("NVIDIA L40S", bf16): 362e12,
        ("NVIDIA L40", bf16): 181e12,
        ("NVIDIA L4", bf16): 121e12,
        ("NVIDIA GeForce RTX 4090", bf16): 165e12,
        ("NVIDIA GeForce RTX 3090", fp16): 71e12,
        ("Tesla T4", fp16): 65e12,
        ("Tesla T4", fp32): 8.1e12,
        ("Tesla V100-SXM2-16GB", fp16): 125e12,
        ("Tesla V100-PCIE-32GB", fp16): 112e12,
        ("Tesla T4", bf16): None,
        ("Tesla V100-SXM2-16GB", bf16): None,  # emulated bf16: no peak, no MFU
        ("NVIDIA GeForce GTX 1080", fp16): None,
        ("NVIDIA RTX A6000", bf16): None,
    }  # unknown: no MFU
    got = {key: gpu_peak_flops(*key) for key in expected}
    assert got == expected


def test_host_values_go_to_a_gpu_from_pinned_memory_without_a_host_wait(monkeypatch):
    """A pageable copy to CUDA makes the host wait for the GPU; pinned + non_blocking only queues it. CUDA is faked:
    the test records what the helper asks of the tensor."""
    import torch

    from trainer.common import host_to_device

    on_cpu = host_to_device(7, torch.device("cpu"))
    assert on_cpu.dtype == torch.float32 and float(on_cpu) == 7.0 and not on_cpu.is_pinned()
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking: calls.append((device, non_blocking)))
    host_to_device(7, torch.device("cuda:1"))
    host_to_device(torch.arange(3), torch.device("cuda"))
    host_to_device(torch.arange(3), torch.device("cpu"))
    host_to_device(torch.arange(3), torch.device("mps"))  # Apple's GPU shares host memory: neither pinned nor async
    assert calls == [
        "pin",
        (torch.device("cuda:1"), True),
        "pin",
        (torch.device("cuda"), True),
        (torch.device("cpu"), False),
        (torch.device("mps"), False),
    ]


def test_the_probe_keeps_no_gradients_and_no_peak(monkeypatch):
    """probe_micro_batch on a faked CUDA device: the trials' memory peak is reset once all trials are done, so
    peak_mem_gb reports training; the per-trial cache is emptied; an OOM ends the search."""
    import torch

    from trainer.common import probe_micro_batch

    events = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    model = torch.nn.Linear(2, 2)

    def trial(n: int):
        events.append(n)
        model(torch.ones(n, 2)).sum().backward()
        if n > 4:
            raise torch.OutOfMemoryError("fake")

    assert probe_micro_batch(trial, model=model, target=64, device=torch.device("cuda")) == 2
    assert events == [1, "empty_cache", 2, "empty_cache", 4, "empty_cache", 8, "empty_cache", "reset"]
    assert model.weight.grad is None
