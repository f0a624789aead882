"""
PPO (trainer/ppo.py) and GRPO (trainer/grpo.py) on a tiny model and a toy task they can learn in a few dozen CPU
steps: the reward is the share of reply tokens with an id in 100-163 (1/8 of the vocabulary, so a random
policy already scores ~0.125 and the signal is dense). Both must raise it clearly while the KL to the
reference stays bounded; rollouts must go through the shared Engine; both must resume exactly.

    python -m pytest tests/test_ppo_grpo.py
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import read_metrics, spawn_ranks, tiny_checkpoint
from tests.helpers_preference import PROMPTS

RULE = "token_ids:100-163"


@pytest.fixture(scope="module")
def policy_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    return tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path_factory.mktemp("policy") / "final"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS[:4]), encoding="utf-8"
    )
    return str(path)


def rl_config(stage: str, init_from: str, out_dir, data_path: str, **overrides):
    import importlib

    base = {
        "init_from": init_from,
        "out_dir": str(out_dir),
        "data_path": data_path,
        "seq_len": 64,
        "batch_size": 32,
        "global_batch_size": 32,
        "num_generations": 8,
        "max_new_tokens": 8,
        "lr": 3e-3,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "reward_rules": RULE,
        "kl_coef": 0.05,
        "device": "cpu",
        "dtype": "fp32",
        "save_every": 0,
        "log_every": 1,
        "seed": 0,
    }
    return importlib.import_module(f"trainer.{stage}").Config(**{**base, **overrides})


def count_engine_calls(monkeypatch) -> list:
    from model.engine import Engine

    calls, generate = [], Engine.generate

    def spy(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    return calls


def assert_learned(out_dir, first: int = 3, last: int = 3, max_kl: float = 3.0) -> tuple[float, float]:
    rows = read_metrics(str(out_dir))
    before = sum(r["reward"] for r in rows[:first]) / first
    after = sum(r["reward"] for r in rows[-last:]) / last
    assert after > before + 0.3, [round(r["reward"], 3) for r in rows]
    assert all(r["kl"] < max_kl for r in rows), [round(r["kl"], 3) for r in rows]
    return before, after


# -----------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_raises_a_rule_reward_through_the_engine(policy_dir, prompts_file, tmp_path, monkeypatch):
    from trainer.grpo import run

    calls = count_engine_calls(monkeypatch)
    out = tmp_path / "grpo"
    run(rl_config("grpo", policy_dir, out, prompts_file, max_steps=20))
    before, after = assert_learned(out)
    print(f"GRPO reward {before:.3f} -> {after:.3f}")
    assert calls == [32] * 20  # one rollout of 4 prompts x 8 replies per step, all through Engine.generate


@pytest.mark.slow
def test_ppo_raises_a_rule_reward_through_the_engine(policy_dir, prompts_file, tmp_path, monkeypatch):
    from trainer.ppo import run

    calls = count_engine_calls(monkeypatch)
    out = tmp_path / "ppo"
    # PPO moves less per rollout than GRPO here (clipped epochs, a value head learning from scratch): higher lr.
    run(
        rl_config(
            "ppo",
            policy_dir,
            out,
            prompts_file,
            max_steps=32,
            ppo_epochs=2,
            rollout_minibatches=1,
            target_kl=0.0,
            lr=1e-2,
        )
    )
    before, after = assert_learned(out)
    print(f"PPO reward {before:.3f} -> {after:.3f}")
    assert calls == [32] * 16  # 2 optimizer steps (epochs) per rollout
    rows = read_metrics(str(out))
    assert all(k in rows[-1] for k in ("value_loss", "clip_frac", "approx_kl", "response_len", "kl_ref"))


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_resumes_exactly(stage, policy_dir, prompts_file, tmp_path):
    """2 steps, stop, resume to 4 == 4 steps straight. PPO takes 3 steps per rollout, so its checkpoint at
    step 2 holds an unfinished rollout buffer (and the value head), which must come back too."""
    import importlib

    run = importlib.import_module(f"trainer.{stage}").run
    common = {"batch_size": 8, "global_batch_size": 16, "save_every": 2, "ppo_epochs": 3 if stage == "ppo" else 1}
    if stage == "ppo":
        common.update(num_generations=1, target_kl=0.0, rollout_minibatches=1, batch_size=2, global_batch_size=4)
    run(rl_config(stage, policy_dir, tmp_path / "straight", prompts_file, max_steps=4, **common))
    run(rl_config(stage, policy_dir, tmp_path / "resumed", prompts_file, max_steps=2, **common))
    trainer = run(rl_config(stage, policy_dir, tmp_path / "resumed", prompts_file, max_steps=4, **common))
    assert trainer.step == 4
    a = load_file(str(tmp_path / "straight" / "step_000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "step_000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_shared_critic_values_are_the_head_on_the_actors_hidden_state(policy_dir, prompts_file, tmp_path):
    """The shared value head reads the hidden state kept from the actor's forward on the rollout (no second
    forward of its own): its values must be the head applied to the actor's final hidden state of those ids."""
    from trainer.ppo import PPOTrainer

    sizes = {"num_generations": 1, "batch_size": 4, "global_batch_size": 4, "rollout_minibatches": 1}
    trainer = PPOTrainer(rl_config("ppo", policy_dir, tmp_path / "ppo", prompts_file, **sizes))
    trainer.prepare()
    torch.nn.init.normal_(trainer.value_head.weight)  # the head starts at 0, whatever state it reads
    (prompts,) = trainer.train_data.next_step()
    buf, _ = trainer.make_rollout(prompts)
    with torch.no_grad():
        hidden = trainer.raw_model.model(buf["input_ids"])[0]
        expected = trainer.value_head(hidden[:, :-1]).squeeze(-1) * buf["mask"]
    assert buf["values"].abs().sum() > 0
    torch.testing.assert_close(buf["values"], expected)


def test_rule_rewards():
    from trainer.rewards import Completion, parse_rules, register_rule, rule_rewards

    @register_rule("has_hao")  # a user rule in three lines
    def has_hao(c, arg):
        return float("好" in c.text)

    done = Completion("答案是 42。", [5, 6, 7, 2], answer="42", finished=True)
    loop = Completion("啊啊啊啊", [9, 9, 9, 9, 9, 9], answer="41", finished=False)
    rules = parse_rules("exact,format=0.5,repetition:2,length:4=0.1,has_hao,contains:42=2,token_ids:5-7")
    got = rule_rewards(rules, [done, loop])
    assert got[0].item() == pytest.approx(1 + 0.5 + 0 + 0.1 + 0 + 2 + 0.75)
    assert got[1].item() == pytest.approx(0 + 0 - 0.8 + 0.1 * 0.5 + 0 + 0 + 0)
    with pytest.raises(ValueError, match="unknown reward rule"):
        parse_rules("nope")


def test_gsm8k_answers_are_read_by_the_gsm8k_and_exact_rules():
    """GSM8K's reference answer ends with "#### N": the gsm8k rule compares numbers (after "####", in \\boxed{} or
    the reply's last one; "1,000" is 1000), exact compares the text after "####" with the reply's final answer."""
    from trainer.rewards import Completion, parse_rules, rule_rewards

    answer = "她卖了 48 / 2 = 24 个。\n48 + 24 = 72\n#### 1,072"
    replies = ["所以一共是 1072 个。", "答案是 \\boxed{1072}", "#### 1,072", "一共 72 个", "不知道", "答案：1,072"]
    completions = [Completion(text, [], answer=answer) for text in replies]
    assert rule_rewards(parse_rules("gsm8k"), completions).tolist() == [1, 1, 1, 0, 0, 1]
    assert rule_rewards(parse_rules("exact"), completions).tolist() == [0, 0, 1, 0, 0, 1]
    assert rule_rewards(parse_rules("gsm8k"), [Completion("72", [], answer=None)]).tolist() == [0]


def _early_stop_worker(rank: int, kl_by_rank: list[float], target_kl: float) -> dict:
    """One rank of spawn_ranks' gloo group: RolloutTrainer.train_step after an optimizer step whose PPO KL was
    kl_by_rank[rank] on this rank (the shared core's step is replaced by one that reports it). Returns whether
    the rank kept its rollout buffer, and the KL it logged."""
    from types import SimpleNamespace

    from trainer.core import Trainer
    from trainer.rollout import RolloutTrainer

    Trainer.train_step = lambda self: ({"approx_kl": torch.tensor(kl_by_rank[rank])}, 1)  # this process only
    trainer = object.__new__(RolloutTrainer)  # only what train_step reads
    trainer.cfg = SimpleNamespace(target_kl=target_kl)
    trainer.distributed, trainer.world_size = True, 2
    trainer.queue, trainer.rollout_stats = [["the next micro-batches of this rollout"]], {}
    metrics, _ = trainer.train_step()
    return {"kept_rollout": bool(trainer.queue), "approx_kl": float(metrics["approx_kl"])}


@pytest.mark.slow
def test_ppo_early_stop_is_agreed_across_ranks(tmp_path):
    """target_kl under DDP: each rank's own KL would stop rank 1 alone in the first case and rank 0 alone in the
    second (the stop is at 1.5 x target_kl = 0.03); on the ranks' mean KL all of them decide alike."""
    continues = spawn_ranks(_early_stop_worker, ([0.0, 0.04], 0.02), tmp_path / "continue", timeout=120)
    assert [r["kept_rollout"] for r in continues] == [True, True]
    assert [r["approx_kl"] for r in continues] == pytest.approx([0.02, 0.02])
    stops = spawn_ranks(_early_stop_worker, ([0.05, 0.02], 0.02), tmp_path / "stop", timeout=120)
    assert [r["kept_rollout"] for r in stops] == [False, False]
