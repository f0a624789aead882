"""
Full SFT (trainer/sft.py) end to end on a tiny model: it overfits 8 conversations and then answers one with
greedy decoding, resumes to the same weights, and runs a few steps on the shared real SFT files.

    python -m pytest tests/test_sft.py
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import PAIRS, SHARED_SFT, read_metrics, write_chat_file


def sft_config(init_from: str, out_dir, data_path: str, **overrides):
    from trainer.sft import Config

    base = {
        "init_from": init_from,
        "out_dir": str(out_dir),
        "data_path": data_path,
        "seq_len": 64,
        "batch_size": 8,
        "global_batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "weight_decay": 0.0,
        "val_samples": 0,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 20,
        "device": "cpu",
        "dtype": "fp32",
        "placeholders": "name=Milli-Chat",
        "seed": 0,
    }
    return Config(**{**base, **overrides})


# -----------------------------------------------------------------------------


def test_sft_overfits_then_answers_greedily(pretrained_dir, tmp_path):
    from model.engine import Engine
    from trainer.sft import run

    data = write_chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "sft"
    run(sft_config(pretrained_dir, out, data, max_steps=40, log_every=5))
    losses = [r["loss"] for r in read_metrics(str(out))]
    assert losses[-1] < 0.1, losses
    engine = Engine.from_pretrained(str(out / "final"), device="cpu")
    for user, reply in (PAIRS[0], PAIRS[-1]):
        answer = engine.chat([{"role": "user", "content": user}], max_new_tokens=24)
        assert answer == reply.replace("{{name}}", "Milli-Chat")


def test_sft_resumes_exactly_and_reports_validation_loss(pretrained_dir, tmp_path):
    """2 steps, stop, resume to 4 == 4 steps straight (packing on, so the masked path trains too)."""
    from trainer.sft import run

    data = write_chat_file(tmp_path / "chat.jsonl", n_copies=5)  # 40 conversations: 4 held out
    common = {"pack": True, "batch_size": 2, "global_batch_size": 4, "lr": 1e-3, "val_samples": 4, "save_every": 2}
    run(sft_config(pretrained_dir, tmp_path / "straight", data, max_steps=4, **common))
    run(sft_config(pretrained_dir, tmp_path / "resumed", data, max_steps=2, **common))
    trainer = run(sft_config(pretrained_dir, tmp_path / "resumed", data, max_steps=4, **common))
    assert trainer.step == 4
    assert [r["step"] for r in read_metrics(str(tmp_path / "resumed"))] == [2, 4]  # log_every=20: last steps only
    a = load_file(str(tmp_path / "straight" / "step_000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "step_000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = read_metrics(str(tmp_path / "resumed"), split="eval")
    assert evals and evals[-1]["step"] == 4 and 0 < evals[-1]["loss"] < 20


def test_sft_on_the_shared_real_data(pretrained_dir, tmp_path):
    """A few steps through main.py with config/sft.yaml on the shared Alpaca-zh, ShareGPT and identity files."""
    if not SHARED_SFT.is_dir():
        pytest.skip(f"shared SFT data not found at {SHARED_SFT}")
    import main

    files = ",".join(
        str(SHARED_SFT / f)
        for f in (
            "llamafactory_alpaca_zh_demo.json",
            "medicalgpt_sharegpt_zh_1K_format.jsonl",
            "llamafactory_identity.json",
        )
    )
    out = tmp_path / "sft_real"
    rc = main.main(
        [
            "--stage",
            "sft",
            "--config",
            "config/sft.yaml",
            f"init_from={pretrained_dir}",
            f"data_path={files}",
            f"out_dir={out}",
            "max_samples=30",
            "seq_len=256",
            "batch_size=2",
            "global_batch_size=4",
            "max_steps=3",
            "val_samples=8",
            "eval_batches=2",
            "device=cpu",
            "log_every=1",
        ]
    )
    assert rc == 0 and (out / "final" / "model.safetensors").is_file()
    train, evals = read_metrics(str(out)), read_metrics(str(out), split="eval")
    assert [r["step"] for r in train] == [1, 2, 3] and all(0 < r["loss"] < 20 for r in train)
    assert evals and 0 < evals[-1]["loss"] < 20
    assert os.path.isfile(out / "config.yaml")
