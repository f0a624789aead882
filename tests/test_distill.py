"""trainer/distill.py: a student distilled from a tiny teacher ends closer to it (lower KL) on held-out text, on
pretraining shards and on chat data; a teacher with another vocabulary is refused."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dataset.records import BadRecord
from tests.helpers import tiny_corpus_lines, tiny_model, write_shards
from trainer.config import ConfigError
from trainer.core import run_trainer
from trainer.distill import ChatDistillTrainer, Config, ShardDistillTrainer, run
from trainer.pretrain import Config as PretrainConfig
from trainer.pretrain import PretrainTrainer


def save_model(path, tok, seed, **overrides):
    model = tiny_model(len(tok), seed=seed, **overrides)
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
    """Shards, held-out windows, a random teacher (the tiny preset) and a random, smaller student (2 layers)."""
    root = tmp_path_factory.mktemp("distill")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    shards = write_shards(tok, tiny_corpus_lines(400, seed=3), str(root / "shards"), n_shards=1)
    teacher = save_model(root / "teacher", tok, 0)
    student = save_model(root / "student", tok, 1, num_hidden_layers=2)
    held_out = [tok.encode(line) for line in tiny_corpus_lines(40, seed=99)]
    windows = torch.tensor([ids[:12] for ids in held_out if len(ids) >= 12])
    return {"root": root, "tok": tok, "teacher": teacher, "student": student, "shards": shards, "windows": windows}


@pytest.fixture(scope="module")
def trained_teacher(setup, tiny_tokenizer_dir) -> str:
    """The tiny preset briefly pretrained, so its predictions carry structure a student can learn."""
    teacher_run = PretrainConfig(
        model_config="tiny",
        tokenizer_dir=tiny_tokenizer_dir,
        data_dir=setup["shards"],
        out_dir=str(setup["root"] / "teacher_run"),
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
    return str(setup["root"] / "teacher_run" / "final")


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


@pytest.mark.slow  # pretrains the teacher, then distills: over 3 s in the quick suite (pytest -m 'not slow')
def test_student_gets_closer_to_teacher_on_shards(setup, trained_teacher, tmp_path):
    s = {**setup, "teacher": trained_teacher}
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
    other = tiny_model(len(s["tok"]) + 64)
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


def test_chat_distillation_maps_columns_from_the_command_line_and_refuses_them_with_shards(setup, tmp_path):
    """columns= reaches distillation's chat reader as it does SFT's (a parquet file of another schema trains); with
    data_dir (shards), where no chat key is read, it is refused instead of doing nothing."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    import main

    s = setup
    rows = [{"dialog": [{"q": f"问题{i}", "a": line}]} for i, line in enumerate(tiny_corpus_lines(12, seed=7))]
    data = tmp_path / "odd.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    common = [f"teacher_from={s['teacher']}", f"init_from={s['student']}", "device=cpu", "seq_len=96"]
    args = ["--stage", "distill", *common, f"data_path={data}", f"out_dir={tmp_path / 'run'}", "max_steps=1"]
    args += ["batch_size=4", "global_batch_size=4", "val_samples=0", "log_every=1", "save_every=0", "eval_every=0"]
    with pytest.raises(BadRecord, match="unknown format"):  # the schema, unmapped
        main.main(args)
    assert main.main([*args, "columns=dialog=conversations,q=user,a=assistant"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    shards = ["--stage", "distill", *common, f"data_dir={s['shards']}", f"out_dir={tmp_path / 'x'}"]
    assert main.main([*shards, "columns=dialog=conversations"]) != 0
    with pytest.raises(ConfigError, match=r"columns, pack: read from chat data \(data_path\) only.*data_dir=''"):
        run(base_cfg(s, tmp_path / "y", data_dir=s["shards"], columns="dialog=conversations", pack=True))
