"""Run a third-party package (lm-eval, TRL, datasets) in a fresh process, from its own install folder.

Such packages pull dependencies (datasets, pandas, pyarrow) the project does not need, so CI installs them beside
the environment, not into it: `pip install --no-deps --target $MILLI_THIRDPARTY/<name> <the missing packages>`
(.ci/run). A test that needs one skips when it is neither importable nor installed there."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRDPARTY = os.environ.get("MILLI_THIRDPARTY", "/opt/thirdparty")
# `datasets` has no folder of its own: TRL's (.ci/thirdparty_trl.txt) holds it and all it needs, at no extra install.
DATASETS_FOLDER = "trl"


def require_thirdparty(name: str, module: str) -> str:
    """The folder to put on PYTHONPATH for `module` ("" when this environment imports it); skips the test when the
    package is in neither place. Call it first, so a skipped test does no work."""
    if importlib.util.find_spec(module) is not None:
        return ""
    folder = os.path.join(THIRDPARTY, name)
    if not os.path.isdir(os.path.join(folder, module)):
        pytest.skip(f"{module} is not installed (pip install --no-deps --target {folder} ...; see .ci/run)")
    return folder


def thirdparty_env(name: str, module: str, tmp_path) -> dict:
    """Environment for a subprocess that imports `module`: its folder (if not importable here) and the repo root
    on PYTHONPATH, every hub offline, caches under tmp_path."""
    folder = require_thirdparty(name, module)
    paths = [folder, str(ROOT)] if folder else [str(ROOT)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    return env


def run_thirdparty(name: str, module: str, script: str, args: list[str], tmp_path, timeout: int = 600) -> dict:
    """Run tests/<script> with `args` in a fresh process; it writes its JSON answer to the path given last."""
    out = tmp_path / f"{Path(script).stem}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script), *args, str(out)],
        cwd=ROOT,
        env=thirdparty_env(name, module, tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text(encoding="utf-8"))
