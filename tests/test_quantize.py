"""model/quantize.py: int8/int4 weight-only layers stay close to the float model, shrink its weights, and plug
into the engine with one argument."""

import copy

import pytest
import torch
from transformers import AutoTokenizer

from model.quantize import QuantLinear, quantize_model, weight_bytes
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return tiny_model(len(tok)).eval(), tok


@pytest.mark.parametrize("bits,rel_err", [(8, 0.01), (4, 0.15)])
def test_quant_linear_close_to_float(bits, rel_err):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    q = QuantLinear(linear, bits, group_size=32)
    # the stored weight round-trips within half a quantization step
    step = q.scale[:, None] if bits == 8 else q.scale.repeat_interleave(32, dim=1)
    assert ((q.dequantize() - linear.weight).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        ref, out = linear(x), q(x)
    assert out.shape == ref.shape
    assert (out - ref).norm() < rel_err * ref.norm()


@pytest.mark.parametrize("mode,max_rel", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_model_logits_and_size(tiny, mode, max_rel):
    model, tok = tiny
    ids = torch.tensor([tok.encode("北京是中国的首都。hello world 123")])
    q = quantize_model(copy.deepcopy(model), mode)
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, QuantLinear)  # skipped
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    assert (out - ref).abs().max() < max_rel * ref.abs().max()
    linear_bytes = sum(
        m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    saved = weight_bytes(model) - weight_bytes(q)
    assert saved > (0.7 if mode == "int8" else 0.8) * linear_bytes


def test_engine_flag_generates_with_quantized_model(tiny, tmp_path):
    from model.engine import Engine

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ref = Engine.from_pretrained(str(tmp_path / "m"), device="cpu")
    q8 = Engine.from_pretrained(str(tmp_path / "m"), device="cpu", quantize="int8")
    assert isinstance(q8.model.model.layers[0].mlp.down_proj, QuantLinear)
    prompt = [tok.encode("北京是中国的首都。")]
    a = ref.generate(prompt, max_new_tokens=6, stop_token_ids=[])[0]
    b = q8.generate(prompt, max_new_tokens=6, stop_token_ids=[])[0]
    assert len(b) == 6 and a[:2] == b[:2]  # greedy agrees at the start (ties may flip later)
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_model(model, "int3")


def test_quantize_is_refused_off_the_cpu_with_a_pointer_to_gguf(tiny, tmp_path):
    from model.engine import Engine
    from model.quantize import check_quantize_device

    check_quantize_device("int8", "cpu")
    check_quantize_device("none", "cuda")  # no quantization: fine anywhere
    for mode in ("int8", "int4"):
        with pytest.raises(ValueError, match="CPU only.*GGUF"):
            check_quantize_device(mode, "cuda:0")
    with pytest.raises(ValueError, match="quantize must be one of"):
        check_quantize_device("int2", "cpu")
    # the engine refuses before reading any weight (so no CUDA is needed to see the message)
    with pytest.raises(ValueError, match="CPU only"):
        Engine.from_pretrained(str(tmp_path / "does-not-matter"), device="cuda", dtype="fp16", quantize="int4")
