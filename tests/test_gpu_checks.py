"""
bench/gpu_checks.sh, the one prepared GPU run, passes its CPU smoke run: every part starts, prints its RESULT lines
and exits 0, so the day a GPU is lent its minutes go to measuring, not to fixing the script. Where .ci/run has set
up the emulated GPU image (its transformers 5.17 and huggingface_hub 1.33 in .gpu_image/, the carried wheels in
.whl/), the smoke run goes through that image, zhconv and the rest it lacks blocked, the wheels first on the path
as on the GPU machine; and the code must run on the image's own transformers too, without the wheels.

    python -m pytest tests/test_gpu_checks.py
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_IMAGE = ROOT / ".gpu_image"  # pip install --no-deps --target .gpu_image transformers==5.17.0 ... (.ci/run)
WHEELS = ROOT / ".whl"  # bash bench/fetch_gpu_wheels.sh (.ci/run)
ABSENT_ON_IMAGE = ("zhconv", "zhconv_rs", "kernels")  # installed here, not on the GPU image (KINDS.md's list)
PARTS = (
    "attention",
    "trainer_fp16",
    "trainer_bf16",
    "trainer_small",
    "vs_llama",
    "trainer_base",
    "sync_audit",
    "muon",
    "decode",
)


def fetched_wheels() -> list[str]:
    """name-version of each wheel bench/fetch_gpu_wheels.sh fetches."""
    script = (ROOT / "bench" / "fetch_gpu_wheels.sh").read_text()
    (listed,) = re.findall(r"^WHEELS=\((.*)\)$", script, re.M)
    return [w.replace("==", "-") for w in listed.split()]


def image_env(tmp_path) -> dict:
    """The environment of a process on the emulated GPU image: .gpu_image's packages ahead of this environment's,
    and a sitecustomize that makes the packages the image lacks unimportable (find_spec answers None, an import
    raises ModuleNotFoundError), in every Python process the run starts."""
    absent = tmp_path / "absent_on_image"
    absent.mkdir()
    (absent / "sitecustomize.py").write_text(f"import sys\n\nsys.modules.update(dict.fromkeys({ABSENT_ON_IMAGE!r}))\n")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(absent), str(GPU_IMAGE)]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }


def has_gpu_image() -> bool:
    return (GPU_IMAGE / "transformers").is_dir()


def has_wheels() -> bool:
    return sorted(p.name.split("-py3")[0] for p in WHEELS.glob("*.whl")) == sorted(fetched_wheels())


@pytest.mark.slow
def test_gpu_checks_smoke_run(tmp_path):
    emulated = has_gpu_image() and has_wheels()
    env = {**(image_env(tmp_path) if emulated else os.environ), "SMOKE": "1", "OUT": str(tmp_path / "out")}
    env["GPU_WHEEL_SITE"] = str(tmp_path / "site")  # the script installs the carried wheels there
    proc = subprocess.run(
        ["bash", "bench/gpu_checks.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for part in PARTS:
        assert f"-- {part}: exit 0" in summary, summary[-3000:]
    assert "plan T4" in summary and "sm75 float16" in summary  # the dtype policy's answer for a T4
    assert "RESULT pretrain tiny fp16" in summary and "RESULT packed sft / pretrain" in summary
    # compile=true through the real Trainer, with the recipe's optimizers: Muon pretraining, then packed SFT (AdamW)
    assert "RESULT pretrain tiny auto B=2 T=64 muon compiled:" in summary
    assert "RESULT packed sft tiny auto B=2 T=64 adamw compiled:" in summary
    assert "RESULT pretrain tiny llama auto" in summary and "RESULT ours / llama tokens/s (tiny auto)" in summary
    assert "(interim, 2 steps)" in summary  # what a part cut off by its time limit still reports
    assert "RESULT sync audit: skipped: no cuda" in summary
    if emulated:  # the carried transformers, not the image's 5.17, ran every part
        assert "transformers 5.25.0" in summary and "do not import" not in proc.stderr
    # The header's total is the sum of the parts' limits.
    script = (ROOT / "bench" / "gpu_checks.sh").read_text()
    limits = [int(n) for n in re.findall(r"^part \w+ (\d+) ", script, re.M)]
    assert len(limits) == len(PARTS) and f"{sum(limits)} s in all" in script


def test_gpu_checks_header_names_the_wheels_the_fetch_script_fetches():
    header = (ROOT / "bench" / "gpu_checks.sh").read_text().split("\nset -u")[0]
    assert ", ".join(fetched_wheels()) in header
    assert "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site\n" in header  # the device README's line


GENERATE_ON_THE_IMAGE = """
import json, sys
import torch, transformers
from tests.helpers import tiny_model
model = tiny_model(initializer_range=0.3).eval()  # weights that do not repeat one token
ids = torch.randint(4, 512, (1, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    cached = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=3)
    full = ids
    for _ in range(8):  # greedy by full re-forwards: no cache to get wrong
        full = torch.cat([full, model(input_ids=full).logits[:, -1:].argmax(-1)], 1)
print(json.dumps({"transformers": transformers.__version__, "cached": cached.tolist(), "full": full.tolist()}))
"""


@pytest.mark.slow
def test_training_and_generate_run_on_the_gpu_image_s_own_transformers(tmp_path):
    """Without the wheels: transformers 5.17 (whose outputs carry past_key_values, not cache) and no zhconv.
    Pretraining and packed SFT through the real Trainer, and transformers' generate() with its cache."""
    if not has_gpu_image():
        pytest.skip("no emulated GPU image in .gpu_image/ (pip install --no-deps --target .gpu_image ...; .ci/run)")
    env = {**image_env(tmp_path), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] += os.pathsep + str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE_ON_THE_IMAGE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["transformers"] == "5.17.0" and answer["cached"] == answer["full"]
    results = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_trainer.py", "--smoke", "--json", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(results.read_text())
    assert [r["run"] for r in runs] == ["pretrain tiny auto B=2 T=64 muon", "packed sft tiny auto B=2 T=64 adamw"]
    assert all(r["steps"] == 4 and r["loss"] < 7.0 for r in runs)


def test_bench_trainer_takes_each_stage_s_optimizer_from_the_recipe(tmp_path):
    from bench.bench_trainer import recipe_optimizer

    recipe = ROOT / "config" / "recipes" / "small_gpu"
    pretrain = recipe_optimizer(str(recipe), "pretrain")
    assert pretrain["optimizer"] == "muon" and pretrain["muon_lr_ratio"] == 5 and pretrain["lr"] == 1e-3
    assert "optimizer" not in recipe_optimizer(str(recipe), "sft")  # the SFT recipe keeps the default, AdamW
    assert recipe_optimizer(str(recipe), "sft", "muon")["optimizer"] == "muon"


def test_gpu_attention_times_packed_rows_on_flex():
    """The flex branch of bench/gpu_attention.py (a GPU's sm80+ plan for packed rows), run here by eager
    FlexAttention on the CPU: four documents per row, timed against math SDPA on the dense mask."""
    import warnings

    from bench import gpu_attention
    from model import SLMConfig
    from model.attention import AttentionPlan

    cfg = SLMConfig.from_preset("tiny")
    s = dict(name="packed_sft", B=2, q=64, kv=64, mask=False, causal=False, documents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        line = gpu_attention.run_shape(
            s, cfg, torch.device("cpu"), torch.float32, AttentionPlan("flex", True, False, "flex")
        )
    assert re.fullmatch(r"ran on flex: [\d.]+ ms vs math [\d.]+ ms \([\d.]+x\)", line), line


@pytest.mark.slow
def test_sync_audit_counts_each_stage_s_syncs_and_where_they_come_from(tmp_path, monkeypatch):
    """bench/sync_audit.py on a CPU, where nothing syncs: a faked debug mode makes every backward warn as a sync
    would, so each audited step (after warm-up) of each stage must count one, placed at its line."""
    import warnings

    import torch

    from bench import sync_audit

    mode, backward = ["default"], torch.Tensor.backward

    def warning_backward(self, *args, **kwargs):
        if mode[0] == "warn":
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # what the debug mode says
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__(0, m))
    monkeypatch.setattr(torch.Tensor, "backward", warning_backward)
    args = sync_audit.parse_args(["--smoke", "--device", "cpu"])
    results = sync_audit.audit(args, str(tmp_path))
    here = f"tests/test_gpu_checks.py:{warning_backward.__code__.co_firstlineno + 2}"
    assert [r["run"] for r in results] == [
        f"sync audit {s}" for s in ("pretrain adamw", "pretrain muon", "packed sft", "dpo")
    ]
    for result in results:
        assert result["syncs_per_step"] == [1] * (args.steps - args.warmup) and result["places"] == {here: 2}, result
    assert mode == ["default"]
