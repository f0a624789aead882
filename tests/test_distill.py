"""trainer/distill.py: a student distilled from a tiny teacher ends closer to it (lower KL) on held-out text, on
pretraining shards and on chat data; a teacher with another vocabulary is refused."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from model import SLMConfig, SLMForCausalLM
from tests.conftest import tiny_corpus_lines
from tests.helpers import write_shards
from trainer.core import run_trainer
from trainer.distill import ChatDistillTrainer, Config, ShardDistillTrainer, run
from trainer.pretrain import Config as PretrainConfig
from trainer.pretrain import PretrainTrainer


def save_model(path, tok, seed, **overrides):
    torch.manual_seed(seed)
    model = SLMForCausalLM(SLMConfig.from_preset("tiny", vocab_size=len(tok), **overrides))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@torch.no_grad()
def kl_to_teacher(student_dir, teacher_dir, windows) -> float:
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    s, t = student(input_ids=windows).logits, teacher(input_ids=windows).logits
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    return float(kl) / windows.numel()  # nats per token


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    shards = write_shards(tok, tiny_corpus_lines(400, seed=3), str(root / "shards"), n_shards=1)
    # The teacher: the tiny preset, briefly pretrained so its predictions carry structure a student can learn.
    # The student: a random, smaller model (2 layers).
    teacher_run = PretrainConfig(
        model_config="tiny",
        tokenizer_dir=tiny_tokenizer_dir,
        data_dir=shards,
        out_dir=str(root / "teacher_run"),
        max_steps=20,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        log_every=20,
        eval_every=0,
        save_every=0,
        sample_tokens=0,
        seed=0,
    )
    run_trainer(PretrainTrainer, teacher_run)
    teacher = str(root / "teacher_run" / "final")
    student = save_model(root / "student", tok, 1, num_hidden_layers=2)
    held_out = [tok.encode(line) for line in tiny_corpus_lines(40, seed=99)]
    windows = torch.tensor([ids[:12] for ids in held_out if len(ids) >= 12])
    return {"root": root, "tok": tok, "teacher": teacher, "student": student, "shards": shards, "windows": windows}


def base_cfg(s, out_dir, **overrides) -> Config:
    values = dict(
        teacher_from=s["teacher"],
        init_from=s["student"],
        out_dir=str(out_dir),
        max_steps=15,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        log_every=5,
        eval_every=0,
        eval_batches=2,
        save_every=0,
        sample_tokens=0,
        temperature=1.0,
        alpha=1.0,
        seed=0,
    )
    return Config(**{**values, **overrides})


def test_student_gets_closer_to_teacher_on_shards(setup, tmp_path):
    s = setup
    before = kl_to_teacher(s["student"], s["teacher"], s["windows"])
    trainer = run_trainer(ShardDistillTrainer, base_cfg(s, tmp_path / "run", data_dir=s["shards"]))
    assert trainer.stage == "distill"
    after = kl_to_teacher(tmp_path / "run" / "final", s["teacher"], s["windows"])
    assert after < 0.7 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert "kl" in train[0] and "ce" in train[0] and train[-1]["kl"] < train[0]["kl"]


def test_chat_data_distillation_runs_on_the_core(setup, tmp_path):
    s = setup
    data = tmp_path / "chat.jsonl"
    records = [
        {"conversations": [{"from": "human", "value": f"问题{i}"}, {"from": "gpt", "value": line}]}
        for i, line in enumerate(tiny_corpus_lines(24, seed=5))
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    cfg = base_cfg(
        s, tmp_path / "chat", data_path=str(data), max_steps=3, val_samples=0, seq_len=96, alpha=0.5, temperature=2.0
    )
    trainer = run_trainer(ChatDistillTrainer, cfg)
    assert isinstance(trainer, ChatDistillTrainer) and (tmp_path / "chat" / "final").is_dir()
    # Only assistant tokens count: a batch's weight is its number of valid labels, and the loss uses exactly those.
    batch = trainer.to_device(trainer.train_data.next_step()[0])
    n = trainer.count_loss_items(batch=batch)
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(batch=batch, num_items=torch.tensor(float(n)))
        ids, _, _, targets = trainer.unpack(batch)
        expected = loss_on_valid_positions(trainer.model(input_ids=ids).logits, trainer.teacher(ids).logits, targets)
    assert 0 < n < batch["input_ids"].numel() and float(metrics["kl"]) > 0
    torch.testing.assert_close(loss, expected / n, rtol=1e-6, atol=0)


def loss_on_valid_positions(student, teacher, targets, t=2.0, alpha=0.5):
    """The distillation loss (summed) on the positions that have a target, selected by a boolean index: what
    compute_loss computed before it masked instead (a boolean index waits for the GPU to say how many)."""
    valid = targets != -100
    student, teacher = student[valid].float(), teacher[valid].float()
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum")
    return alpha * kl * t * t + (1 - alpha) * F.cross_entropy(student, targets[valid], reduction="sum")


def test_refuses_teacher_with_other_vocabulary(setup, tmp_path):
    s = setup
    other = SLMForCausalLM(SLMConfig.from_preset("tiny", vocab_size=len(s["tok"]) + 64))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="shared tokenizer"):
        run(base_cfg(s, tmp_path / "x", teacher_from=str(tmp_path / "other"), data_dir=s["shards"]))


def test_packed_chat_rows_give_a_student_equal_to_its_teacher_zero_kl(setup, tmp_path):
    # The student reads packed rows through document ids, the teacher (any causal LM) through the device-built
    # (B, 1, T, T) mask: with the same weights (lr=0) both must see exactly the same conversations.
    s = setup
    data = tmp_path / "chat.jsonl"
    records = [
        {"conversations": [{"from": "human", "value": f"问题{i}"}, {"from": "gpt", "value": line}]}
        for i, line in enumerate(tiny_corpus_lines(24, seed=6))
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    cfg = base_cfg(
        s,
        tmp_path / "packed",
        data_path=str(data),
        max_steps=1,
        val_samples=0,
        seq_len=96,
        pack=True,
        init_from=s["teacher"],
        lr=0.0,
    )
    trainer = run_trainer(ChatDistillTrainer, cfg)
    batch = trainer.to_device(trainer.train_data.next_step()[0])
    assert int(batch["document_ids"].max()) > 1  # several conversations share a row
    _, metrics = trainer.compute_loss(batch=batch, num_items=torch.tensor(float(trainer.count_loss_items(batch=batch))))
    assert abs(float(metrics["kl"])) < 1e-6
