"""
LoRA (trainer/lora.py, model/lora.py): only adapter weights and the chat markers' embedding rows train, the base
stays bit-identical, the adapter merges to the same logits (scripts/merge_lora.py), loads in peft with the same
logits, resumes exactly, and runs on the real data. Without the trained rows the model never learns to end its turn.
rsLoRA, untied heads and PEFT-written adapters read the same in the stage, the engine's merge and PEFT; adapter
options we do not implement are refused by every reader.

    python -m pytest tests/test_lora.py          # peft is a test-only dependency (pip install peft)
"""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import PAIRS, SHARED_SFT, read_metrics, tiny_checkpoint, write_chat_file

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBED_ROWS = "model.embed_tokens.token_adapter.trainable_tokens_delta"  # our name of the trained rows
HEAD_ROWS = "lm_head.token_adapter.trainable_tokens_delta"  # an untied head's own rows


@pytest.fixture(scope="module")
def base_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """A random tiny model (2 layers, GQA 4 q / 2 kv heads) + tokenizer, standing in for a pretrained final/."""
    return tiny_checkpoint(tiny_tokenizer_dir, str(tmp_path_factory.mktemp("base") / "final"))


def lora_config(init_from: str, out_dir, data_path: str, **overrides):
    from trainer.lora import Config

    base = {
        "init_from": init_from,
        "out_dir": str(out_dir),
        "data_path": data_path,
        "seq_len": 64,
        "batch_size": 4,
        "global_batch_size": 8,
        "lr": 1e-2,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "lora_r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.1,
        "val_samples": 0,
        "eval_every": 0,
        "save_every": 2,
        "log_every": 20,
        "device": "cpu",
        "dtype": "fp32",
        "placeholders": "name=Milli-Chat",
        "seed": 0,
    }
    return Config(**{**base, **overrides})


def load_base(path: str):
    from model.runtime import load_pretrained

    return load_pretrained(path).eval()


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """4 LoRA steps straight, and 2 steps + resume to 4 in another dir (dropout on: the RNG must resume too)."""
    from trainer.lora import run

    root = tmp_path_factory.mktemp("lora")
    data = write_chat_file(root / "chat.jsonl")
    straight = run(lora_config(base_dir, root / "straight", data, max_steps=4))
    run(lora_config(base_dir, root / "resumed", data, max_steps=2))
    resumed = run(lora_config(base_dir, root / "resumed", data, max_steps=4))
    return {"root": root, "straight": straight, "resumed": resumed}


# -----------------------------------------------------------------------------


def chat_marker_ids(path: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])


def test_only_adapters_and_the_chat_marker_rows_train_and_the_base_is_untouched(base_dir, trained):
    trainer = trained["straight"]
    model = trainer.raw_model
    lora = {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * len(TARGETS) * model.config.num_hidden_layers  # k/v included under GQA
    # The tied head reads the embedding's rows: one parameter of (2 tokens, hidden) trains for both.
    assert model.config.tie_word_embeddings
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(lora) | {EMBED_ROWS} and trainable[EMBED_ROWS].shape == (2, model.config.hidden_size)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable.values()}
    assert all(p.abs().sum() > 0 for n, p in lora.items() if ".lora_B." in n)  # B left zero init: it trained
    # Every base weight equals the checkpoint it came from, bit for bit (the embedding's too: the rows are apart).
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    state = {
        k.replace(".base_layer.", "."): v
        for k, v in model.state_dict().items()
        if ".lora_" not in k and ".token_adapter." not in k
    }
    assert set(base) <= set(state)
    assert all(torch.equal(base[k], state[k]) for k in base)


def test_the_chat_marker_rows_train_and_the_merge_changes_only_those_rows(base_dir, trained, tmp_path):
    """The adapter's rows moved away from the base's <|im_start|> and <|im_end|> rows; merged, the embedding
    (= the tied head) differs from the base in exactly those two rows and equals the trained rows there."""
    from scripts.merge_lora import main as merge_main

    marker_ids = chat_marker_ids(base_dir)
    adapter = trained["root"] / "straight" / "final"
    rows = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model." + EMBED_ROWS]
    base = load_file(str(Path(base_dir) / "model.safetensors"))["model.embed_tokens.weight"]
    assert all(not torch.equal(rows[i], base[t]) for i, t in enumerate(marker_ids))
    assert merge_main(["--model", base_dir, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))["model.embed_tokens.weight"]
    changed = (merged != base).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(marker_ids)
    assert torch.equal(merged[marker_ids], rows)


@torch.no_grad()
def end_of_turn_loss_of(model, path: str) -> float:
    from transformers import AutoTokenizer

    from trainer.pipeline import end_of_turn_loss

    pairs = [(q, a) for q, a in PAIRS if "{{" not in a]  # the training answers, placeholders aside
    return end_of_turn_loss(model.eval(), AutoTokenizer.from_pretrained(path), pairs)


def test_without_the_marker_rows_lora_does_not_learn_to_end_its_turn(base_dir, tmp_path):
    """Issue 27.2: the chat markers are new to the base (pretraining never saw them), and no low-rank update of
    the layers makes their frozen rows useful: the loss of <|im_end|> stays high, so generation never stops. With
    the rows trained (lora_trainable_tokens, on by default) it falls like the rest of the answer's."""
    from trainer.lora import run

    data = write_chat_file(tmp_path / "chat.jsonl")
    steps = {"max_steps": 8, "save_every": 0, "lora_dropout": 0.0}
    frozen = run(lora_config(base_dir, tmp_path / "frozen", data, lora_trainable_tokens="", **steps))
    with_rows = run(lora_config(base_dir, tmp_path / "rows", data, **steps))
    frozen_loss, rows_loss = (
        end_of_turn_loss_of(frozen.raw_model, base_dir),
        end_of_turn_loss_of(with_rows.raw_model, base_dir),
    )
    assert frozen_loss > 3.0, frozen_loss  # log(512) = 6.2 at the random base
    assert rows_loss < frozen_loss / 4, (rows_loss, frozen_loss)
    config = json.loads((tmp_path / "frozen" / "final" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] is None  # "" trains no rows: the adapter is plain LoRA again


def test_a_token_the_tokenizer_lacks_is_named(base_dir, tmp_path):
    from trainer.lora import run

    data = write_chat_file(tmp_path / "chat.jsonl")
    with pytest.raises(ValueError, match=r"\['<\|im_stop\|>'\] are not tokens of the tokenizer"):
        run(lora_config(base_dir, tmp_path / "typo", data, max_steps=1, lora_trainable_tokens="<|im_end|>,<|im_stop|>"))


def test_adapter_is_saved_in_peft_format_and_resumes_exactly(trained):
    root = trained["root"]
    final = root / "straight" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    # PEFT's trainable_token_indices: a list names the input embedding's rows, and the tied head follows them.
    assert config["trainable_token_indices"] == chat_marker_ids(str(final))
    weights = load_file(str(final / "adapter_model.safetensors"))
    assert all(
        k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
        for k in weights
        if k != "base_model.model." + EMBED_ROWS
    )
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in weights
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in weights
    assert not (final / "model.safetensors").exists() and (final / "tokenizer.json").is_file()
    assert trained["resumed"].step == 4
    resumed = load_file(str(root / "resumed" / "final" / "adapter_model.safetensors"))
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert [r["loss"] for r in read_metrics(str(root / "straight"))][-1] == [
        r["loss"] for r in read_metrics(str(root / "resumed"))
    ][-1]


def test_merge_and_peft_give_our_logits(base_dir, trained, tmp_path):
    peft = pytest.importorskip("peft")
    from model.lora import load_adapter
    from scripts.merge_lora import main as merge_main

    adapter = str(trained["root"] / "straight" / "final")
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52, 60, 61]])
    with torch.no_grad():
        plain = load_base(base_dir)(input_ids=ids).logits
        ours = load_adapter(load_base(base_dir), adapter).eval()(input_ids=ids).logits
        assert not torch.allclose(plain, ours, atol=1e-3)  # the adapter does change the model
        assert merge_main(["--model", base_dir, "--adapter", adapter, "--out", str(tmp_path / "merged")]) == 0
        merged = load_base(str(tmp_path / "merged"))(input_ids=ids).logits
        torch.testing.assert_close(merged, ours, atol=1e-5, rtol=1e-4)
        theirs = peft.PeftModel.from_pretrained(load_base(base_dir), adapter).eval()(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)


def test_an_adapter_dir_alone_loads_on_its_base_and_a_missing_base_is_named(base_dir, tmp_path):
    """Engine.from_pretrained(adapter dir) and scripts/merge_lora.py without --model find the base through
    model/lora.py's reader (adapter_base_model); an adapter that names no base is a clear ValueError."""
    from model.engine import Engine
    from model.lora import add_lora, save_adapter
    from scripts.merge_lora import merge

    model = load_base(base_dir)
    add_lora(model, ["q_proj"], 2, 4.0, 0.0)
    save_adapter(model, str(tmp_path / "named"), base_dir, ["q_proj"], 2, 4.0, 0.0)
    save_adapter(model, str(tmp_path / "nameless"), "", ["q_proj"], 2, 4.0, 0.0)
    engine = Engine.from_pretrained(str(tmp_path / "named"), device="cpu", dtype="fp32")
    assert engine.model.config.num_hidden_layers == model.config.num_hidden_layers
    merged = merge("", str(tmp_path / "named"), str(tmp_path / "merged"))
    assert os.path.isfile(os.path.join(merged, "config.json"))
    nameless = str(tmp_path / "nameless")
    with pytest.raises(ValueError, match="names no base_model_name_or_path"):
        Engine.from_pretrained(nameless, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="names no base_model_name_or_path"):
        merge("", nameless, str(tmp_path / "merged_nameless"))


def file_modes(path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(path).iterdir() if p.is_file()}


def test_merged_and_adapter_folders_are_readable_and_carry_a_card(base_dir, trained, tmp_path):
    """safetensors writes 0600; every file of an adapter folder and of a merged one must have the mode a plain file
    gets under the user's umask (0644 under 022), so a docker/ollama service account can read them. The merged
    folder is an ordinary checkpoint: a card carrying the adapter's data licenses, <|im_end|> as a stop id."""
    from dataset.licenses import card_licenses
    from scripts.merge_lora import main as merge_main

    trained_adapter = trained["root"] / "straight" / "final"
    umask = os.umask(0o022)  # the usual umask, under which 0600 and 0644 differ
    os.umask(umask)
    assert set(file_modes(trained_adapter).values()) == {0o666 & ~umask}, file_modes(trained_adapter)
    adapter = shutil.copytree(trained_adapter, tmp_path / "adapter")
    card = (adapter / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card  # the Hub loads an adapter folder with PEFT
    (adapter / "README.md").write_text(  # as if the adapter's data had declared a license
        card.replace("\n---\n", '\ntraining_data_licenses: ["CC-BY-4.0"]\n---\n', 1), encoding="utf-8"
    )
    umask = os.umask(0o022)
    try:
        assert merge_main(["--model", base_dir, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(umask)
    merged = file_modes(tmp_path / "merged")
    assert {"model.safetensors", "config.json", "tokenizer.json", "model_slm.py", "README.md"} <= set(merged)
    assert set(merged.values()) == {0o644}, merged
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    assert "library_name: transformers" in card
    assert "the `lora` stage" in card and "rank: 4" in card and f"local checkpoint `{base_dir}`" in card
    assert card_licenses(str(tmp_path / "merged")) == ["CC-BY-4.0"]
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]


@pytest.mark.slow
def test_auto_peft_loads_the_adapter_from_another_directory(base_dir, trained, tmp_path):
    """The adapter names its base by absolute path, and the base carries its code (auto_map): stock PEFT in a fresh
    process, started somewhere else, loads both and gives our logits."""
    pytest.importorskip("peft")
    import subprocess
    import sys

    from model.lora import load_adapter

    adapter = str(trained["root"] / "straight" / "final")
    assert os.path.isabs(
        json.loads(open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8").read())[
            "base_model_name_or_path"
        ]
    )
    ids = [1, 40, 41, 42, 43, 2, 1, 50, 51, 52, 60, 61]
    code = (
        "import json, sys, torch; from peft import AutoPeftModelForCausalLM;"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32);"
        "assert 'model' not in sys.modules;"
        "print(json.dumps(m.eval()(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits[0].tolist()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code, adapter, json.dumps(ids)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        ours = load_adapter(load_base(base_dir), adapter).eval()(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(
        torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])), ours, atol=1e-5, rtol=1e-4
    )


def test_lora_on_the_shared_real_data(base_dir, tmp_path):
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
    out = tmp_path / "lora_real"
    rc = main.main(
        [
            "--stage",
            "lora",
            "--config",
            "config/lora.yaml",
            f"init_from={base_dir}",
            f"data_path={files}",
            f"out_dir={out}",
            "max_samples=30",
            "seq_len=256",
            "batch_size=2",
            "global_batch_size=4",
            "max_steps=2",
            "val_samples=8",
            "eval_batches=2",
            "device=cpu",
            "log_every=1",
        ]
    )
    assert rc == 0 and (out / "final" / "adapter_model.safetensors").is_file()
    assert all(0 < r["loss"] < 20 for r in read_metrics(str(out)))


# -----------------------------------------------------------------------------
# One adapter format: the stage, the engine's merge and PEFT read every adapter the same way (rsLoRA included)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def peft_adapter(base_dir: str, out_dir, **lora_kwargs) -> str:
    """An adapter written by PEFT itself, with random (non-zero) A and B so that it changes the model, and trained
    token rows (if any) moved off the base's."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **lora_kwargs
    )
    model = peft.get_peft_model(load_base(base_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    return str(out_dir)


def test_rslora_adapter_trains_merges_and_matches_peft(base_dir, tmp_path):
    """use_rslora scales the update by alpha / sqrt(r): training, the saved config, our unmerged loading, the
    engine's merge and PEFT must all use that same scale."""
    peft = pytest.importorskip("peft")
    from model.engine import Engine
    from model.lora import load_adapter
    from trainer.lora import run

    data = write_chat_file(tmp_path / "chat.jsonl")
    trainer = run(lora_config(base_dir, tmp_path / "rs", data, max_steps=2, lora_rslora=True))
    adapter = str(tmp_path / "rs" / "final")
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52, 60, 61]])
    trained = logits_of(trainer.raw_model, ids)  # the adapters as they trained (scale 8 / sqrt(4) = 4)
    assert not torch.allclose(trained, logits_of(load_base(base_dir), ids), atol=1e-3)
    ours = logits_of(load_adapter(load_base(base_dir), adapter), ids)
    torch.testing.assert_close(ours, trained, atol=1e-6, rtol=1e-5)
    merged = logits_of(Engine.from_pretrained(base_dir, adapter=adapter, device="cpu", dtype=torch.float32).model, ids)
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-4)
    theirs = logits_of(peft.PeftModel.from_pretrained(load_base(base_dir), adapter), ids)
    torch.testing.assert_close(theirs, trained, atol=1e-6, rtol=1e-5)
    # The same weights read as plain LoRA (alpha / r = 2) give other logits: the flag is what the test checks.
    plain_lora = tmp_path / "as_plain_lora"
    plain_lora.mkdir()
    (plain_lora / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": False}))
    (plain_lora / "adapter_model.safetensors").write_bytes((Path(adapter) / "adapter_model.safetensors").read_bytes())
    assert not torch.allclose(logits_of(load_adapter(load_base(base_dir), str(plain_lora)), ids), trained, atol=1e-3)


def test_peft_rslora_adapter_reads_the_same_in_stage_engine_and_peft(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from model.engine import Engine
    from model.lora import load_adapter

    adapter = peft_adapter(base_dir, tmp_path / "peft_rslora", use_rslora=True)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52, 60, 61]])
    theirs = logits_of(peft.PeftModel.from_pretrained(load_base(base_dir), adapter), ids)
    assert not torch.allclose(theirs, logits_of(load_base(base_dir), ids), atol=1e-3)
    torch.testing.assert_close(logits_of(load_adapter(load_base(base_dir), adapter), ids), theirs, atol=1e-6, rtol=1e-5)
    merged = Engine.from_pretrained(base_dir, adapter=adapter, device="cpu", dtype=torch.float32).model
    torch.testing.assert_close(logits_of(merged, ids), theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "feature", [{"alpha_pattern": {"q_proj": 32}}, {"rank_pattern": {"v_proj": 2}}, {"use_dora": True}]
)
def test_adapter_features_we_do_not_implement_fail_in_every_reader(base_dir, tmp_path, feature):
    """Per-module ranks/alphas and DoRA change the update in ways a plain B A merge does not reproduce: both the
    unmerged loader and the engine's merge refuse them instead of computing other logits than PEFT."""
    from model.engine import Engine
    from model.lora import load_adapter

    adapter = peft_adapter(base_dir, tmp_path / "adapter", **feature)
    with pytest.raises(ValueError, match="not supported"):
        load_adapter(load_base(base_dir), adapter)
    with pytest.raises(ValueError, match="not supported"):
        Engine.from_pretrained(base_dir, adapter=adapter, device="cpu", dtype=torch.float32)


# -----------------------------------------------------------------------------
# Trained token rows with an untied head, and PEFT-written ones


@pytest.fixture(scope="module")
def untied_base_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    return tiny_checkpoint(
        tiny_tokenizer_dir, str(tmp_path_factory.mktemp("untied") / "final"), tie_word_embeddings=False
    )


def test_an_untied_head_trains_rows_of_its_own_that_peft_and_the_merge_read(untied_base_dir, tmp_path):
    """An untied head's rows are a second parameter, saved as PEFT saves trainable_token_indices
    {"embed_tokens": ids, "lm_head": ids}; PEFT, our loader and the merge give the trained model's logits."""
    peft = pytest.importorskip("peft")
    from model.lora import load_adapter
    from scripts.merge_lora import main as merge_main
    from trainer.lora import run

    data = write_chat_file(tmp_path / "chat.jsonl")
    trainer = run(lora_config(untied_base_dir, tmp_path / "untied", data, max_steps=2))
    adapter = tmp_path / "untied" / "final"
    marker_ids = chat_marker_ids(untied_base_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": marker_ids, "lm_head": marker_ids}
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert {"base_model.model." + EMBED_ROWS, "base_model.model." + HEAD_ROWS} <= set(weights)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52, 60, 61] + marker_ids])
    trained = logits_of(trainer.raw_model, ids)
    ours = logits_of(load_adapter(load_base(untied_base_dir), str(adapter)), ids)
    torch.testing.assert_close(ours, trained, atol=1e-6, rtol=1e-5)
    theirs = logits_of(peft.PeftModel.from_pretrained(load_base(untied_base_dir), str(adapter)), ids)
    torch.testing.assert_close(theirs, trained, atol=1e-6, rtol=1e-5)
    assert merge_main(["--model", untied_base_dir, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(Path(untied_base_dir) / "model.safetensors"))
    for name, rows in (("model.embed_tokens.weight", EMBED_ROWS), ("lm_head.weight", HEAD_ROWS)):
        assert (merged[name] != base[name]).any(dim=1).nonzero().flatten().tolist() == sorted(marker_ids)
        assert torch.equal(merged[name][marker_ids], weights["base_model.model." + rows])
    torch.testing.assert_close(logits_of(load_base(str(tmp_path / "merged")), ids), trained, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_peft_written_token_rows_read_the_same_in_stage_engine_and_peft(base_dir, untied_base_dir, tmp_path, tied):
    """PEFT's own trainable_token_indices adapter (a list on the tied base, the per-module dict on the untied one)
    gives PEFT's logits in our unmerged loader and in the engine's merge."""
    peft = pytest.importorskip("peft")
    from model.engine import Engine
    from model.lora import load_adapter

    base = base_dir if tied else untied_base_dir
    marker_ids = chat_marker_ids(base)
    indices = marker_ids if tied else {"embed_tokens": marker_ids, "lm_head": marker_ids}
    adapter = peft_adapter(base, tmp_path / "peft_rows", trainable_token_indices=indices)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52, 60, 61] + marker_ids])
    theirs = logits_of(peft.PeftModel.from_pretrained(load_base(base), adapter), ids)
    torch.testing.assert_close(logits_of(load_adapter(load_base(base), adapter), ids), theirs, atol=1e-6, rtol=1e-5)
    merged = Engine.from_pretrained(base, adapter=adapter, device="cpu", dtype=torch.float32).model
    torch.testing.assert_close(logits_of(merged, ids), theirs, atol=1e-5, rtol=1e-4)
    # Rows of another module than the embedding and the head are refused, not silently left out.
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    (Path(adapter) / "adapter_config.json").write_text(
        json.dumps({**config, "trainable_token_indices": {"embed_tokens": marker_ids, "q_proj": [1]}})
    )
    with pytest.raises(ValueError, match="not supported here: trainable_token_indices"):
        load_adapter(load_base(base), adapter)


@pytest.mark.parametrize("tied", [True, False])
def test_the_chunked_loss_sees_the_trained_token_rows(tied):
    """loss_chunk (no whole logits) on a model whose chat-marker rows train: the same loss and row gradients as the
    plain path, so LoRA with its default trainable tokens keeps the chunked loss's memory saving."""
    from model.lora import add_trainable_tokens
    from tests.helpers import tiny_model

    torch.manual_seed(0)
    model = tiny_model(tie_word_embeddings=tied).train()
    for p in model.parameters():
        p.requires_grad_(False)
    add_trainable_tokens(model, [3, 7])
    rows = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in rows:
            p.add_(torch.randn_like(p))  # trained rows that differ from the base's
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    ids[:, ::3] = 7  # targets that hit the trained rows
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        out = model(ids, labels=ids, loss_chunk=chunk)
        out.loss.backward()
        assert (out.logits is None) == (chunk > 0)
        results.append((out.loss.detach(), [p.grad.clone() for p in rows]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for plain, chunked in zip(results[0][1], results[1][1]):
        assert plain.abs().sum() > 0 and torch.allclose(plain, chunked, atol=1e-6)
