"""
Hosted loggers (wandb, swanlab) are checked before training starts: a missing package or a missing key in a
non-interactive run is a clear error that names the offline mode, instead of a crash inside wandb.init.

    python -m pytest tests/test_loggers.py
"""

import importlib.util

import pytest

from trainer.common import logger_setup_problem


@pytest.fixture
def installed(monkeypatch):
    """Pretend wandb and swanlab are installed (they are not test dependencies)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name in ("wandb", "swanlab") else real(name, *a)
    )


@pytest.mark.parametrize(
    "kind,key,mode", [("wandb", "WANDB_API_KEY", "WANDB_MODE"), ("swanlab", "SWANLAB_API_KEY", "SWANLAB_MODE")]
)
def test_no_key_is_an_error_that_names_the_offline_mode(installed, tmp_path, kind, key, mode):
    problem = logger_setup_problem(kind, {}, str(tmp_path))
    assert problem and f"{mode}=offline" in problem and key in problem and "tensorboard" in problem
    assert logger_setup_problem(kind, {key: "secret"}, str(tmp_path)) is None
    assert logger_setup_problem(kind, {mode: "offline"}, str(tmp_path)) is None
    assert logger_setup_problem(kind, {mode: "online"}, str(tmp_path)) is not None


def test_a_login_in_netrc_counts(installed, tmp_path):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert logger_setup_problem("wandb", {}, str(tmp_path)) is None
    (tmp_path / ".swanlab").mkdir()
    (tmp_path / ".swanlab" / ".netrc").write_text("machine swanlab.cn login u password p\n")
    assert logger_setup_problem("swanlab", {}, str(tmp_path)) is None


def test_missing_package_and_local_loggers(tmp_path):
    if importlib.util.find_spec("wandb") is None:
        assert "pip install wandb" in logger_setup_problem("wandb", {"WANDB_API_KEY": "k"}, str(tmp_path))
    assert logger_setup_problem("tensorboard", {}, str(tmp_path)) is None
    assert logger_setup_problem("none", {}, str(tmp_path)) is None
