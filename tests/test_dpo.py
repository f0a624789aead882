"""
DPO (trainer/dpo.py) and the preference-pair reader (dataset/preference_data.py) on a tiny model: the four
input formats read to the same pairs, the first logged loss is log 2 (policy = reference), training moves the
policy towards the chosen replies, resume is exact (precomputed reference included), a few steps run on
the shared real preference files through main.py, and the sigmoid and IPO losses equal TRL's DPOTrainer on the
same batch (skipped without TRL).

    python -m pytest tests/test_dpo.py
"""

import math
import typing

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SHARED_DATA, read_metrics, tiny_checkpoint
from tests.helpers_preference import toy_pairs, write_pairs
from tests.helpers_thirdparty import require_thirdparty, run_thirdparty

SHARED_DPO = SHARED_DATA / "dpo"


@pytest.fixture(scope="module")
def policy_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    return tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path_factory.mktemp("policy") / "final"))


def dpo_config(init_from: str, out_dir, data_path: str, **overrides):
    from trainer.dpo import Config

    base = {
        "init_from": init_from,
        "out_dir": str(out_dir),
        "data_path": data_path,
        "seq_len": 64,
        "batch_size": 8,
        "global_batch_size": 8,
        "lr": 2e-3,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "beta": 0.1,
        "val_samples": 0,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 1,
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
    }
    return Config(**{**base, **overrides})


# -----------------------------------------------------------------------------


def test_the_four_formats_read_to_the_same_pairs(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from dataset.chat_data import length_bucket
    from dataset.preference_data import (
        PairDataset,
        collate_pairs,
        load_pairs,
        tokenize_pairs,
    )

    pairs = toy_pairs(6)
    formats = (("messages", ".jsonl"), ("ranking", ".json"), ("strings", ".jsonl"), ("hh", ".jsonl.gz"))
    loaded = [
        load_pairs(write_pairs(str(tmp_path / f"p_{fmt}{ext}"), pairs, fmt), log=lambda *a: None)[0]
        for fmt, ext in formats
    ]
    assert all(x == loaded[0] for x in loaded) and len(loaded[0]) == len(set(pairs))
    assert loaded[0][0] == {
        "prompt": [{"role": "user", "content": pairs[0][0]}],
        "chosen": pairs[0][1],
        "rejected": pairs[0][2],
    }
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    samples = tokenize_pairs(loaded[0][:2], tok, seq_len=64)
    batch = collate_pairs([PairDataset(samples)[i] for i in range(2)], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # [chosen_0, chosen_1, rejected_0, rejected_1]
    # The loss mask covers exactly the reply and its <|im_end|>, and each row ends there.
    for row, reply in zip(range(4), [pairs[0][1], pairs[1][1], pairs[0][2], pairs[1][2]]):
        targets = batch["input_ids"][row, 1:][batch["loss_mask"][row]].tolist()
        assert tok.decode(targets) == reply + "<|im_end|>"
        last = batch["input_ids"][row, batch["attention_mask"][row].sum() - 1]
        assert last == tok.convert_tokens_to_ids("<|im_end|>")
        assert batch["last_index"][row] == batch["attention_mask"][row].sum() - 1  # where the reward model reads
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())
    longest = int(batch["attention_mask"].sum(-1).max())
    bucketed = collate_pairs([PairDataset(samples)[i] for i in range(2)], pad_id=tok.pad_token_id, seq_len=64)
    assert bucketed["input_ids"].shape[1] == length_bucket(longest, 64)
    assert torch.equal(bucketed["input_ids"][:, :longest], batch["input_ids"][:, :longest])


def test_bad_records_are_counted_or_raise(tmp_path):
    from dataset.chat_data import BadRecord
    from dataset.preference_data import load_pairs

    path = tmp_path / "bad.jsonl"
    good = '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
    path.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "a"}\n{"chosen": "x"}\n' + good + good, encoding="utf-8"
    )
    pairs, stats = load_pairs(str(path), on_bad="skip", log=lambda *a: None)
    assert len(pairs) == 1 and stats["skip:identical replies"] == 1 and stats["skip:unknown format"] == 1
    assert stats["skip:duplicate"] == 1
    with pytest.raises(BadRecord, match="bad.jsonl:1"):
        load_pairs(str(path), on_bad="error", log=lambda *a: None)


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_dpo_starts_at_log2_and_moves_towards_chosen(policy_dir, tmp_path, capsys):
    from trainer.dpo import run

    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(48), "strings")
    out = tmp_path / "dpo"
    trainer = run(dpo_config(policy_dir, out, data, max_steps=12, val_samples=8, eval_every=0))
    assert "= global batch 8 pairs" in capsys.readouterr().out  # the startup line says what batch_size counts
    train = read_metrics(str(out))
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1 is computed before any update
    assert train[-1]["loss"] < 0.5 * math.log(2), [r["loss"] for r in train]
    assert train[-1]["reward_acc"] == 1.0 and train[-1]["margin"] > 0.5
    assert train[-1]["chosen_reward"] > train[0]["chosen_reward"]
    evals = read_metrics(str(out), split="eval")
    assert evals[-1]["reward_acc"] == 1.0 and evals[-1]["loss"] < 0.5 * math.log(2)
    card = (out / "final" / "README.md").read_text(encoding="utf-8")  # final/'s card lists the last evaluation
    assert f"- reward_acc: {evals[-1]['reward_acc']:.4f}" in card and f"- loss: {evals[-1]['loss']:.4f}" in card
    # The policy itself now prefers the chosen replies more than the reference does, on held-out pairs too.
    batch = trainer.val_batches[0]
    from trainer.logprobs import sequence_logprobs

    with torch.no_grad():
        pi = sequence_logprobs(trainer.raw_model, batch["input_ids"], batch["loss_mask"]).chunk(2)
        ref = sequence_logprobs(trainer.ref, batch["input_ids"], batch["loss_mask"]).chunk(2)
    assert ((pi[0] - pi[1]) > (ref[0] - ref[1])).all()


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_dpo_resumes_exactly_with_precomputed_reference(policy_dir, tmp_path):
    from trainer.dpo import run

    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(24), "messages")
    common = {"batch_size": 2, "global_batch_size": 4, "save_every": 2, "precompute_ref": True, "loss_type": "ipo"}
    run(dpo_config(policy_dir, tmp_path / "straight", data, max_steps=4, **common))
    run(dpo_config(policy_dir, tmp_path / "resumed", data, max_steps=2, **common))
    trainer = run(dpo_config(policy_dir, tmp_path / "resumed", data, max_steps=4, **common))
    assert trainer.step == 4 and trainer.ref is None  # the reference was freed after precomputing
    a = load_file(str(tmp_path / "straight" / "step_000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "step_000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_on_the_shared_preference_files(policy_dir, tmp_path):
    """All four shared files (four formats, one of them hh-rlhf) through main.py with config/dpo.yaml."""
    if not SHARED_DPO.is_dir():
        pytest.skip(f"shared preference data not found at {SHARED_DPO}")
    import main

    files = ",".join(str(p) for p in sorted(SHARED_DPO.iterdir()))
    out = tmp_path / "dpo_real"
    rc = main.main(
        [
            "--stage",
            "dpo",
            "--config",
            "config/dpo.yaml",
            f"init_from={policy_dir}",
            f"data_path={files}",
            f"out_dir={out}",
            "max_samples=12",
            "seq_len=128",
            "batch_size=4",
            "global_batch_size=4",
            "max_steps=3",
            "val_samples=4",
            "eval_batches=1",
            "device=cpu",
            "log_every=1",
        ]
    )
    assert rc == 0 and (out / "final" / "model.safetensors").is_file()
    train = read_metrics(str(out))
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(r["loss"]) for r in train)


@pytest.mark.slow
def test_every_loss_type_equals_trl_on_the_same_batch(policy_dir, tiny_tokenizer_dir, tmp_path):
    """Our stage's compute_loss and TRL's DPOTrainer.compute_loss (stock Llama exports of the same weights, a
    policy that differs from its reference) on the same two pairs' token ids, for every loss_type the stage offers
    (sigmoid, ipo, hinge). IPO averages each reply's log-ratio over its tokens in both; the token-summed form would
    differ."""
    require_thirdparty("trl", "trl")
    import json

    from dataset.preference_data import PairDataset, collate_pairs, read_pair_samples
    from scripts.export_llama import export_llama
    from trainer.dpo import DPOTrainer, dpo_loss

    ref_dir = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "ref"), seed=1)
    two_pairs = [
        ("中国的首都是哪里？", "北京是中国的首都。", "处处闻啼鸟。"),
        ("今天天气怎么样？", "天气很好。", "床前明月光，疑是地上霜。"),
    ]  # replies of different lengths
    data = write_pairs(str(tmp_path / "pairs.jsonl"), two_pairs, "strings")
    beta = 0.5
    ours = {}
    from trainer.dpo import Config

    loss_types = typing.get_args(typing.get_type_hints(Config)["loss_type"])  # the field's Literal choices
    for loss_type in loss_types:
        trainer = DPOTrainer(
            dpo_config(
                policy_dir,
                tmp_path / loss_type,
                data,
                ref_from=ref_dir,
                beta=beta,
                loss_type=loss_type,
                batch_size=2,
                global_batch_size=2,
                max_steps=1,
            )
        )
        trainer.prepare()
        samples, _ = read_pair_samples(data, trainer.tokenizer, 64)
        batch = trainer.to_device(
            collate_pairs([PairDataset(samples)[i] for i in range(2)], pad_id=trainer.tokenizer.pad_token_id)
        )
        trainer.model.eval()
        with torch.no_grad():
            ours[loss_type] = float(trainer.compute_loss(batch=batch, num_items=2)[0])
    # The same ids for TRL: the prompt is what precedes the reply mask, the reply is the masked tail.
    pairs = []
    for s in samples:
        start = int(s["chosen_mask"].argmax())
        assert s["chosen_mask"][start:].all() and s["rejected_mask"][start:].all()
        assert list(s["chosen_ids"][:start]) == list(s["rejected_ids"][:start])
        assert not s["rejected_mask"][:start].any()
        pairs.append(
            {
                "prompt_ids": s["chosen_ids"][:start].tolist(),
                "chosen_ids": s["chosen_ids"][start:].tolist(),
                "rejected_ids": s["rejected_ids"][start:].tolist(),
            }
        )
    (tmp_path / "ids.json").write_text(json.dumps(pairs))
    policy_llama = export_llama(policy_dir, str(tmp_path / "policy_llama"), "fp32")
    ref_llama = export_llama(ref_dir, str(tmp_path / "ref_llama"), "fp32")
    trl = run_thirdparty(
        "trl", "trl", "run_trl_dpo.py", [policy_llama, ref_llama, str(tmp_path / "ids.json"), str(beta)], tmp_path
    )
    for loss_type in loss_types:
        assert ours[loss_type] == pytest.approx(trl[loss_type], abs=1e-5), loss_type
    assert ours["hinge"] > 0  # inside the hinge's margin: the relu does not hide a difference
    assert ours["sigmoid"] != pytest.approx(math.log(2), abs=1e-3)  # the policy is not its reference
    # What the summed (pre-TRL) IPO would give on this batch: far from TRL's, so the test tells them apart.
    with torch.no_grad():
        from trainer.logprobs import sequence_logprobs

        pi = sequence_logprobs(trainer.model, batch["input_ids"], batch["loss_mask"]).chunk(2)
        ref = sequence_logprobs(trainer.ref, batch["input_ids"], batch["loss_mask"]).chunk(2)
        ones = torch.ones(2)
        summed = float(dpo_loss(*pi, *ref, beta, "ipo", chosen_tokens=ones, rejected_tokens=ones)[0].mean())
    assert abs(summed - trl["ipo"]) > 1e-3


def test_batch_size_auto_probes_pairs_and_the_reference(policy_dir, tmp_path, monkeypatch):
    """The CUDA probe, on CPU, with a forward that runs "out of memory" above 16 rows: a DPO micro-batch of B
    pairs is 2B rows, and each trial also runs the frozen reference (without gradients) on them."""
    from model import SLMForCausalLM
    from trainer.dpo import DPOTrainer

    forward = SLMForCausalLM.forward
    calls = []

    def limited(self, input_ids=None, **kwargs):
        calls.append((input_ids.shape[0], torch.is_grad_enabled(), self))
        if input_ids.shape[0] > 16:
            raise torch.OutOfMemoryError("fake: over 16 rows")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(SLMForCausalLM, "forward", limited)
    monkeypatch.setattr(DPOTrainer, "_auto_micro_batch", lambda self: self._probe_micro_batch())
    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(64), "strings")
    trainer = DPOTrainer(dpo_config(policy_dir, tmp_path / "auto", data, batch_size="auto", global_batch_size=32))
    trainer.prepare()
    # 8 pairs = 16 rows fit, 16 pairs do not: 8 fit, halved for headroom -> 4 pairs, accumulated 8x to 32.
    assert (trainer.micro_batch, trainer.accum_steps) == (4, 8)
    # Trials of 1, 2, 4, 8 pairs: the policy with gradients, then the reference without; then 16 pairs fail.
    policy, ref = trainer.raw_model, trainer.ref
    assert calls[:9] == [(r, grad, m) for r in (2, 4, 8, 16) for grad, m in ((True, policy), (False, ref))] + [
        (32, True, policy)
    ]
    assert all(p.grad is None for p in trainer.raw_model.parameters())
