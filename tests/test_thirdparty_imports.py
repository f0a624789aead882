"""Each third-party folder imports with only what CI installs (issue 26).

CI installs the lm-eval and TRL cross-checks with `pip install --no-deps --target <folder> -r .ci/thirdparty_<name>.txt`
(.ci/run), so a package one of them imports but that file does not list is missing on a fresh machine, while a
developer's machine often has it anyway (colorama came with awscli here). These tests import each folder's modules
in a fresh process (`python -S`) that sees only the folder and a view of site-packages without the modules installed
here but not declared (requirements*.txt walked through their requirements, torch, the folder's own list), so such a
gap fails here as it would in CI."""

import os
import subprocess
import sys

import pytest

from tests.helpers_thirdparty import ROOT, THIRDPARTY, THIRDPARTY_MODULES, declared_site_packages

IMPORT_EACH = "import importlib, sys\nfor module in sys.argv[1:]:\n    importlib.import_module(module)"


def _declared_only(name: str, folder: str, modules: list[str], tmp_path) -> subprocess.CompletedProcess:
    site = declared_site_packages(name, folder, tmp_path / "site")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([folder, str(ROOT), site]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-S", "-c", IMPORT_EACH, *modules],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(THIRDPARTY_MODULES))
def test_thirdparty_folder_imports_with_only_its_declared_packages(name, tmp_path):
    folder = os.path.join(THIRDPARTY, name)
    if not os.path.isdir(folder):
        # .ci/run always installs the folders: under CI a missing one is a failure, elsewhere the cross-checks skip.
        assert os.environ.get("CI", "").lower() not in ("1", "true"), f"{folder} is missing under CI (see .ci/run)"
        pytest.skip(f"{folder} is not installed (see .ci/run)")
    proc = _declared_only(name, folder, THIRDPARTY_MODULES[name], tmp_path)
    assert proc.returncode == 0, (
        f"{folder} does not import with only .ci/thirdparty_{name}.txt and the requirements: add the missing "
        f"package to .ci/thirdparty_{name}.txt\n" + proc.stderr[-3000:]
    )


@pytest.mark.slow
def test_an_undeclared_module_does_not_import(tmp_path):
    """The view itself: colorama (installed here through awscli) is not declared for TRL's folder, so it does not
    import there, while numpy (a requirement) does."""
    pytest.importorskip("colorama")
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    assert _declared_only("trl", str(folder), ["numpy", "yaml"], tmp_path).returncode == 0
    blocked = _declared_only("trl", str(folder), ["colorama"], tmp_path)
    assert blocked.returncode != 0 and "No module named 'colorama'" in blocked.stderr


def test_declared_environment_walks_requirements():
    """transformers requires huggingface-hub and tokenizers: both count as declared; awscli does not."""
    from tests.helpers_thirdparty import declared_distributions

    declared = declared_distributions()
    assert {"torch", "transformers", "huggingface-hub", "pyyaml"} <= declared
    assert "awscli" not in declared
