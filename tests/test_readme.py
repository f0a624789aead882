"""The READMEs stay true: the presets table is what scripts/model_summary.py prints, both open with the two
commands (the demo and the tests), the command lines of "Run your model elsewhere" name only scripts, flags, stages
and config keys that exist (its transformers lines are run as printed, with a terminal on stdin), and each Chinese
README (README.md, config/recipes/README.md) says what its English twin (README_en.md) says: the same code blocks,
the same commands, the same tables with the same code and numbers in each cell (prose may differ)."""

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


READMES = ["README.md", "README_en.md"]
TWINS = [("README.md", "README_en.md"), ("config/recipes/README.md", "config/recipes/README_en.md")]


@pytest.mark.parametrize("name", READMES)
def test_presets_table_matches_code(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    table = re.search(r"<!-- presets:start -->\n(.*?)\n<!-- presets:end -->", text, re.S).group(1)
    assert table.splitlines() == preset_rows()


@pytest.mark.parametrize("name", READMES)
def test_readme_opens_with_demo_and_test_commands(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "main.py --stage all --config config/demo.yaml" in first_block
    assert "pytest" in first_block
    assert (ROOT / "config" / "demo.yaml").exists()


def test_both_readmes_open_with_the_same_setup_commands_byte_for_byte():
    first = [(ROOT / name).read_text(encoding="utf-8").split("```", 2)[1] for name in READMES]
    assert first[0] == first[1]


# -----------------------------------------------------------------------------
# Chinese first: each Chinese README and its English twin say the same things


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```([a-z]*)\n(.*?)^```", text, re.S | re.M)


def block_code(language: str, body: str) -> list[str]:
    """What must not differ between the languages. Shell/Python: every line without its comment (comments are
    translated). Plain blocks: the first word of each unindented line (a file tree's names; its descriptions are
    translated), or the whole block when every line is indented (program output)."""
    lines = body.splitlines()
    if language in ("bash", "sh", "python"):
        code = [re.split(r"(?:^|\s{2,}|\s)#\s", line, maxsplit=1)[0].rstrip() for line in lines]
        return [line for line in code if line]
    unindented = [line.split()[0] for line in lines if line and not line[0].isspace()]
    return unindented or lines


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (the |---| rule left out)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"[|\-: ]+", line):
                current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def cell_facts(cell: str) -> tuple[list[str], list[str]]:
    """The code spans of a table cell and the numbers in its prose, each sorted (word order differs by language)."""
    spans = re.findall(r"`([^`]+)`", cell)
    prose = re.sub(r"`[^`]+`", " ", cell)
    return sorted(spans), sorted(re.findall(r"\d+(?:[.,]\d+)*", prose))


COMMAND = re.compile(r"^(python|bash|pip|torchrun|hf|wandb|swanlab|llama-|vllm|ollama|lm_eval|[A-Z_]+=)")


def inline_commands(text: str) -> set[str]:
    """Commands quoted inline in the prose (outside code blocks and tables)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    prose = "\n".join(line for line in prose.splitlines() if not line.startswith("|"))
    return {span for span in re.findall(r"`([^`\n]+)`", prose) if COMMAND.match(span)}


@pytest.mark.parametrize("chinese, english", TWINS)
def test_chinese_readme_and_its_english_twin_agree(chinese, english):
    zh, en = ((ROOT / name).read_text(encoding="utf-8") for name in (chinese, english))
    # each links the other at the top
    assert f"[English]({Path(english).name})" in "\n".join(zh.splitlines()[:4])
    assert f"[中文]({Path(chinese).name})" in "\n".join(en.splitlines()[:4])
    # the Chinese one is Chinese (the English one was 46 Han characters in 25,520 before)
    han = len(re.findall(r"[\u4e00-\u9fff]", re.sub(r"^```.*?^```", "", zh, flags=re.S | re.M)))
    assert han > len(zh) / 6, f"{chinese}: only {han} Han characters"
    zh_blocks, en_blocks = fenced_blocks(zh), fenced_blocks(en)
    assert [lang for lang, _ in zh_blocks] == [lang for lang, _ in en_blocks]
    for (lang, zh_body), (_, en_body) in zip(zh_blocks, en_blocks):
        assert block_code(lang, zh_body) == block_code(lang, en_body)
    zh_tables, en_tables = tables(zh), tables(en)
    assert len(zh_tables) == len(en_tables)
    for zh_table, en_table in zip(zh_tables, en_tables):
        assert [len(row) for row in zh_table] == [len(row) for row in en_table], en_table[0]
        for zh_row, en_row in zip(zh_table[1:], en_table[1:]):  # the header row is words only
            for zh_cell, en_cell in zip(zh_row, en_row):
                assert cell_facts(zh_cell) == cell_facts(en_cell), (en_cell, zh_cell)
    assert inline_commands(zh) == inline_commands(en)


def test_the_twin_check_catches_a_changed_command():
    en = "```bash\npython main.py --stage sft  # fine-tune\n```\n\n| a | b |\n|---|---|\n| x | `lr=1e-3`, 64 steps |\n"
    zh = en.replace("# fine-tune", "# 微调").replace("64 steps", "64 步")
    assert block_code("bash", fenced_blocks(zh)[0][1]) == block_code("bash", fenced_blocks(en)[0][1])
    assert cell_facts(tables(zh)[0][1][1]) == cell_facts(tables(en)[0][1][1])
    changed = zh.replace("--stage sft", "--stage dpo").replace("64 步", "32 步")
    assert block_code("bash", fenced_blocks(changed)[0][1]) != block_code("bash", fenced_blocks(en)[0][1])
    assert cell_facts(tables(changed)[0][1][1]) != cell_facts(tables(en)[0][1][1])


# -----------------------------------------------------------------------------
# "Run your model elsewhere": every command line of its block names scripts, flags, stages and keys that exist


def ecosystem_commands() -> list[list[str]]:
    """The shell commands of the section's bash block, as argv lists (comments dropped, `a && b` split)."""
    text = (ROOT / "README_en.md").read_text(encoding="utf-8")  # README.md has the same block (checked above)
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
    from trainer.stages import STAGES

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
        assert argv[2] == "--stage" and argv[3] in STAGES, argv
        module = importlib.import_module(STAGES[argv[3]][0])
        load_config(module.Config, None, argv[4:])  # unknown keys, bad types and enum values raise ConfigError


def run_at_a_terminal(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run with a pseudo-terminal on stdin, as in a user's shell: there transformers asks its trust_remote_code
    question ("[y/N]") and waits, where a closed stdin would let a missing trust_remote_code=True pass unseen."""
    import pty  # POSIX only; the lines themselves are the same on every platform

    controller, terminal = pty.openpty()
    try:
        return subprocess.run(argv, stdin=terminal, capture_output=True, text=True, **kwargs)
    finally:
        os.close(terminal)
        os.close(controller)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_ecosystem_python_lines_run_as_printed(tiny_tokenizer_dir, tmp_path):
    """The section's transformers one-liners and its openai tools call, run as printed (at a terminal) in a fresh
    interpreter that does not see this repository, on a tiny checkpoint where the README says (out/sft/final under
    the working directory); the openai line talks to scripts/serve_api.py's server, on a free port instead of 8000."""
    import threading

    from model.engine import Engine
    from model.server.http import make_server
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
            proc = run_at_a_terminal([sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=300)
            assert proc.returncode == 0, f"{code[:80]}...\n{proc.stderr[-3000:]}"
            assert "[y/N]" not in proc.stdout + proc.stderr, f"it stops at a prompt in a terminal: {code[:80]}"
            # it printed a reply past print()'s own newline (random weights: any text, blank lines too, or a tool call)
            assert len(proc.stdout) > 1, code[:80]
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
