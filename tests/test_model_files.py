"""
Corrupted model folders at inference (issue 25.6): the one loader every script shares (model/runtime.py
load_pretrained, under Engine.from_pretrained for serve, chat and eval, and under the export scripts) verifies
checksums.json when the folder has one and names the file on any corruption: a flipped byte in tokenizer.json,
a config.json that does not match the weights, a safetensors header that lies about its tensors.

    python -m pytest tests/test_model_files.py
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from model.engine import Engine
from model.runtime import CheckpointError, load_pretrained
from tests.helpers_inference import build_model, build_tokenizer, save_checkpoint
from trainer.checkpoint import write_checksums

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    tok = build_tokenizer()
    return Path(save_checkpoint(build_model(tok), tok, str(tmp_path / "final")))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def lie_in_header(path: Path) -> None:
    """The first tensor's data end moved 1 MB past the file: the header promises bytes that are not there."""
    raw = (path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + (1 << 20)]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_a_flipped_byte_in_tokenizer_json_is_named_by_the_checksums(model_dir):
    write_checksums(str(model_dir))
    flip_byte(model_dir / "tokenizer.json", 200)  # inside the vocabulary: still valid JSON, a different token
    with pytest.raises(CheckpointError, match=r"final/tokenizer\.json: SHA-256 differs from checksums\.json"):
        Engine.from_pretrained(str(model_dir), device="cpu")


def test_a_broken_tokenizer_json_without_checksums_is_named(model_dir):
    # Before: a JSONDecodeError from the tokenizer's loader naming no file.
    text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    (model_dir / "tokenizer.json").write_text(text.replace('"', "'", 1), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"final/tokenizer\.json: corrupted, not valid JSON"):
        Engine.from_pretrained(str(model_dir), device="cpu")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: edit_config(d, hidden_size=256), r"model\.safetensors: cannot be loaded with .*final/config\.json"),
        (lambda d: edit_config(d, num_hidden_layers=5), r"model\.safetensors does not match .*config\.json: 9 weights"),
        (lambda d: edit_config(d, num_hidden_layers=3), r"does not match .*config\.json: 9 not in it"),
        (lie_in_header, r"model\.safetensors: cannot be loaded .*SafetensorError"),
    ],
    ids=["wider config", "more layers in config", "fewer layers in config", "lying header"],
)
def test_weights_that_do_not_match_their_folder_are_named(model_dir, corrupt, message):
    """A wider config and a lying header gave the library's raw error; a config with one more layer than the
    weights loaded that layer as random noise, with only a warning."""
    corrupt(model_dir)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(str(model_dir))
    with pytest.raises(CheckpointError, match=message):
        Engine.from_pretrained(str(model_dir), device="cpu")


def test_a_causal_checkpoint_still_loads_as_a_score_model(model_dir):
    model = load_pretrained(str(model_dir), "score")  # a new score head, lm_head dropped: not a corruption
    assert model.score.weight.shape[0] == 1


def test_export_llama_refuses_a_corrupted_folder(model_dir, tmp_path):
    from scripts.export_llama import export_llama

    write_checksums(str(model_dir))
    flip_byte(model_dir / "model.safetensors", (model_dir / "model.safetensors").stat().st_size - 3)
    with pytest.raises(CheckpointError, match=r"final/model\.safetensors: SHA-256 differs"):
        export_llama(str(model_dir), str(tmp_path / "llama"))
    assert not (tmp_path / "llama").exists()


@pytest.mark.slow  # a fresh interpreter
def test_serve_api_names_the_corrupted_file(model_dir):
    write_checksums(str(model_dir))
    flip_byte(model_dir / "tokenizer.json", 200)
    done = subprocess.run(
        [sys.executable, "scripts/serve_api.py", "--model", str(model_dir), "--port", "0", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and f"{model_dir}/tokenizer.json: SHA-256 differs" in done.stderr
