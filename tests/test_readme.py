"""README.md stays true: its presets table is what scripts/model_summary.py prints, it opens with the two
commands (the demo and the tests), and the command lines of "Run your model elsewhere" name only scripts, flags,
stages and config keys that exist (its transformers lines are run as printed)."""

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.model_summary import preset_rows

ROOT = Path(__file__).resolve().parents[1]


def test_presets_table_matches_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- presets:start -->\n(.*?)\n<!-- presets:end -->", text, re.S).group(1)
    assert table.splitlines() == preset_rows()


def test_readme_opens_with_demo_and_test_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "main.py --stage all --config config/demo.yaml" in first_block
    assert "pytest" in first_block
    assert (ROOT / "config" / "demo.yaml").exists()


# -----------------------------------------------------------------------------
# "Run your model elsewhere": every command line of its block names scripts, flags, stages and keys that exist


def ecosystem_commands() -> list[list[str]]:
    """The shell commands of the section's bash block, as argv lists (comments dropped, `a && b` split)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Run your model elsewhere", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            commands.append(argv[:cut])
            argv = argv[cut + 1 :]
    return commands


def script_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser scripts/<name>.py's main() builds, caught at its parse_args call (nothing after runs)."""
    module = importlib.import_module(f"scripts.{name}")
    caught = []

    def catch(parser, args=None, namespace=None):
        caught.append(parser)
        raise KeyboardInterrupt  # out of main() before it does anything

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        patch.setattr(sys, "argv", [f"scripts/{name}.py"])
        with pytest.raises(KeyboardInterrupt):
            module.main()
    return caught[0]


def test_ecosystem_section_names_only_what_exists(monkeypatch):
    from trainer.config import load_config
    from trainer.stages import available_stages

    commands = ecosystem_commands()
    scripts = [c for c in commands if c[0] == "python" and c[1].startswith("scripts/")]
    stages = [c for c in commands if c[:2] == ["python", "main.py"]]
    assert len(scripts) >= 5 and len(stages) >= 3, commands  # the parsing found the lines
    for argv in scripts:
        assert (ROOT / argv[1]).is_file(), argv[1]
        parser = script_parser(Path(argv[1]).stem, monkeypatch)
        try:
            parser.parse_args(argv[2:])  # every flag known, every value of the right type and among the choices
        except SystemExit:
            pytest.fail(f"scripts' argparse refuses the README line: {shlex.join(argv)}")
    for argv in stages:
        assert argv[2] == "--stage" and argv[3] in available_stages(), argv
        module = importlib.import_module(available_stages()[argv[3]][0])
        load_config(module.Config, None, argv[4:])  # unknown keys, bad types and enum values raise ConfigError


@pytest.mark.slow
def test_ecosystem_python_lines_run_as_printed(tiny_tokenizer_dir, tmp_path):
    """The section's transformers one-liners and its openai tools call, run as printed in a fresh interpreter that
    does not see this repository, on a tiny checkpoint where the README says (out/sft/final under the working
    directory); the openai line talks to scripts/serve_api.py's server, on a free port instead of 8000."""
    import threading

    from model.engine import Engine
    from scripts.serve_api import make_server
    from tests.helpers import tiny_checkpoint

    lines = [argv[2] for argv in ecosystem_commands() if argv[:2] == ["python", "-c"]]
    transformers_lines = [code for code in lines if "from transformers" in code]
    (openai_line,) = [code for code in lines if "from openai" in code]
    assert len(transformers_lines) == 3  # pipeline, generate(), TextIteratorStreamer
    # the context the demo builds its model with (config/demo.yaml), not one chosen for this test
    final = tiny_checkpoint(
        tiny_tokenizer_dir, str(tmp_path / "out" / "sft" / "final"), max_position_embeddings=demo_context()
    )
    server = make_server(Engine.from_pretrained(final, device="cpu"), "127.0.0.1", 0, model_name="final", quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        for code in [*transformers_lines, openai_line.replace(":8000/", f":{port}/")]:
            proc = subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, f"{code[:80]}...\n{proc.stderr[-3000:]}"
            assert proc.stdout.strip(), code[:80]  # it printed a reply (random weights: any text, or a tool call)
    finally:
        server.shutdown()
        server.server_close()
        server.worker.stop()


def demo_context() -> int:
    """The context of the model the demo builds: config/demo.yaml's pretrain max_position_embeddings, else its
    preset's."""
    import yaml

    from model import SLMConfig

    pretrain = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text(encoding="utf-8"))["pretrain"]
    return (
        pretrain.get("max_position_embeddings")
        or SLMConfig.from_preset(pretrain["model_config"]).max_position_embeddings
    )


@pytest.mark.slow
def test_readme_tools_call_fits_the_demo_model(tmp_path):
    """The openai tools call of "Run your model elsewhere", as the server tokenizes it with the tokenizer the demo
    trains (its data, corpus and tokenizer stages run here as config/demo.yaml sets them), leaves room for a reply
    in the demo model's context (it was 557 tokens against 512 positions)."""
    import ast

    from transformers import AutoTokenizer

    from dataset.chat_data import chatml_pieces
    from trainer import pipeline
    from trainer.config import load_config

    cfg = load_config(
        pipeline.Config, str(ROOT / "config" / "demo.yaml"), ["stages=data,corpus,tokenizer", f"out_dir={tmp_path}"]
    )
    pipeline.run(cfg)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    (code,) = [argv[2] for argv in ecosystem_commands() if argv[:2] == ["python", "-c"] and "from openai" in argv[2]]
    tools = ast.literal_eval(re.search(r"tools = (\[.*?\]); r = ", code).group(1))
    messages = ast.literal_eval(re.search(r"messages=(\[.*?\]), tools=", code).group(1))
    prompt = [{"role": "system", "content": "", "tools": tools}, *messages]  # how the server passes tools on
    n = sum(len(ids) for ids, _ in chatml_pieces(tok, prompt, add_generation_prompt=True))
    assert n > 400, n  # the tools block is most of it
    assert n + 64 <= demo_context(), (n, demo_context())
