"""parallel=fsdp (FSDP2, weights/grads/optimizer state sharded over processes) on CPU with 2 gloo processes: the
same losses, evaluation and final weights as one process, and checkpoints that resume across the two layouts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import losses, read_metrics, run_main_py, write_chat_file

pytestmark = pytest.mark.slow  # subprocesses and fresh interpreters: seconds each


def eval_losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(str(out_dir), split="eval")]


def test_pretrain_fsdp_matches_one_process_and_resumes_across_layouts(tiny_tokenizer_dir, shards, tmp_path):
    args = [
        "--stage",
        "pretrain",
        f"tokenizer_dir={tiny_tokenizer_dir}",
        f"data_dir={shards}",
        "model_config=tiny",
        "batch_size=2",
        "global_batch_size=8",
        "seq_len=32",
        "lr=3e-3",
        "warmup_steps=2",
        "log_every=1",
        "lr_schedule=constant",
        "eval_every=3",
        "eval_batches=3",
        "sample_tokens=4",
        "save_every=0",
        "seed=7",
    ]
    five, seven = [*args, "max_steps=5"], [*args, "max_steps=7"]
    run_main_py(tmp_path / "one", five)
    sharded = run_main_py(tmp_path / "fsdp", [*five, "parallel=fsdp"], processes=2)
    assert "processes 2" in sharded.stdout and "sample:" in sharded.stdout  # samples ran on both ranks
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    # 3 validation batches over 2 ranks: the rank without a third batch repeats one with weight 0
    assert eval_losses(tmp_path / "fsdp") == pytest.approx(eval_losses(tmp_path / "one"), abs=1e-4)
    ours, ref = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("fsdp", "one"))
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], atol=1e-4, rtol=1e-4)
    config = json.loads((tmp_path / "fsdp" / "final" / "config.json").read_text())
    assert config["architectures"] == ["SLMForCausalLM"]  # not FSDP's wrapper class
    state = torch.load(tmp_path / "fsdp" / "step_000005" / "trainer_state.pt", weights_only=False)
    assert state["optimizer_by_name"] and "model.layers.0.mlp.up_proj.weight" in state["optimizer"]["state"]

    # Resume across layouts: the FSDP checkpoint with 1 process, the 1-process one under FSDP. Both must continue
    # like a 1-process run that was never stopped (optimizer moments included, or the losses would drift).
    run_main_py(tmp_path / "straight", seven)
    run_main_py(tmp_path / "fsdp", seven)
    run_main_py(tmp_path / "one", [*seven, "parallel=fsdp"], processes=2)
    for name in ("fsdp", "one"):
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "straight"), abs=1e-4), name


def test_sft_fsdp_matches_one_process(pretrained_dir, tmp_path):
    data = write_chat_file(tmp_path / "chat.jsonl", n_copies=4)
    args = [
        "--stage",
        "sft",
        f"init_from={pretrained_dir}",
        f"data_path={data}",
        "seq_len=64",
        "batch_size=2",
        "global_batch_size=8",
        "lr=3e-3",
        "warmup_steps=0",
        "lr_schedule=constant",
        "val_samples=8",
        "eval_every=2",
        "save_every=0",
        "log_every=1",
        "max_steps=4",
        "dtype=fp32",
        "seed=0",
    ]
    run_main_py(tmp_path / "one", args)
    run_main_py(tmp_path / "fsdp", [*args, "parallel=fsdp"], processes=2)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    assert eval_losses(tmp_path / "fsdp") == pytest.approx(eval_losses(tmp_path / "one"), abs=1e-4)


def test_fsdp_refused_where_not_built(tiny_tokenizer_dir, shards, tmp_path):
    args = [
        "--stage",
        "pretrain",
        f"tokenizer_dir={tiny_tokenizer_dir}",
        f"data_dir={shards}",
        "model_config=tiny",
        "batch_size=2",
        "seq_len=32",
        "max_steps=1",
        "sample_tokens=0",
        "parallel=fsdp",
    ]
    fp16 = run_main_py(tmp_path / "fp16", [*args, "dtype=fp16"], processes=2, check=False)
    assert fp16.returncode != 0 and "parallel=fsdp needs bf16 or fp32" in fp16.stderr
    bad = run_main_py(tmp_path / "bad", [*args[:-1], "parallel=zero3"], check=False)
    assert bad.returncode != 0 and "parallel must be ddp or fsdp" in bad.stderr
    lora = run_main_py(
        tmp_path / "lora",
        ["--stage", "lora", f"init_from={tmp_path / 'bad'}", "parallel=fsdp"],
        processes=2,
        check=False,
    )
    assert lora.returncode != 0 and "parallel=fsdp is built for the pretrain and sft stages" in lora.stderr
