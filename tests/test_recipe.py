"""
The real-data recipe (scripts/run_recipe.sh + config/recipes/) and every stage config in config/.

Cheap checks, always run: the script parses (bash -n), and every key of every YAML in config/ and
config/recipes/ is a field of that stage's Config with a value of the right type (trainer.config.load_config,
the check main.py makes before a run), so a renamed field cannot leave a config that fails only at run time.

The end-to-end run (QUICK=1: tiny model, a few steps per stage, on the shared data pack) took 4.7 minutes on a
heavily loaded 2-core machine (pretrain 93 s, SFT 63 s, eval 57 s, DPO 34 s), so it runs only with RUN_RECIPE=1:
    RUN_RECIPE=1 python -m pytest tests/test_recipe.py
"""

import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SCRIPT = ROOT / "scripts" / "run_recipe.sh"
RECIPE_STAGES = ("clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "eval", "plot", "export")

CONFIGS = sorted(p for p in (ROOT / "config").rglob("*.yaml"))


def stage_of(path: Path) -> str:
    """config/<stage>.yaml and config/recipes/<name>/<stage>.yaml; demo.yaml is the pipeline ('all')."""
    return "all" if path.stem == "demo" else path.stem


def test_recipe_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"STOP_AFTER": "pretrian"}, "STOP_AFTER=pretrian is not one of"),
        ({"DATA": "/nonexistent/data"}, "/nonexistent/data/pretrain/zh not found"),
    ],
)
def test_recipe_script_rejects_bad_settings_before_doing_anything(tmp_path, env, message):
    out = tmp_path / "recipe"
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OUT": str(out), **env}
    )
    assert result.returncode == 2 and message in result.stderr
    assert not out.exists()


def test_recipe_rerun_with_other_settings_never_reuses_the_outputs(tmp_path):
    """Issue 27: after QUICK=1, a plain run in the same OUT skipped every stage as complete and chatted with the QUICK
    model. A stand-in interpreter writes the clean stage's outputs; the second run must stop before reusing them."""
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(
        '#!/usr/bin/env bash\nwhile [[ $# -gt 0 ]]; do if [[ $1 == --output ]]; then mkdir -p "$(dirname "$2")"; '
        'touch "$2"; fi; shift; done\n',
        encoding="utf-8",
    )
    fake_python.chmod(0o755)
    out = tmp_path / "recipe"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake_python), "STOP_AFTER": "clean", "FORCE": "0"}
    data = tmp_path / "data"  # the layout the script checks, with empty files of the default SFT/DPO names
    for folder in ("pretrain/zh", "pretrain/en", "eval/cmmlu/test"):
        (data / folder).mkdir(parents=True)
    for folder, files in (("sft", "SFT_FILES"), ("dpo", "DPO_FILES")):
        (data / folder).mkdir()
        default = re.search(rf"^{files}=\$\{{{files}:-(.*)\}}$", SCRIPT.read_text(encoding="utf-8"), re.M).group(1)
        for name in default.split(","):
            (data / folder / name).touch()
    env["DATA"] = str(data)

    def run(**extra):
        return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, env={**env, **extra})

    quick = run(QUICK="1")
    assert quick.returncode == 0 and (out / "corpus" / "en.jsonl").exists(), quick.stderr
    assert "skipped" in run(QUICK="1").stdout  # the same settings: complete, skipped
    real = run(QUICK="0")
    assert real.returncode == 2 and "made with other settings" in real.stderr, real.stdout + real.stderr
    assert "skipped" not in real.stdout
    forced = run(QUICK="0", FORCE="1")
    assert forced.returncode == 0 and "skipped" not in forced.stdout, forced.stderr
    assert run(QUICK="0").returncode == 0  # FORCE=1 recorded the new settings


def test_recipe_folder_is_complete():
    recipe = ROOT / "config" / "recipes" / "small_gpu"
    for name in ("pretrain", "sft", "dpo", "eval"):
        assert (recipe / f"{name}.yaml").is_file(), name
    prompts = [
        json.loads(line) for line in (recipe / "prompts.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    assert len(prompts) >= 10 and all(p["prompt"] for p in prompts)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_config_key_is_a_field_of_its_stage(path):
    stage = stage_of(path)
    assert stage in STAGES, (
        f"{path.relative_to(ROOT)}: no stage named '{stage}' in trainer/stages.py STAGES; name the file "
        f"after its stage (or teach tests/test_recipe.py where it belongs)"
    )
    module = importlib.import_module(STAGES[stage][0])
    cfg = load_config(module.Config, str(path))  # raises ConfigError naming an unknown key or a badly typed value
    if stage != "all":
        return
    # the pipeline's per-stage sections: each is a set of that stage's Config fields (shards: prepare()'s kwargs)
    from dataset.shard_writer import prepare

    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not isinstance(section, dict) or not section:
            continue
        if f.name == "shards":
            unknown = set(section) - set(inspect.signature(prepare).parameters)
            assert not unknown, f"{path.name} shards: {sorted(unknown)} are not arguments of prepare()"
        else:
            load_config(importlib.import_module(STAGES[f.name][0]).Config, None, section)


def read_timings(out: Path) -> dict:
    rows = [line.split("\t") for line in (out / "timings.tsv").read_text().splitlines()[1:]]
    return {name: status for name, _, status in rows}


@pytest.mark.skipif(os.environ.get("RUN_RECIPE") != "1", reason="end-to-end recipe run: set RUN_RECIPE=1")
def test_recipe_quick_end_to_end(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data pack not found at {SHARED_DATA}")
    out = tmp_path / "recipe"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "DATA": str(SHARED_DATA), "FORCE": "0"}
    subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, check=True, timeout=3600)
    timings = read_timings(out)
    assert list(timings) == list(RECIPE_STAGES)
    assert all(status == "done" for name, status in timings.items() if name != "plot")
    results = json.loads((out / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert results  # the three models' report
    assert (out / "eval" / "generations.md").is_file()
    llama = json.loads((out / "export" / "llama" / "config.json").read_text())
    assert llama["architectures"] == ["LlamaForCausalLM"]
    meta = json.loads((out / "shards" / "meta.json").read_text())
    assert len(meta["sources"]) == 2  # zh and en, mixed
    # a second run finds every stage complete and skips it
    subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, check=True, timeout=600)
    again = read_timings(out)
    assert all(status == "skipped" for name, status in again.items() if name != "plot"), again  # plot: no matplotlib
