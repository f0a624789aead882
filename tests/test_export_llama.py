"""scripts/export_llama.py: a dense SLM checkpoint becomes a stock LlamaForCausalLM with identical logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tests.helpers import tiny_model as build_tiny

pytestmark = pytest.mark.slow  # subprocesses and fresh interpreters: seconds each

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_model(vocab_size, **overrides):
    return build_tiny(vocab_size, initializer_range=0.2, **overrides)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "num_key_value_heads": 4}])
def test_export_gives_llama_with_same_logits(tmp_path, tiny_tokenizer_dir, overrides):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_model(len(tok), **overrides).eval()
    model.save_pretrained(tmp_path / "slm")
    tok.save_pretrained(tmp_path / "slm")
    subprocess.run(
        [sys.executable, "scripts/export_llama.py", "--model", str(tmp_path / "slm"), "--out", str(tmp_path / "llama")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    exported = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert exported["model_type"] == "llama"
    assert exported["rope_theta"] == model.config.rope_theta  # top level, where transformers 4.x reads it
    # A fresh interpreter without our package imported: stock transformers only, no trust_remote_code.
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'llama')!r}, dtype=torch.float32);"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'llama')!r});"
        "print(type(m).__name__, len(t))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["LlamaForCausalLM", str(len(tok))]
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    assert isinstance(llama, LlamaForCausalLM)
    ids = torch.tensor([tok.encode("北京是中国的首都。hello world 123")])
    with torch.no_grad():
        diff = (model(ids).logits - llama(ids).logits).abs().max().item()
    assert diff < 1e-4
    # greedy decoding agrees too (exercises Llama's own KV cache path)
    a = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=3)
    b = llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=3)
    assert a.tolist() == b.tolist()


def test_export_refuses_moe(tmp_path):
    model = tiny_model(512, use_moe=True, num_experts=2, num_experts_per_tok=1)
    model.save_pretrained(tmp_path / "moe")
    out = subprocess.run(
        [sys.executable, "scripts/export_llama.py", "--model", str(tmp_path / "moe"), "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "mixture-of-experts" in out.stderr


# transformers 4.x (what vLLM required until 0.19.1, and what many users still run), installed into its own folder
# so it never shadows the 5.x the project uses: `pip install --target .tf4 transformers==4.57.6` (.ci/run does).
# MILLI_TF4=DIR points at one elsewhere (another checkout's .tf4, read-only).
TF4_PLACES = [Path(os.environ["MILLI_TF4"])] if os.environ.get("MILLI_TF4") else []
TF4 = next((p for p in (*TF4_PLACES, ROOT / ".tf4", ROOT.parent / ".tf4") if (p / "transformers").is_dir()), None)

TF4_CHECK = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
path, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=3)[0].tolist()
    inputs = tok("北京是中国的首都。", return_tensors="pt")  # what users pass: generate(**inputs)
    assert set(inputs) == {"input_ids", "attention_mask"}, set(inputs)
    model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=3)
print(json.dumps({"class": type(model).__name__, "rope_theta": model.config.rope_theta, "logits": logits.tolist(),
                  "greedy": greedy, "ids": tok.encode("北京是中国的首都。hello world 123"),
                  "chat": tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                                  add_generation_prompt=True)}))
"""


@pytest.mark.skipif(
    TF4 is None, reason="transformers 4.x not installed in .tf4/ (pip install --target .tf4 transformers==4.57.6)"
)
def test_export_loads_exactly_in_transformers_4(tmp_path, tiny_tokenizer_dir):
    """Under 4.x the export must give the same logits, greedy tokens, token ids and chat prompt as our model: a
    tokenizer class 4.x knows, and rope_theta where 4.x reads it (else 4.x silently uses 10000)."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # Our presets' theta, not the tiny preset's 10000: that is 4.x's fallback, so a lost rope_theta would pass unseen.
    model = tiny_model(len(tok), rope_theta=1e6).eval()
    model.save_pretrained(tmp_path / "slm")
    tok.save_pretrained(tmp_path / "slm")
    subprocess.run(
        [sys.executable, "scripts/export_llama.py", "--model", str(tmp_path / "slm"), "--out", str(tmp_path / "llama")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    text = "北京是中国的首都。hello world 123"
    ids = tok.encode(text)
    env = {**os.environ, "PYTHONPATH": str(TF4)}
    out = subprocess.run(
        [sys.executable, "-c", TF4_CHECK, str(tmp_path / "llama"), json.dumps(ids)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert theirs["class"] == "LlamaForCausalLM" and theirs["rope_theta"] == 1e6
    assert theirs["ids"] == ids
    assert theirs["chat"] == tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=3)[0].tolist()
    assert (ours - torch.tensor(theirs["logits"])).abs().max().item() < 1e-4
    assert theirs["greedy"] == greedy
