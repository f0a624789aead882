"""
The one runtime policy (model/runtime.py): which dtype each GPU gets (faked device properties, so it runs on a CPU),
which dtype Muon's Newton-Schulz runs in (faked GPUs and CPU features), the dtype vocabulary, the one checkpoint
loader and its errors, and that training, the engine and frozen reference models give the same answer.

    python -m pytest tests/test_runtime.py
"""

import pathlib
import platform
import re
import sys

import pytest
import torch

from model.runtime import (
    auto_device_type,
    auto_dtype,
    autocast_context,
    compiles,
    copies_async,
    cpu_flags,
    dtype_name,
    fuses_adamw,
    load_pretrained,
    newton_schulz_dtype,
    newton_schulz_dtype_for,
    pins_memory,
    resolve_device,
    resolve_dtype,
    scales_loss,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (name, compute capability, what dtype=auto must give)
GPUS = [
    ("T4", (7, 5), torch.float16),
    ("V100", (7, 0), torch.float16),
    ("RTX 2080", (7, 5), torch.float16),
    ("A100", (8, 0), torch.bfloat16),
    ("RTX 3090", (8, 6), torch.bfloat16),
    ("RTX 4090", (8, 9), torch.bfloat16),
    ("H100", (9, 0), torch.bfloat16),
]


@pytest.mark.parametrize("name,capability,expected", GPUS, ids=[g[0] for g in GPUS])
def test_auto_dtype_is_bf16_only_where_the_gpu_has_it_natively(name, capability, expected):
    assert auto_dtype("cuda", capability) == expected
    # resolve_dtype with a faked capability answers the same without touching torch.cuda
    assert resolve_dtype("auto", torch.device("cuda"), capability=capability) == expected


def test_cpu_gets_fp32_and_explicit_names_are_kept():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name(torch.float16) == "fp16"


def test_bad_names_are_errors_that_list_the_choices():
    with pytest.raises(ValueError, match="dtype must be auto, bf16, fp16, fp32; got 'int3'"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("gpu0")


def test_bf16_on_a_t4_warns_that_it_is_emulated():
    with pytest.warns(UserWarning, match="emulated"):
        assert resolve_dtype("bf16", torch.device("cuda"), capability=(7, 5)) == torch.bfloat16


# (device, CUDA capability, torch's CPU capability, CPU flags, Muon's Newton-Schulz dtype)
ZEN4_FLAGS = frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"})  # AMD EPYC 9004, Ryzen 7000
NEWTON_SCHULZ_DEVICES = [
    ("T4", "cuda", (7, 5), "", frozenset(), torch.float16),
    ("V100", "cuda", (7, 0), "", frozenset(), torch.float16),
    ("A100", "cuda", (8, 0), "", frozenset(), torch.bfloat16),
    ("H100", "cuda", (9, 0), "", frozenset(), torch.bfloat16),
    ("Zen 4 (AVX512_BF16)", "cpu", None, "AVX512", ZEN4_FLAGS, torch.bfloat16),
    ("Sapphire Rapids (AMX)", "cpu", None, "AVX512", frozenset({"avx512f", "amx_tile", "amx_bf16"}), torch.bfloat16),
    ("Skylake-SP (AVX512, no bf16)", "cpu", None, "AVX512", frozenset({"avx2", "avx512f", "avx512bw"}), torch.float32),
    ("laptop (AVX2 only)", "cpu", None, "AVX2", frozenset({"avx2", "fma"}), torch.float32),
    ("Zen 4 under ATEN_CPU_CAPABILITY=avx2", "cpu", None, "AVX2", ZEN4_FLAGS, torch.float32),
    ("ARM (no x86 flags)", "cpu", None, "SVE256", frozenset(), torch.float32),
    ("Apple GPU", "mps", None, "", frozenset(), torch.float32),
]


@pytest.mark.parametrize(
    "name,device_type,capability,cpu_capability,flags,expected",
    NEWTON_SCHULZ_DEVICES,
    ids=[d[0] for d in NEWTON_SCHULZ_DEVICES],
)
def test_newton_schulz_dtype_is_the_fastest_native_format(
    name, device_type, capability, cpu_capability, flags, expected
):
    assert newton_schulz_dtype(device_type, capability, cpu_capability, flags) == expected


def test_newton_schulz_dtype_for_reads_the_machines_facts(monkeypatch):
    import model.runtime

    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert "sse2" in cpu_flags()  # every x86-64 CPU has it: the flags line was found and split
    monkeypatch.setattr(model.runtime, "cpu_flags", lambda: ZEN4_FLAGS)
    for cpu_capability, expected in (("AVX512", torch.bfloat16), ("AVX2", torch.float32)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=cpu_capability: c)
        assert newton_schulz_dtype_for(torch.device("cpu")) == expected
    monkeypatch.setattr(model.runtime, "cuda_capability", lambda device: (7, 5))
    assert newton_schulz_dtype_for(torch.device("cuda")) == torch.float16


def test_no_other_copy_of_the_dtype_policy():
    """The first version wrote the policy three times and they disagreed: no module may decide it again."""
    offenders = []
    for path in (
        list(ROOT.glob("model/*.py"))
        + list(ROOT.glob("trainer/*.py"))
        + list(ROOT.glob("scripts/*.py"))
        + list(ROOT.glob("bench/*.py"))
        + list(ROOT.glob("dataset/*.py"))
    ):
        if path.name == "runtime.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "is_bf16_supported" in text or re.search(r"bfloat16 if .*cuda", text) or "import model as _" in text:
            offenders.append(path.name)
    assert offenders == []


# -----------------------------------------------------------------------------
# Loading


def test_load_pretrained_kinds_and_frozen(tmp_path, tiny_tokenizer_dir):
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "final"))
    causal = load_pretrained(path)
    assert type(causal).__name__ == "SLMForCausalLM"
    assert all(p.requires_grad and p.dtype == torch.float32 for p in causal.parameters())
    score = load_pretrained(path, "score", frozen=True)
    assert type(score).__name__ == "SLMForSequenceClassification" and not score.training
    assert not any(p.requires_grad for p in score.parameters())
    assert score.config.num_labels == 1
    assert next(load_pretrained(path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kind must be"):
        load_pretrained(path, "seq2seq")


def test_load_pretrained_says_what_is_wrong_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_pretrained(str(tmp_path / "typo"))
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="use its final/"):
        load_pretrained(str(run_dir))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="LoRA adapter"):
        load_pretrained(str(adapter))


def test_a_missing_init_from_is_reported_as_such_not_as_a_missing_tokenizer(tmp_path):
    from trainer.sft import Config, SFTTrainer

    trainer = SFTTrainer(
        Config(
            init_from=str(tmp_path / "nope"),
            tokenizer_dir=str(tmp_path / "no_tok"),
            out_dir=str(tmp_path / "out"),
            device="cpu",
        )
    )
    with pytest.raises(FileNotFoundError, match="init_from .* is not a directory"):
        trainer.prepare()


# -----------------------------------------------------------------------------
# One answer for training, the engine and frozen models


def test_trainer_and_engine_pick_the_same_dtype(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from model.engine import Engine
    from tests.helpers import tiny_checkpoint
    from trainer.sft import Config, SFTTrainer

    path = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "final"))
    trainer = SFTTrainer(Config(init_from=path, out_dir=str(tmp_path / "out"), device="cpu", dtype="auto"))
    engine = Engine.from_pretrained(path, device="cpu", dtype="auto")
    assert trainer.dtype == next(engine.model.parameters()).dtype == torch.float32
    engine16 = Engine.from_pretrained(path, device="cpu", dtype="bf16")
    assert next(engine16.model.parameters()).dtype == torch.bfloat16


def test_dpo_reference_has_the_policys_numerics_in_bf16_autocast(tmp_path, tiny_tokenizer_dir):
    """The reference keeps fp32 weights and runs under the policy's autocast: log pi - log ref is exactly 0 at
    step 0 (a bf16-weight reference against an fp32 policy under autocast is not)."""
    from tests.helpers import tiny_checkpoint
    from tests.helpers_preference import toy_pairs, write_pairs
    from trainer.dpo import Config, DPOTrainer
    from trainer.logprobs import sequence_logprobs

    path = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "final"))
    data = write_pairs(str(tmp_path / "pairs.jsonl"), toy_pairs(16), "strings")
    trainer = DPOTrainer(
        Config(
            init_from=path,
            out_dir=str(tmp_path / "dpo"),
            data_path=data,
            seq_len=64,
            batch_size=8,
            global_batch_size=8,
            val_samples=0,
            device="cpu",
            dtype="bf16",
            max_steps=1,
        )
    )
    trainer.prepare()
    assert {p.dtype for p in trainer.ref.parameters()} == {p.dtype for p in trainer.raw_model.parameters()}
    batch = trainer.to_device(trainer.train_data.next_step()[0])
    with torch.no_grad(), trainer.autocast:
        pi = sequence_logprobs(trainer.raw_model, batch["input_ids"], batch["loss_mask"])
        ref = sequence_logprobs(trainer.ref, batch["input_ids"], batch["loss_mask"])
        bf16_ref = sequence_logprobs(trainer.ref.to(torch.bfloat16), batch["input_ids"], batch["loss_mask"])
    assert torch.equal(pi, ref)
    assert not torch.equal(pi, bf16_ref)  # what the old bf16-weight reference gave


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_reference_has_the_policys_numerics_in_bf16_autocast(stage, tmp_path, tiny_tokenizer_dir):
    """PPO's and GRPO's frozen reference, like DPO's: the first rollout's KL to it is exactly 0 in bf16 autocast
    (a bf16-weight reference is not)."""
    import copy
    import importlib
    import json

    from tests.helpers import tiny_checkpoint
    from tests.helpers_preference import PROMPTS
    from trainer.logprobs import token_logprobs

    path = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "final"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]), encoding="utf-8")
    module = importlib.import_module(f"trainer.{stage}")
    cfg = module.Config(
        init_from=path,
        out_dir=str(tmp_path / stage),
        data_path=str(prompts),
        seq_len=64,
        batch_size=8,
        global_batch_size=8,
        num_generations=2,
        rollout_minibatches=1,
        max_new_tokens=8,
        reward_rules="token_ids:100-163",
        device="cpu",
        dtype="bf16",
        max_steps=1,
    )
    trainer = getattr(module, f"{stage.upper()}Trainer")(cfg)
    trainer.prepare()
    (batch,) = trainer.train_data.next_step()
    buf, stats = trainer.make_rollout(batch)
    assert torch.equal(buf["old_logps"], buf["ref_logps"]) and float(stats["kl_ref"]) == 0.0
    with torch.no_grad(), trainer.autocast:
        bf16_ref = token_logprobs(copy.deepcopy(trainer.ref).to(torch.bfloat16), buf["input_ids"])
    assert not torch.equal(buf["old_logps"], bf16_ref)  # what a bf16-weight reference would give


def test_an_offloaded_reference_gets_the_policys_autocast_on_its_own_device():
    """The policy's autocast covers its own device type only: a reference kept on the CPU while the policy trains
    on CUDA runs under a CPU autocast of the same dtype (fp32 for fp16, which has no fast CPU kernels); on the
    policy's device type the policy's autocast already applies and is left alone."""
    from model.runtime import autocast_context, frozen_autocast

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    x = torch.ones(2, 2)
    with frozen_autocast(cpu, cuda, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with frozen_autocast(cpu, cuda, torch.float16):
        assert (x @ x).dtype == torch.float32
    with autocast_context(cpu, torch.bfloat16), frozen_autocast(cpu, cpu, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_context(cpu, torch.float16), frozen_autocast(cpu, cpu, torch.float16):
        assert (x @ x).dtype == torch.float16  # the policy's own choice on its device, not overridden


# -----------------------------------------------------------------------------
# CPU threads (issue 27.5)


@pytest.mark.parametrize(
    "cores, load, env, expected",
    [
        (2, 0.1, None, 2),  # a quiet 2-core machine: both cores
        (2, 6.0, None, 1),  # a busy one: 1 thread (torch's default of 2 collapses there)
        (2, 1.2, None, 1),
        (16, 0.0, None, 4),  # at most MAX_AUTO_THREADS
        (16, 14.0, None, 2),
        (8, None, None, 4),  # no load average (Windows): the cores, capped
        (2, 6.0, "3", 3),  # OMP_NUM_THREADS wins
        (2, 0.0, "", 2),
        (2, 0.0, "zero", 2),  # not a number: ignored
    ],
)
def test_auto_cpu_threads(cores, load, env, expected):
    from model.runtime import auto_cpu_threads

    assert auto_cpu_threads(cores, load, env) == expected


def test_set_cpu_threads_sets_torch(monkeypatch):
    from model.runtime import set_cpu_threads

    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_cpu_threads(0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_is_a_setting_of_every_training_stage_and_the_demo():
    from trainer.config import TrainConfig
    from trainer.pipeline import Config

    assert TrainConfig().threads == 0 and Config().threads == 0


# -----------------------------------------------------------------------------
# Apple Silicon: device=auto finds MPS, and every per-device choice is a function of the device alone, so a faked
# torch.device("mps") on this CPU runs the very code a Mac runs


@pytest.mark.parametrize(
    "cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_device_is_cuda_then_mps_then_cpu(cuda, mps, expected, monkeypatch):
    assert auto_device_type(cuda, mps) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("mps") == torch.device("mps")  # explicit, whatever the machine


def test_per_device_policy_on_a_faked_mac_gpu():
    from model.attention import attention_plan, device_capability

    mps, cpu, cuda = torch.device("mps"), torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", mps) == torch.float32  # fp32 by default on MPS (module docstring)
    assert autocast_context(mps, torch.float32).fast_dtype is not None  # constructs; enabled=False for fp32
    assert not autocast_context(mps, torch.float32)._enabled
    assert (pins_memory(mps), copies_async(mps), fuses_adamw(mps)) == (False, False, True)
    assert (pins_memory(cuda), copies_async(cuda), fuses_adamw(cuda)) == (True, True, True)
    assert (pins_memory(cpu), copies_async(cpu), fuses_adamw(cpu)) == (False, False, True)
    assert scales_loss(torch.float16) and not scales_loss(torch.float32) and not scales_loss(torch.bfloat16)
    with pytest.warns(UserWarning, match="MPS"):
        assert compiles(mps, True) is False
    assert compiles(mps, False) is False and compiles(cpu, True) and compiles(cuda, True)
    # the attention plan: no CUDA capability on MPS, so the CPU's plan (read without touching torch.cuda)
    assert device_capability(mps) is None
    for has_mask, is_causal in ((False, True), (True, False)):
        kwargs = dict(has_mask=has_mask, is_causal=is_causal, n_heads=4, n_kv_heads=2, head_dim=32)
        assert attention_plan(device_capability(mps), torch.float32, **kwargs) == attention_plan(
            None, torch.float32, **kwargs
        )


def test_no_device_branch_for_mps_outside_the_runtime_policy():
    """An MPS-only branch elsewhere would be code the CPU tests never run: every Apple choice lives in runtime.py."""
    offenders = []
    for folder in ("model", "trainer", "dataset", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "runtime.py":
                continue
            if re.search(r"[\"']mps[\"']|backends\.mps", path.read_text(encoding="utf-8")):
                offenders.append(path.name)
    assert offenders == []
