"""
A stage's final/ works with stock Hugging Face tools as it is, in a fresh process that never imports this
repository's `model` package: trust_remote_code loading (the code ships in the folder, auto_map points at it),
generate(), pipeline("text-generation") chat and TextIteratorStreamer stop at <|im_end|>; files are readable by
other accounts; a model card describes the run.

    python -m pytest tests/test_hub.py
"""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

REPLY = "北京是中国的首都。"


def write_pretraining_card(path: str, *, shards: str, license: str) -> None:
    """The card a pretraining run leaves in final/, for shards whose meta.json records one source's license."""
    from dataset.licenses import shard_licenses
    from model import SLMConfig
    from model.hub import write_stage_card
    from trainer.pretrain import Config

    os.makedirs(shards, exist_ok=True)
    with open(os.path.join(shards, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"sources": [{"path": "wiki.jsonl", "license": license}, {"path": "mine.txt"}]}, f)
    write_stage_card(
        path,
        Config(data_dir=shards, init_from=""),
        stage="pretrain",
        step=5,
        tokens_seen=640,
        global_batch=2,
        dtype=torch.float32,
        world_size=1,
        model_config=SLMConfig.from_pretrained(path),
        evaluation=None,
        licenses=shard_licenses(shards),
    )


@pytest.fixture(scope="module")
def chat_model(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """A tiny model fine-tuned until it answers 中国的首都是哪里？ with REPLY and then ends its turn."""
    from tests.helpers import fine_tune, tiny_checkpoint

    root = tmp_path_factory.mktemp("hub")
    base = tiny_checkpoint(tiny_tokenizer_dir, str(root / "base"))
    write_pretraining_card(base, shards=str(root / "shards"), license="CC-BY-SA-4.0")
    # as `datasets` leaves a download: dataset_info.json beside the data file
    (root / "chat").mkdir()
    (root / "chat" / "dataset_info.json").write_text(json.dumps({"license": "Apache 2.0", "citation": ""}))
    data = root / "chat" / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for _ in range(8):
            msgs = [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": REPLY}]
            f.write(json.dumps({"conversations": msgs}, ensure_ascii=False) + "\n")
    return fine_tune(base, data, root / "sft", seq_len=64, batch=8, max_steps=40)


@pytest.mark.slow  # its fixture fine-tunes a model: over 3 s in the quick suite (pytest -m 'not slow')
def test_folder_carries_code_auto_map_stop_ids_card_and_readable_files(chat_model):
    files = set(os.listdir(chat_model))
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "configuration_slm.py",
        "model_slm.py",
        "tokenizer.json",
        "README.md",
    } <= files
    config = json.load(open(os.path.join(chat_model, "config.json"), encoding="utf-8"))
    assert config["auto_map"] == {
        "AutoConfig": "configuration_slm.SLMConfig",
        "AutoModelForCausalLM": "model_slm.SLMForCausalLM",
    }
    gen = json.load(open(os.path.join(chat_model, "generation_config.json"), encoding="utf-8"))
    assert gen["eos_token_id"] == [0, 2] and gen["pad_token_id"] == 3  # <|endoftext|>, <|im_end|>; <|pad|>
    for name in files:
        mode = stat.S_IMODE(os.stat(os.path.join(chat_model, name)).st_mode)
        assert mode & stat.S_IROTH, f"{name} is not readable by other accounts ({oct(mode)})"
    card = open(os.path.join(chat_model, "README.md"), encoding="utf-8").read()
    assert card.startswith("---\nlibrary_name: transformers") and "the `sft` stage" in card
    assert "optimizer steps: 40" in card and "trust_remote_code=True" in card
    # the SFT data's license (dataset_info.json) and the base's pretraining license, carried through init_from
    from dataset.licenses import card_licenses

    assert card_licenses(chat_model) == ["Apache 2.0", "CC-BY-SA-4.0"]
    assert "Licenses recorded for the training data: Apache 2.0; CC-BY-SA-4.0." in card
    # init_from is a local folder, not a Hub id: named in the text, kept out of the `base_model:` field
    front = card.split("\n---\n", 1)[0]
    assert "base_model" not in front and "started from the local checkpoint `" in card


def test_card_reads_licenses_from_shards_and_what_downloads_carry(tmp_path, tiny_tokenizer_dir):
    from dataset.licenses import card_licenses, file_licenses
    from tests.helpers import tiny_checkpoint

    base = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "base"))
    write_pretraining_card(base, shards=str(tmp_path / "shards"), license="CC-BY-SA-3.0")
    card = open(os.path.join(base, "README.md"), encoding="utf-8").read()
    assert 'training_data_licenses: ["CC-BY-SA-3.0"]' in card and "base_model" not in card
    assert card_licenses(base) == ["CC-BY-SA-3.0"]
    from model import SLMConfig
    from model.hub import write_model_card

    hub_base = write_model_card(
        str(tmp_path), config=SLMConfig.from_pretrained(base), stage="sft", training={}, base_model="Qwen/Qwen2.5-0.5B"
    )
    assert "\nbase_model: Qwen/Qwen2.5-0.5B\n" in open(hub_base, encoding="utf-8").read()
    os.remove(hub_base)  # tmp_path's own card would be the parent card of the folders below
    # a Hub dataset snapshot: the card at the root, the files in data/; `other` names itself with license_name
    hub = tmp_path / "hub_set"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: other\nlicense_name: my-terms\ntags: [chat]\n---\n# set\n")
    (hub / "data" / "train.jsonl").write_text("{}\n")
    # a save_to_disk folder carries dataset_info.json inside; a card whose license is a list
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text(json.dumps({"license": "  MIT\n"}))
    (saved / "data-00000-of-00001.arrow").write_bytes(b"")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "README.md").write_text("---\nlicense:\n- cc-by-4.0\n- odc-by\n---\n")
    (listed / "a.jsonl").write_text("{}\n")
    bare = tmp_path / "bare.jsonl"  # nothing beside it (tmp_path has no card): nothing invented
    bare.write_text("{}\n")
    assert file_licenses(str(bare)) == []
    assert file_licenses(f"{hub}/data/*.jsonl,{saved},{listed},{bare}") == ["MIT", "cc-by-4.0", "my-terms", "odc-by"]
    assert file_licenses("") == [] and file_licenses(str(tmp_path / "missing.jsonl")) == []


FRESH = textwrap.dedent("""
    import json, sys, threading
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, pipeline

    path = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # it reads config.json, which has auto_map
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    assert "model" not in sys.modules, "the repository's model package was imported"
    messages = [{"role": "user", "content": "中国的首都是哪里？"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    chat = pipeline("text-generation", model=path, trust_remote_code=True, dtype=torch.float32)
    answer = chat(messages, max_new_tokens=40, do_sample=False)[0]["generated_text"][-1]
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**ids, max_new_tokens=40, do_sample=False,
                                                                  streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    logits = model(input_ids=ids["input_ids"]).logits[0, -1]
    print(json.dumps({"generate": out.tolist(), "pipeline": answer, "streamed": streamed,
                      "logits": logits.tolist(), "prompt": ids["input_ids"][0].tolist()}))
""")


@pytest.mark.slow
def test_stock_transformers_in_a_fresh_process(chat_model, tmp_path):
    from transformers import AutoTokenizer

    from model.engine import Engine

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    proc = subprocess.run(
        [sys.executable, str(script), chat_model], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(chat_model)
    # generate() stopped at <|im_end|> (the last id), not at max_new_tokens with garbage after the answer
    assert result["generate"][-1] == 2 and len(result["generate"]) < 40
    assert tok.decode(result["generate"], skip_special_tokens=True) == REPLY
    assert result["pipeline"] == {"role": "assistant", "content": REPLY}
    assert result["streamed"] == REPLY
    engine = Engine.from_pretrained(chat_model, device="cpu", dtype="fp32")
    with torch.no_grad():
        ours = engine.model(input_ids=torch.tensor([result["prompt"]])).logits[0, -1]
    assert torch.allclose(ours, torch.tensor(result["logits"]), atol=1e-5)


@pytest.mark.slow
def test_card_use_code_runs_as_printed_in_a_fresh_process(chat_model, tmp_path):
    """The card's "Use" block, cut from final/README.md and run unchanged from inside the folder (as its comment
    says), where the repository is not importable, prints the model's greedy reply (generate()'s text here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card = open(os.path.join(chat_model, "README.md"), encoding="utf-8").read()
    code = card.split("## Use\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=chat_model, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    reply = model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1] :]
    expected = tok.decode(reply, skip_special_tokens=True)
    assert expected.strip() and proc.stdout.rstrip("\n") == expected


@pytest.mark.slow
def test_lm_eval_scores_the_native_folder(tiny_tokenizer_dir, tmp_path):
    """`lm_eval --model hf --model_args pretrained=<final/>,trust_remote_code=True` loads a native folder through
    its auto_map and gives every log-likelihood our eval stage's scorer gives (tests/test_eval.py checks the same on
    the Llama export, with accuracies)."""
    from tests.helpers_thirdparty import require_thirdparty, run_thirdparty

    require_thirdparty("lm_eval", "lm_eval")
    from transformers import AutoTokenizer

    from dataset.mc_data import LETTERS, mc_subject_files, read_mc_questions
    from model.runtime import load_pretrained
    from scripts.lm_eval_task import write_lm_eval_task
    from tests.helpers import tiny_checkpoint
    from trainer.eval import continuation_request, mc_prompt, score_requests

    native = tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path / "native"))
    mc_dir = tmp_path / "cmmlu"  # CMMLU's published layout and header, one subject
    for split, rows in (
        ("test", [("北京是哪国的首都？", "中国"), ("一加一等于几？", "二")]),
        ("dev", [("水是什么？", "液体")]),
    ):
        (mc_dir / split).mkdir(parents=True)
        lines = [",Question,A,B,C,D,Answer"] + [f"{i},{q},{a},甲,乙,丙,A" for i, (q, a) in enumerate(rows)]
        (mc_dir / split / "arts.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_lm_eval_task(str(mc_dir), str(tmp_path / "task"), "test", shots=1)
    theirs = run_thirdparty(
        "lm_eval",
        "lm_eval",
        "run_lm_eval.py",
        [f"{native},trust_remote_code=True", str(tmp_path / "task"), "milli_mc"],
        tmp_path,
    )["samples"]["milli_mc_arts"]
    tok = AutoTokenizer.from_pretrained(native)
    shots = read_mc_questions(mc_subject_files(str(mc_dir), "dev")[1]["arts"])
    questions = read_mc_questions(mc_subject_files(str(mc_dir), "test")[1]["arts"])
    requests = [continuation_request(tok, mc_prompt("arts", shots, q), list(LETTERS)) for q in questions]
    ours = score_requests(load_pretrained(native).eval(), requests, 8, "cpu", tok.pad_token_id)
    assert [s["doc_id"] for s in theirs] == [0, 1]
    for a, b in zip(ours, (s["lls"] for s in theirs)):
        assert a == pytest.approx(b, abs=1e-5)


def test_card_gives_the_upload_lines_for_the_hub_its_mirror_and_modelscope(tmp_path):
    """The card's Publish section names the folder as it will be (final/, not the final.tmp it is written in) and a
    repo name that says the stage, in the three upload commands users copy."""
    from model.hub import write_model_card
    from tests.helpers import tiny_config

    folder = tmp_path / "out" / "sft" / "final.tmp"
    folder.mkdir(parents=True)
    card = open(write_model_card(str(folder), config=tiny_config(), stage="sft", training={}), encoding="utf-8").read()
    final = str(tmp_path / "out" / "sft" / "final")
    assert "## Publish" in card and ".tmp" not in card.split("## Publish")[1]
    assert f"\nhuggingface-cli upload <your-name>/milli-chat-sft {final} .\n" in card
    assert f"\nHF_ENDPOINT=https://hf-mirror.com huggingface-cli upload <your-name>/milli-chat-sft {final} .\n" in card
    assert f"\nmodelscope upload <your-name>/milli-chat-sft {final}\n" in card and "modelscope login --token" in card
    assert "ollama Modelfile" in card
