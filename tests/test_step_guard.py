"""
The step guard (trainer/guard.py) through the real trainers: fp16 on CPU with a forced overflow skips steps,
lowers the scale, keeps training and resumes bit-exactly, the optimizer skipping on the device exactly as a host
read would (AdamW and Muon); a non-finite loss stops with a good state saved, also when it is noticed only on the
next log step; too many skips in a row stop; and no training step of pretrain (AdamW and Muon), SFT, DPO, reward,
distill, GRPO or PPO reads a device value (.item(), bool(), float(), a boolean index) outside the log steps, but
PPO's target_kl check, once per step.

    python -m pytest tests/test_step_guard.py
"""

import functools
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer

from dataset.batches import PrefetchBatches
from tests.helpers import read_metrics, tiny_checkpoint, write_chat_file, write_shards
from tests.helpers_preference import PROMPTS, toy_pairs, write_pairs
from trainer.common import TrainingStopped
from trainer.core import run_trainer
from trainer.pretrain import Config, PretrainTrainer


@pytest.fixture(scope="module")
def shards(tiny_tokenizer_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rng = random.Random(0)
    words = [
        "北京是中国的首都。",
        "今天天气很好。",
        "我们学习数学。",
        "春眠不觉晓。",
        "hello world.",
        "人工智能是科学。",
    ]
    texts = ["".join(rng.choice(words) for _ in range(rng.randrange(2, 6))) for _ in range(600)]
    return write_shards(tok, texts, str(tmp_path_factory.mktemp("shards")), n_shards=3)


def make_cfg(tokenizer_dir, shards, out_dir, **overrides) -> Config:
    base = {
        "model_config": "tiny",
        "tokenizer_dir": tokenizer_dir,
        "data_dir": shards,
        "out_dir": str(out_dir),
        "max_steps": 12,
        "batch_size": 4,
        "global_batch_size": 8,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 2,
        "log_every": 1,
        "eval_every": 6,
        "eval_batches": 2,
        "save_every": 4,
        "keep_last": 10,
        "sample_tokens": 0,
        "seed": 7,
    }
    return Config(**{**base, **overrides})


def fp16_cfg(tokenizer_dir, shards, out_dir, **overrides):
    # 2**24 overflows the tiny model's fp16 gradients at once: the scale must halve its way down first.
    base = {
        "device": "cpu",
        "dtype": "fp16",
        "fp16_init_scale": 2.0**24,
        "max_steps": 8,
        "eval_every": 0,
        "save_every": 0,
        "lr_schedule": "constant",
    }
    return make_cfg(tokenizer_dir, shards, out_dir, **{**base, **overrides})


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_fp16_overflow_skips_steps_lowers_the_scale_and_resumes_exactly(tiny_tokenizer_dir, shards, tmp_path):
    straight = fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "straight")
    trainer = run_trainer(PretrainTrainer, straight)
    rows = read_metrics(straight.out_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))  # trained to the end, no stop
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    skipped = [r["skipped_steps"] for r in rows]
    assert skipped[0] == 1 and skipped == sorted(skipped) and 0 < skipped[-1] < 8  # counted, and some steps ran
    assert rows[-1]["loss_scale"] == 2.0**24 / 2 ** skipped[-1]  # halved once per skipped step
    assert trainer.scaler is trainer.guard.scaler and trainer.scaler.get_scale() == rows[-1]["loss_scale"]
    start = PretrainTrainer(fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "init"))
    start.prepare()
    assert not all(torch.equal(a, b) for a, b in zip(weights(start), weights(trainer)))  # real updates happened

    # 4 steps, a checkpoint, then 4 more in a fresh trainer: the same losses, scale and weights, bit for bit.
    half = fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "resumed", max_steps=4)
    run_trainer(PretrainTrainer, half)
    resumed = run_trainer(PretrainTrainer, fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "resumed"))
    assert isinstance(resumed.train_data, PrefetchBatches)  # exact with the next step built ahead (the default)
    again = read_metrics(half.out_dir)
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]
    assert [r["skipped_steps"] for r in again] == skipped
    assert [r["loss_scale"] for r in again] == [r["loss_scale"] for r in rows]
    assert resumed.guard.scaler.get_scale() == trainer.guard.scaler.get_scale()
    assert all(torch.equal(a, b) for a, b in zip(weights(trainer), weights(resumed)))


class SkipsByHostRead(PretrainTrainer):
    """The guard's other branch: the optimizer says it cannot skip a step by itself, so the host reads the flag."""

    def prepare(self):
        super().prepare()
        self.optimizer._step_supports_amp_scaling = False


@pytest.mark.slow  # 5 s each in the quick lane (issue 23 point 6)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_overflow_steps_skipped_on_the_device_match_skipping_by_a_host_read(
    tiny_tokenizer_dir, shards, tmp_path, optimizer
):
    """fp16 with a forced overflow: the optimizer skipping on the device flag (fused AdamW, MuonWithAdamW) gives
    the same losses, skip counts, scales and weights, bit for bit, as the host deciding whether to step."""
    on_device = run_trainer(
        PretrainTrainer, fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "dev", optimizer=optimizer)
    )
    assert on_device.optimizer._step_supports_amp_scaling  # build_optimizer's optimizer skips by itself
    by_host = run_trainer(SkipsByHostRead, fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "host", optimizer=optimizer))
    keys = ("loss", "skipped_steps", "loss_scale", "grad_norm")
    rows = [[tuple(r[k] for k in keys) for r in read_metrics(str(tmp_path / d))] for d in ("dev", "host")]
    assert rows[0] == rows[1]
    assert 0 < rows[0][-1][1] < 8  # some steps were skipped, some trained
    assert all(torch.equal(a, b) for a, b in zip(weights(on_device), weights(by_host)))


def weights(trainer) -> list[torch.Tensor]:
    return [v.detach() for v in trainer.raw_model.state_dict().values()]


def test_too_many_skips_in_a_row_stop_with_the_state_saved(tiny_tokenizer_dir, shards, tmp_path):
    cfg = fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "skips", max_skipped_steps=2, log_every=1)
    with pytest.raises(TrainingStopped, match="2 steps in a row were skipped") as err:
        run_trainer(PretrainTrainer, cfg)
    assert "step_000002" in str(err.value) and (Path(cfg.out_dir) / "step_000002" / "trainer_state.pt").exists()
    # Resumed with a higher limit, the run goes on (the saved state holds no run of skips that stops it again),
    # with the lowered scale and the skip count of the first run.
    trainer = run_trainer(
        PretrainTrainer,
        fp16_cfg(tiny_tokenizer_dir, shards, tmp_path / "skips", max_steps=4, max_skipped_steps=100, log_every=1),
    )
    rows = read_metrics(cfg.out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and trainer.step == 4
    assert rows[2]["skipped_steps"] == 3 and rows[2]["loss_scale"] == 2.0**24 / 2**3


class NanAtStep3(PretrainTrainer):
    def compute_loss(self, *, batch, num_items):
        loss, metrics = super().compute_loss(batch=batch, num_items=num_items)
        return (loss * float("nan") if self.step == 2 else loss), metrics


@pytest.mark.parametrize("log_every", [1, 4])
def test_a_nan_loss_is_never_applied_and_stops_on_the_next_log_step(tiny_tokenizer_dir, shards, tmp_path, log_every):
    """fp32: the NaN step (step 3) is skipped on the device; the stop comes on the first log step after it, and
    the state saved there is finite and went through only finite updates (compare with a clean run's step 2)."""
    cfg = make_cfg(tiny_tokenizer_dir, shards, tmp_path / "nan", save_every=2, log_every=log_every)
    with pytest.raises(TrainingStopped, match="not finite at step 3") as err:
        run_trainer(NanAtStep3, cfg)
    stopped_at = 3 if log_every == 1 else 4  # with log_every=4 the NaN is noticed one step late
    assert f"step_{stopped_at:06d}" in str(err.value)
    saved = load_file(Path(cfg.out_dir) / f"step_{stopped_at:06d}" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    if log_every == 1:  # step 3 was skipped: the weights are exactly those of step 2
        step2 = load_file(Path(cfg.out_dir) / "step_000002" / "model.safetensors")
        assert all(torch.equal(saved[k], step2[k]) for k in step2)
    rows = read_metrics(cfg.out_dir)
    assert rows[-1]["step"] == stopped_at and rows[-1]["skipped_steps"] == 1


class WeightsOverflowAtStep3(PretrainTrainer):
    """A finite loss and gradient whose update overflows the weights (what lr=inf did before the bounds refused it,
    and a huge finite lr can still do): step 3 leaves an inf in one weight."""

    def train_step(self):
        out = super().train_step()
        if self.step == 2:  # train_step runs before the step counter moves: this is step 3's update
            with torch.no_grad():
                self.trainable_parameters()[0].view(-1)[0] = float("inf")
        return out


@pytest.mark.parametrize("log_every", [1, 2])
def test_non_finite_weights_are_never_saved_or_named_the_last_good_state(
    tiny_tokenizer_dir, shards, tmp_path, log_every
):
    """The guard named the state after an overflowing update "the last good state" and saved it (38 of 38 tensors
    non-finite). Now the weights are checked before any save: the stop names the newest checkpoint, which is
    finite, and no step_* dir holds a non-finite tensor."""
    cfg = make_cfg(tiny_tokenizer_dir, shards, tmp_path / "inf", save_every=2, log_every=log_every)
    with pytest.raises(TrainingStopped, match="the weights are not finite") as err:
        run_trainer(WeightsOverflowAtStep3, cfg)
    assert "step_000002" in str(err.value) and "they are not saved" in str(err.value)
    saved = sorted(p.name for p in Path(cfg.out_dir).glob("step_*"))
    assert saved == ["step_000002"]  # with log_every=2 the save of step 4 is refused too
    for path in saved:
        weights = load_file(Path(cfg.out_dir) / path / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values())
    # Resuming goes on from the named state: step 2, finite.
    trainer = run_trainer(PretrainTrainer, make_cfg(tiny_tokenizer_dir, shards, tmp_path / "inf", max_steps=3))
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_non_finite_weights_before_any_checkpoint_say_so(tiny_tokenizer_dir, shards, tmp_path):
    cfg = make_cfg(tiny_tokenizer_dir, shards, tmp_path / "inf0", save_every=0, eval_every=0)
    with pytest.raises(TrainingStopped, match="no checkpoint was saved before it: start again"):
        run_trainer(WeightsOverflowAtStep3, cfg)
    assert not list(Path(cfg.out_dir).glob("step_*"))


# -----------------------------------------------------------------------------
# No host sync inside a training step


def bool_index(args) -> bool:
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None)


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host, except while `paused`: .item(), bool(), int(), float() (all
    end in _local_scalar_dense), and the ops whose output size depends on the values (nonzero, masked_select,
    indexing with a boolean mask), for which the host must learn that size from the GPU. Modes are per thread:
    a prefetch worker is not counted."""

    SIZE_FROM_VALUES = (torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default)
    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reads = (
            func is torch.ops.aten._local_scalar_dense.default
            or func in self.SIZE_FROM_VALUES
            or (func in self.INDEXING and bool_index(args))
        )
        if reads and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def counting(trainer_cls, host_batches: bool = True):
    """trainer_cls whose train_step counts scalar reads, with the optimizer build_optimizer gives it (on CPU as on
    CUDA one that skips a step on a device flag). count_* hooks take the host batch by contract (before to_device,
    so their int() is host arithmetic, not a GPU wait) and are checked for it, not counted; with host_batches false
    (PPO/GRPO: the micro-batches are slices of a rollout buffer already on the device, their counts were summed on
    the host in next_step) the hooks are counted like the rest."""

    class Counted(trainer_cls):
        reads = None  # the counter while a training step runs, else None (evaluation is not counted)
        moved = False  # this step's to_device ran already

        def train_step(self):
            self.reads, self.moved = ScalarReads(), False
            with self.reads:
                result = super().train_step()
            self.reads_per_step = getattr(self, "reads_per_step", []) + [self.reads.count]
            self.reads, self.moved = None, False
            return result

        def next_step(self):  # the data loader, or a new rollout (sampling reads its tokens: once per rollout)
            return self.host_side(super().next_step)

        def to_device(self, batch):
            self.moved = self.reads is not None
            return super().to_device(batch)

        def count_loss_items(self, *, batch):
            assert not self.moved, "count_loss_items must get the host batch"
            count = functools.partial(super().count_loss_items, batch=batch)
            return self.host_side(count) if host_batches else count()

        def count_tokens(self, *, batch):
            assert not self.moved, "count_tokens must get the host batch"
            count = functools.partial(super().count_tokens, batch=batch)
            return self.host_side(count) if host_batches else count()

        def host_side(self, fn):
            if self.reads is None:
                return fn()
            self.reads.paused = True
            try:
                return fn()
            finally:
                self.reads.paused = False

    return Counted


def assert_no_reads(trainer):
    assert len(trainer.reads_per_step) == trainer.cfg.max_steps
    assert trainer.reads_per_step == [0] * trainer.cfg.max_steps


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # muon: the pretraining configs' default
def test_pretrain_steps_read_no_device_scalar(tiny_tokenizer_dir, shards, tmp_path, optimizer):
    cfg = make_cfg(
        tiny_tokenizer_dir,
        shards,
        tmp_path / "pre",
        max_steps=3,
        log_every=100,
        eval_every=0,
        save_every=0,
        optimizer=optimizer,
    )  # 2 micro-batches per step, the last step past the warmup
    assert_no_reads(run_trainer(counting(PretrainTrainer), cfg))
    # fp16 at 2**21 overflows the first two steps (2**20 is still too much, 2**19 is not): both the skipped steps and
    # the applied one read nothing on the host.
    fp16 = fp16_cfg(
        tiny_tokenizer_dir,
        shards,
        tmp_path / "fp16",
        max_steps=3,
        log_every=100,
        optimizer=optimizer,
        fp16_init_scale=2.0**21,
    )
    trainer = run_trainer(counting(PretrainTrainer), fp16)
    assert_no_reads(trainer)
    assert 0 < read_metrics(fp16.out_dir)[-1]["skipped_steps"] < 3  # steps were skipped and applied, no host read


STAGE_DEFAULTS = {
    "seq_len": 64,
    "global_batch_size": 8,
    "batch_size": 2,
    "max_steps": 3,
    "lr": 1e-3,
    "warmup_steps": 0,
    "val_samples": 0,
    "eval_every": 0,
    "save_every": 0,
    "log_every": 100,
    "device": "cpu",
    "dtype": "fp32",
    "seed": 0,
}


def test_sft_steps_read_no_device_scalar(tiny_tokenizer_dir, tmp_path):
    from trainer.sft import Config as SFTConfig
    from trainer.sft import SFTTrainer

    init = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "init"))
    data = tmp_path / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for user, reply in [
            ("你好", "你好！我是一个小模型。"),
            ("北京是哪里？", "北京是中国的首都。"),
            ("hello", "hello world."),
        ] * 8:
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"conversations": msgs}, ensure_ascii=False) + "\n")
    for pack in (False, True):
        cfg = SFTConfig(
            init_from=init, data_path=str(data), out_dir=str(tmp_path / f"sft_{pack}"), pack=pack, **STAGE_DEFAULTS
        )
        assert_no_reads(run_trainer(counting(SFTTrainer), cfg))


def test_distill_steps_read_no_device_scalar(tiny_tokenizer_dir, tmp_path):
    """Chat data, where only assistant tokens count: the loss masks the others instead of selecting the rest
    (a boolean index asks the host how many there are)."""
    from trainer.distill import ChatDistillTrainer
    from trainer.distill import Config as DistillConfig

    student = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "student"))
    teacher = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "teacher"), seed=1)
    data = write_chat_file(tmp_path / "chat.jsonl", n_copies=4)
    cfg = DistillConfig(
        init_from=student, teacher_from=teacher, data_path=data, out_dir=str(tmp_path / "out"), **STAGE_DEFAULTS
    )
    assert_no_reads(run_trainer(counting(ChatDistillTrainer), cfg))


def test_dpo_steps_read_no_device_scalar(tiny_tokenizer_dir, tmp_path):
    from trainer.dpo import Config as DPOConfig
    from trainer.dpo import DPOTrainer

    init = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "init"))
    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(16), "strings")
    cfg = DPOConfig(init_from=init, data_path=data, out_dir=str(tmp_path / "dpo"), **STAGE_DEFAULTS)
    assert_no_reads(run_trainer(counting(DPOTrainer), cfg))


def test_reward_steps_read_no_device_scalar(tiny_tokenizer_dir, tmp_path):
    from trainer.reward import Config as RewardConfig
    from trainer.reward import RewardTrainer

    init = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "init"))
    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(16), "strings")
    cfg = RewardConfig(init_from=init, data_path=data, out_dir=str(tmp_path / "reward"), **STAGE_DEFAULTS)
    assert_no_reads(run_trainer(counting(RewardTrainer), cfg))


def rl_cfg(stage: str, tiny_tokenizer_dir, tmp_path, **overrides):
    import importlib

    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS[:4]), "utf-8")
    base = {
        "init_from": tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "policy")),
        "data_path": str(prompts),
        "out_dir": str(tmp_path / stage),
        "reward_rules": "token_ids:100-163",
        "max_new_tokens": 8,
        "lr": 1e-3,
        **{k: v for k, v in STAGE_DEFAULTS.items() if k not in ("val_samples", "max_steps", "eval_every")},
        "max_steps": 4,
    }
    return importlib.import_module(f"trainer.{stage}").Config(**{**base, **overrides})


def test_grpo_steps_read_no_device_scalar(tiny_tokenizer_dir, tmp_path):
    """The micro-batches are slices of a rollout buffer on the device: their counts come from the host."""
    from trainer.grpo import GRPOTrainer

    for loss_norm in ("token", "sequence"):  # two steps: a rollout each
        cfg = rl_cfg(
            "grpo", tiny_tokenizer_dir, tmp_path / loss_norm, num_generations=4, loss_norm=loss_norm, max_steps=2
        )
        assert_no_reads(run_trainer(counting(GRPOTrainer, host_batches=False), cfg))


def test_ppo_steps_read_only_the_early_stop_kl(tiny_tokenizer_dir, tmp_path):
    """Two minibatches and two epochs per rollout. target_kl > 0 decides on the host after each optimizer step
    whether the next one still trains on this rollout: exactly that one read per step, none with target_kl=0."""
    from trainer.ppo import PPOTrainer

    common = {"num_generations": 1, "rollout_minibatches": 2, "ppo_epochs": 2, "global_batch_size": 2, "batch_size": 1}
    trainer = run_trainer(
        counting(PPOTrainer, host_batches=False), rl_cfg("ppo", tiny_tokenizer_dir, tmp_path / "kl", **common)
    )
    assert trainer.cfg.target_kl > 0 and trainer.reads_per_step == [1] * trainer.cfg.max_steps
    cfg = rl_cfg("ppo", tiny_tokenizer_dir, tmp_path / "no_kl", target_kl=0.0, **common)
    assert_no_reads(run_trainer(counting(PPOTrainer, host_batches=False), cfg))
