"""
A golden loss curve (torchtitan's tests/assets/losses/): the tiny preset pretrained for 20 steps and then
fine-tuned for 10 (unpacked and packed) must give the recorded losses within a loose tolerance. A change that
silently alters training
(initialisation, the schedule, the loss weighting, data order, attention numerics) shows up here even when every
other test still passes. After a change that is *meant* to alter training, regenerate the file and say why in the
commit:

    GOLDEN_UPDATE=1 python -m pytest tests/test_golden_loss.py
"""

import json
import os
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.helpers import pretrain_corpus, read_metrics, write_shards

GOLDEN = Path(__file__).resolve().parent / "assets" / "losses" / "tiny_pretrain_sft.json"
REL_TOL = 2e-3  # loose: thread counts and BLAS builds move the last digits, a real change moves far more


def conversations(n: int = 32) -> list[dict]:
    rng = random.Random(1)
    pairs = [("你好", "你好！我是一个小模型。"), ("北京是哪里？", "北京是中国的首都。"), ("hello", "hello world.")]
    return [
        {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (rng.choice(pairs) for _ in range(n))
    ]


def run_curves(tokenizer_dir: str, root: Path) -> dict:
    from trainer.core import run_trainer
    from trainer.pretrain import Config as PretrainConfig
    from trainer.pretrain import PretrainTrainer
    from trainer.sft import Config as SFTConfig
    from trainer.sft import SFTTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shards = write_shards(tok, pretrain_corpus(400), str(root / "shards"), n_shards=2)
    pre = PretrainConfig(
        model_config="tiny",
        tokenizer_dir=tokenizer_dir,
        data_dir=shards,
        out_dir=str(root / "pre"),
        max_steps=20,
        batch_size=4,
        global_batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        eval_every=10,
        eval_batches=2,
        save_every=0,
        sample_tokens=0,
        seed=7,
        device="cpu",
        dtype="fp32",
    )
    run_trainer(PretrainTrainer, pre)
    data = root / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row in conversations():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    sft = SFTConfig(
        init_from=os.path.join(pre.out_dir, "final"),
        data_path=str(data),
        out_dir=str(root / "sft"),
        max_steps=10,
        batch_size=4,
        global_batch_size=8,
        seq_len=64,
        lr=1e-3,
        warmup_steps=0,
        log_every=1,
        eval_every=0,
        save_every=0,
        val_samples=0,
        seed=3,
        device="cpu",
        dtype="fp32",
    )
    run_trainer(SFTTrainer, sft)
    packed = SFTConfig(**{**vars(sft), "out_dir": str(root / "sft_packed"), "pack": True})
    run_trainer(SFTTrainer, packed)
    return {
        "pretrain": [round(r["loss"], 6) for r in read_metrics(pre.out_dir)],
        "pretrain_eval": [round(r["loss"], 6) for r in read_metrics(pre.out_dir, "eval")],
        "sft": [round(r["loss"], 6) for r in read_metrics(sft.out_dir)],
        "sft_packed": [round(r["loss"], 6) for r in read_metrics(packed.out_dir)],
    }


@pytest.mark.slow  # over 3 s: kept out of the quick suite (pytest -m 'not slow')
def test_tiny_loss_curves_match_the_golden_file(tiny_tokenizer_dir, tmp_path):
    curves = run_curves(tiny_tokenizer_dir, tmp_path)
    if os.environ.get("GOLDEN_UPDATE"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(curves, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert {k: len(v) for k, v in curves.items()} == {k: len(v) for k, v in golden.items()}
    for name, values in golden.items():
        assert curves[name] == pytest.approx(values, rel=REL_TOL), name
