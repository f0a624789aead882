"""
The reward model (trainer/reward.py): Bradley-Terry on SLMForSequenceClassification loaded from a causal-LM
checkpoint. It must beat chance on held-out pairs of a separable toy preference, and its final/ must be usable
as PPO's and GRPO's reward_from (and PPO's separate critic). Also a few steps on the shared real files.

    python -m pytest tests/test_reward.py
"""

import pytest
import torch

from tests.helpers import SHARED_DATA, read_metrics, tiny_checkpoint
from tests.helpers_preference import toy_pairs, write_pairs

SHARED_DPO = SHARED_DATA / "dpo"


@pytest.fixture(scope="module")
def sft_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    return tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path_factory.mktemp("sft") / "final"))


def reward_config(init_from: str, out_dir, data_path: str, **overrides):
    from trainer.reward import Config

    base = {
        "init_from": init_from,
        "out_dir": str(out_dir),
        "data_path": data_path,
        "seq_len": 64,
        "batch_size": 8,
        "global_batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "val_samples": 16,
        "eval_every": 0,
        "eval_batches": 4,
        "save_every": 0,
        "log_every": 5,
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
    }
    return Config(**{**base, **overrides})


@pytest.mark.slow
def test_reward_model_beats_chance_on_held_out_pairs_and_serves_rl(sft_dir, tmp_path):
    from trainer.reward import run

    data = write_pairs(str(tmp_path / "pairs.json"), toy_pairs(96, seed=1), "ranking")
    out = tmp_path / "rm"
    trainer = run(reward_config(sft_dir, out, data, max_steps=20))
    evals = read_metrics(str(out), split="eval")
    print(f"reward model held-out accuracy {evals[-1]['accuracy']:.3f} (loss {evals[-1]['loss']:.3f})")
    assert len(trainer.val_batches) >= 2 and evals[-1]["accuracy"] >= 0.9 and evals[-1]["loss"] < 0.5

    # Its final/ is a reward_from for GRPO (summed with a rule) and PPO (which also takes it as its critic).
    prompts = tmp_path / "prompts.jsonl"
    write_pairs(str(prompts), toy_pairs(8), "strings")  # preference files double as prompt files
    from trainer.grpo import Config as GRPOConfig
    from trainer.grpo import run as run_grpo
    from trainer.ppo import Config as PPOConfig
    from trainer.ppo import run as run_ppo

    common = {
        "init_from": sft_dir,
        "data_path": str(prompts),
        "reward_from": str(out / "final"),
        "seq_len": 64,
        "batch_size": 8,
        "global_batch_size": 8,
        "max_new_tokens": 6,
        "max_steps": 2,
        "device": "cpu",
        "dtype": "fp32",
        "save_every": 0,
        "log_every": 1,
        "seed": 0,
    }
    run_grpo(GRPOConfig(out_dir=str(tmp_path / "grpo"), num_generations=4, reward_rules="length:4", **common))
    run_ppo(PPOConfig(out_dir=str(tmp_path / "ppo"), critic="separate", rollout_minibatches=1, **common))
    for stage in ("grpo", "ppo"):
        rows = read_metrics(str(tmp_path / stage))
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["reward"])) for r in rows)


def test_reward_on_the_shared_preference_files(sft_dir, tmp_path):
    if not SHARED_DPO.is_dir():
        pytest.skip(f"shared preference data not found at {SHARED_DPO}")
    import main

    files = ",".join(str(p) for p in sorted(SHARED_DPO.iterdir()))
    out = tmp_path / "rm_real"
    rc = main.main(
        [
            "--stage",
            "reward",
            "--config",
            "config/reward.yaml",
            f"init_from={sft_dir}",
            f"data_path={files}",
            f"out_dir={out}",
            "max_samples=12",
            "seq_len=128",
            "batch_size=4",
            "global_batch_size=4",
            "max_steps=3",
            "val_samples=8",
            "eval_batches=2",
            "device=cpu",
            "log_every=1",
        ]
    )
    assert rc == 0 and (out / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3]
    assert 0 <= read_metrics(str(out), split="eval")[-1]["accuracy"] <= 1


def test_batch_size_auto_probes_pairs_scored_at_the_last_token(sft_dir, tmp_path, monkeypatch):
    """The CUDA probe, on CPU, with a forward that runs "out of memory" above 16 rows: a reward micro-batch of B
    pairs is 2B rows, each scored at its last token (no language-model labels, which a score cannot take)."""
    from model import SLMForSequenceClassification
    from trainer.reward import RewardTrainer

    forward = SLMForSequenceClassification.forward
    calls = []

    def limited(self, input_ids=None, **kwargs):
        calls.append((input_ids.shape[0], kwargs.get("labels") is None, kwargs.get("last_index") is not None))
        if input_ids.shape[0] > 16:
            raise torch.OutOfMemoryError("fake: over 16 rows")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(SLMForSequenceClassification, "forward", limited)
    monkeypatch.setattr(RewardTrainer, "_auto_micro_batch", lambda self: self._probe_micro_batch())
    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(64), "strings")
    trainer = RewardTrainer(reward_config(sft_dir, tmp_path / "auto", data, batch_size="auto", global_batch_size=32))
    trainer.prepare()
    # 8 pairs = 16 rows fit, 16 pairs do not: 8 fit, halved for headroom -> 4 pairs, accumulated 8x to 32.
    assert (trainer.micro_batch, trainer.accum_steps) == (4, 8)
    assert calls[:5] == [(rows, True, True) for rows in (2, 4, 8, 16, 32)]
    assert all(p.grad is None for p in trainer.raw_model.parameters())
