"""scripts/export_gguf.py: the GGUF file holds the right tensors, shapes, types and tokenizer metadata, and a
reference forward pass written the way llama.cpp computes Llama (interleaved RoPE pairs) on the file's weights
gives our model's logits. With llama-cpp-python installed (not in CI: it compiles llama.cpp for ~25 minutes),
llama.cpp itself must tokenize and greedily decode exactly like our tokenizer and engine."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tests.helpers import tiny_model

gguf = pytest.importorskip("gguf")
export_script = pytest.importorskip("scripts.export_gguf")
export_gguf = export_script.export_gguf
GGUF_TYPES = export_script.GGUF_TYPES  # every --dtype the script offers

TEXTS = ["北京是中国的首都。", "hello world, the model learns", "混合 text 😀👍 与 emoji 🚀，还有数字 12345！\n换行"]


@pytest.fixture(scope="module")
def exported(tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_model(len(tok), initializer_range=0.1).eval()
    model.save_pretrained(root / "slm")
    tok.save_pretrained(root / "slm")
    files = {dt: export_gguf(str(root / "slm"), str(root / f"model-{dt}.gguf"), dt) for dt in GGUF_TYPES}
    return {"dir": str(root / "slm"), "model": model, "tok": tok, "files": files}


def field(reader, key):
    return reader.fields[key].contents()


def test_tensors_and_metadata(exported):
    cfg, tok = exported["model"].config, exported["tok"]
    with open(os.path.join(exported["dir"], "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    for dtype, path in exported["files"].items():
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        expected = {"token_embd.weight", "output_norm.weight"} | {
            f"blk.{i}.{n}.weight"
            for i in range(cfg.num_hidden_layers)
            for n in (
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "attn_norm",
                "ffn_norm",
            )
        }
        assert set(tensors) == expected  # tied embeddings: no output.weight, llama.cpp reuses token_embd
        hd, kv = cfg.head_dim, cfg.num_key_value_heads
        assert list(tensors["token_embd.weight"].shape) == [cfg.hidden_size, cfg.vocab_size]  # ggml order: (in, out)
        assert list(tensors["blk.0.attn_k.weight"].shape) == [cfg.hidden_size, kv * hd]
        assert list(tensors["blk.0.ffn_down.weight"].shape) == [cfg.intermediate_size, cfg.hidden_size]
        matrix_type = dtype.upper()
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == matrix_type
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        assert field(reader, "general.architecture") == "llama"
        assert field(reader, "llama.block_count") == cfg.num_hidden_layers
        assert field(reader, "llama.attention.head_count_kv") == kv
        assert field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
        assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "qwen2"
        tokens = field(reader, "tokenizer.ggml.tokens")
        assert len(tokens) == cfg.vocab_size
        assert all(tokens[i] == t for t, i in tok.get_vocab().items())
        types = field(reader, "tokenizer.ggml.token_type")
        assert [types[i] for i in range(4)] == [gguf.TokenType.CONTROL] * 4 and types[10] == gguf.TokenType.NORMAL
        assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
        assert field(reader, "tokenizer.ggml.eos_token_id") == 0 and field(reader, "tokenizer.ggml.eot_token_id") == 2
        assert field(reader, "tokenizer.ggml.add_bos_token") is False
        assert field(reader, "tokenizer.chat_template") == tok.chat_template


# -----------------------------------------------------------------------------
# A forward pass the way llama.cpp runs the "llama" architecture, on the weights read back from the file


def read_weights(path: str) -> dict:
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(data.copy()).float().reshape([int(d) for d in reversed(t.shape)])
    return out


def rope_interleaved(x, pos, theta):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: dims (2i, 2i+1) rotate together. x: (T, heads, hd)."""
    hd = x.shape[-1]
    freqs = pos[:, None].float() * theta ** (-torch.arange(0, hd, 2).float() / hd)  # (T, hd/2)
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def llama_cpp_style_logits(w: dict, cfg, ids: list[int]) -> torch.Tensor:
    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

    T, hd, nh, nkv = len(ids), cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    pos = torch.arange(T)
    x = w["token_embd.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope_interleaved((h @ w[p + "attn_q.weight"].T).view(T, nh, hd), pos, cfg.rope_theta)
        k = rope_interleaved((h @ w[p + "attn_k.weight"].T).view(T, nkv, hd), pos, cfg.rope_theta)
        v = (h @ w[p + "attn_v.weight"].T).view(T, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + y.transpose(0, 1).reshape(T, nh * hd) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize(
    "dtype,tol,rel",
    [
        ("f16", 5e-3, 2e-3),
        ("q8_0", 0.1, 0.06),
        ("q5_1", None, 0.4),
        ("q5_0", None, 0.4),
        ("q4_1", None, 0.75),
        ("q4_0", None, 0.75),
    ],
)
def test_llama_cpp_style_forward_matches_our_model(exported, dtype, tol, rel):
    """Low-bit files are judged by the relative error of the whole logit matrix (this random-weight model has no
    margin for a per-logit bound at 4-5 bits; a wrong layout is uncorrelated, relative error ~1.4).
    test_low_bit_tensors_are_the_gguf_quantization_of_ours checks those files exactly."""
    model, tok = exported["model"], exported["tok"]
    w = read_weights(exported["files"][dtype])
    for text in TEXTS:
        ids = tok.encode(text)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        theirs = llama_cpp_style_logits(w, model.config, ids)
        if tol is not None:
            assert (ours - theirs).abs().max() < tol * ours.abs().max()
        assert (ours - theirs).norm() < rel * ours.norm()
        if dtype == "f16":
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("dtype", ["q5_1", "q5_0", "q4_1", "q4_0"])
def test_low_bit_tensors_are_the_gguf_quantization_of_ours(exported, dtype):
    """Every matrix in the file is exactly what llama.cpp's gguf package makes of our (permuted) weight."""
    from scripts.export_gguf import gguf_tensors

    qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
    stored = {t.name: t for t in gguf.GGUFReader(exported["files"][dtype]).tensors}
    for name, tensor in gguf_tensors(exported["model"]):
        data = tensor.numpy()
        if data.ndim == 2:
            assert stored[name].tensor_type == qtype
            assert (stored[name].data == gguf.quants.quantize(data, qtype)).all(), name


def test_moe_is_refused(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    moe = tiny_model(len(tok), use_moe=True, num_experts=2, num_experts_per_tok=1)
    moe.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="dense models only"):
        export_gguf(str(tmp_path / "moe"), str(tmp_path / "x.gguf"))


# -----------------------------------------------------------------------------
# llama.cpp itself (only where llama-cpp-python is installed)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_tokenizes_and_decodes_like_our_engine(exported, dtype):
    llama_cpp = pytest.importorskip("llama_cpp")
    from model.engine import Engine

    tok = exported["tok"]
    llm = llama_cpp.Llama(model_path=exported["files"][dtype], n_ctx=256, logits_all=False, verbose=False, n_threads=2)
    for text in TEXTS:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text)
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == 1
    engine = Engine(exported["model"], tok)
    for text in TEXTS:
        ids = tok.encode(text)
        ours = engine.generate([ids], max_new_tokens=12, temperature=0.0, stop_token_ids=[])[0]
        llm.reset()
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == len(ours):
                break
        if dtype == "f16":
            assert theirs == ours
        else:
            # 8-bit weights can flip a near-tie of this random-weight model, after which the two paths diverge.
            # So: the first token agrees, and every token llama.cpp picks is among our model's top 3 when we
            # follow llama.cpp's own continuation (teacher forcing).
            assert theirs[0] == ours[0]
            with torch.no_grad():
                logits = exported["model"](torch.tensor([ids + theirs])).logits[0, len(ids) - 1 : -1]
            top3 = logits.topk(3, dim=-1).indices.tolist()
            assert all(t in top for t, top in zip(theirs, top3))


def test_ollama_modelfile_beside_each_file(exported):
    """Each export writes <name>.Modelfile: FROM the file beside it, a template that renders a chat as our chat
    template does (its one range block expanded here the way Go's text/template runs it), the stop tokens,
    the model's context as num_ctx and the chat sampling defaults."""
    import re

    from model.engine import CHAT_SAMPLING

    tok, cfg = exported["tok"], exported["model"].config
    for path in exported["files"].values():
        text = open(os.path.splitext(path)[0] + ".Modelfile", encoding="utf-8").read()
        assert text.startswith(f"FROM ./{os.path.basename(path)}\n")
        params = re.findall(r"^PARAMETER (\S+) (.+)$", text, re.M)
        assert ("stop", '"<|im_end|>"') in params and ("stop", f'"{tok.eos_token}"') in params
        assert ("num_ctx", str(cfg.max_position_embeddings)) in params
        assert ("temperature", f"{CHAT_SAMPLING.temperature:g}") in params and (
            "top_p",
            f"{CHAT_SAMPLING.top_p:g}",
        ) in params
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    head, body, tail = re.fullmatch(r"(.*)\{\{ range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S).groups()
    chat = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "北京在哪里？"},
    ]
    rendered = head + "".join(
        body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in chat
    )
    assert rendered + tail == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_llama_cpp_python_renders_the_file_s_chat_template_as_transformers(exported):
    """llama-cpp-python's chat handler renders the GGUF's template with its own Jinja environment: OpenAI content
    parts and tool calls give transformers' text (the template once failed on parts: "can only concatenate str (not
    "list") to str"). llama.cpp's C++ engine (llama-server --jinja) is not installed anywhere we test; its render was
    compared by hand (see model/chat_format.py)."""
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tests.test_chat_data import WEATHER

    tok = exported["tok"]
    template = field(gguf.GGUFReader(exported["files"]["f16"]), "tokenizer.chat_template")
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "你是助手。"}]},
        {"role": "user", "content": [{"type": "text", "text": "北京"}, {"type": "text", "text": "天气？"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]},
        {"role": "tool", "content": [{"type": "text", "text": "晴"}]},
    ]
    theirs = Jinja2ChatFormatter(template=template, eos_token="<|endoftext|>", bos_token="")(
        messages=messages, tools=[WEATHER]
    ).prompt
    assert theirs == tok.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "北京天气？" in theirs
