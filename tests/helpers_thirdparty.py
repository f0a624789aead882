"""Run a third-party package (lm-eval, TRL, datasets) in a fresh process, from its own install folder.

Such packages pull dependencies (datasets, pandas, pyarrow) the project does not need, so CI installs them beside
the environment, not into it: `pip install --no-deps --target $MILLI_THIRDPARTY/<name> <the missing packages>`
(.ci/run). A test that needs one skips when it is neither importable nor installed there."""

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRDPARTY = os.environ.get("MILLI_THIRDPARTY", "/opt/thirdparty")
# `datasets` has no folder of its own: TRL's (.ci/thirdparty_trl.txt) holds it and all it needs, at no extra install.
DATASETS_FOLDER = "trl"


# What a fresh CI machine has (.ci/run): torch, requirements.txt, requirements-dev.txt and what they require, and in
# each third-party folder exactly the packages its .ci/thirdparty_<name>.txt lists (installed with --no-deps).
DECLARED_REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")
# The folder and the modules its tests import from it: tests/test_thirdparty_imports.py imports each.
THIRDPARTY_MODULES = {
    "lm_eval": ["lm_eval", "lm_eval.evaluator", "lm_eval.tasks", "lm_eval.models.huggingface"],
    "trl": ["trl", "trl.trainer.dpo_trainer", "datasets"],
    "tensorboard": ["tensorboard", "tensorboard.backend.event_processing.event_accumulator"],
    "swanlab": ["swanlab", "swanlab.proto.swanlab.record.v1.record_pb2", "swanlab.sdk.internal.core_python.store"],
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def _top_level_modules(dist: importlib.metadata.Distribution) -> set[str]:
    """The importable top-level names a distribution installs: its RECORD's first path parts (and top_level.txt)."""
    names = {n.split("/")[0] for n in (dist.read_text("top_level.txt") or "").split()}
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".egg-info", ".data", ".pth")):
            continue
        if len(file.parts) == 1:  # a single-file module: six.py, _cffi_backend.cpython-311-x86_64-linux-gnu.so
            first = first.split(".")[0]
        elif "." in first:  # numpy.libs, scikit_learn.libs: shared libraries, not modules
            continue
        names.add(first)
    return {n for n in names if n.isidentifier()}


@cache
def _installed() -> dict[str, importlib.metadata.Distribution]:
    return {_canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions() if d.metadata["Name"]}


def declared_distributions() -> set[str]:
    """torch + requirements.txt + requirements-dev.txt, walked through each installed distribution's requirements
    (markers evaluated, extras followed): what `pip install -r` gives a fresh machine."""
    from packaging.requirements import Requirement

    installed = _installed()
    todo = [Requirement("torch")]
    for name in DECLARED_REQUIREMENTS:
        todo += [Requirement(line) for line in _requirement_lines(ROOT / name)]
    seen: set[tuple[str, str]] = set()
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        for extra in req.extras | {""}:
            if (name, extra) in seen or name not in installed:
                continue
            seen.add((name, extra))
            for line in installed[name].requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return {name for name, _ in seen}


def undeclared_modules(name: str, folder: str) -> list[str]:
    """Top-level modules installed on this machine that a fresh CI machine would not have beside folder `name`:
    modules of distributions that neither the declared requirements nor .ci/thirdparty_<name>.txt bring, and that
    are neither in the standard library, the project, nor the folder itself."""
    from packaging.requirements import Requirement

    installed = _installed()
    listed = {_canonical(Requirement(line).name) for line in _requirement_lines(ROOT / f".ci/thirdparty_{name}.txt")}
    allowed_dists = declared_distributions() | listed
    allowed = set(sys.stdlib_module_names) | {p.name.split(".")[0] for p in ROOT.iterdir()}
    allowed |= {p.name.split(".")[0] for p in Path(folder).iterdir()} if folder else set()
    for dist_name in allowed_dists & installed.keys():
        allowed |= _top_level_modules(installed[dist_name])
    found = set()
    for dist_name, dist in installed.items():
        if dist_name not in allowed_dists:
            found |= _top_level_modules(dist)
    return sorted(found - allowed)


def declared_site_packages(name: str, folder: str, out: Path) -> str:
    """A folder of links to this machine's site-packages entries minus the undeclared modules and their
    distributions' metadata: with `python -S` and it on PYTHONPATH, a process sees what a fresh CI machine has."""
    import site

    from packaging.requirements import Requirement

    blocked = set(undeclared_modules(name, folder))
    listed = {_canonical(Requirement(line).name) for line in _requirement_lines(ROOT / f".ci/thirdparty_{name}.txt")}
    allowed_dists = declared_distributions() | listed
    out.mkdir(parents=True, exist_ok=True)
    for packages in site.getsitepackages():
        for entry in sorted(Path(packages).iterdir()) if os.path.isdir(packages) else []:
            if entry.name.endswith((".dist-info", ".egg-info")):
                keep = _canonical(entry.name.split("-")[0]) in allowed_dists
            else:
                keep = entry.name.split(".")[0] not in blocked and entry.suffix != ".pth"
            if keep and not (out / entry.name).exists():
                (out / entry.name).symlink_to(entry)
    return str(out)


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
    on PYTHONPATH, every hub offline, caches under tmp_path. With the folder, site-packages is seen through
    declared_site_packages (run the process with `python -S`): a package the folder needs but CI would not install
    fails here too."""
    folder = require_thirdparty(name, module)
    paths = [folder, str(ROOT), declared_site_packages(name, folder, tmp_path / "site")] if folder else [str(ROOT)]
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
    env = thirdparty_env(name, module, tmp_path)
    isolated = ["-S"] if env["PYTHONPATH"] != str(ROOT) else []
    proc = subprocess.run(
        [sys.executable, *isolated, str(ROOT / "tests" / script), *args, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text(encoding="utf-8"))
