"""scripts/export_llama.py: a dense SLM checkpoint becomes a stock LlamaForCausalLM with identical logits."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from model import SLMConfig, SLMForCausalLM

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_model(vocab_size, **overrides):
    torch.manual_seed(0)
    return SLMForCausalLM(SLMConfig.from_preset("tiny", vocab_size=vocab_size, initializer_range=0.2, **overrides))


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "num_key_value_heads": 4}])
def test_export_gives_llama_with_same_logits(tmp_path, tiny_tokenizer_dir, overrides):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_model(len(tok), **overrides).eval()
    model.save_pretrained(tmp_path / "slm")
    tok.save_pretrained(tmp_path / "slm")
    subprocess.run([sys.executable, "scripts/export_llama.py", "--model", str(tmp_path / "slm"), "--out",
                    str(tmp_path / "llama")], cwd=ROOT, check=True, capture_output=True)
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    # A fresh interpreter without our package imported: stock transformers only, no trust_remote_code.
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'llama')!r}, dtype=torch.float32);"
            f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'llama')!r});"
            "print(type(m).__name__, len(t))")
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
    out = subprocess.run([sys.executable, "scripts/export_llama.py", "--model", str(tmp_path / "moe"), "--out",
                          str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "mixture-of-experts" in out.stderr
