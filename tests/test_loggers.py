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


def sft_run_logged_to(kind: str, pretrained_dir: str, tmp_path, env_extra: dict | None = None):
    """A 4-step SFT run through main.py with logger=<kind>, in a fresh process with <kind> from its own folder (as CI
    installs it); returns its out_dir."""
    import subprocess

    from tests.helpers import ROOT, main_py_command, write_chat_file
    from tests.helpers_thirdparty import thirdparty_env

    env = {**thirdparty_env(kind, kind, tmp_path), **(env_extra or {})}  # skips when the package is nowhere
    data = write_chat_file(tmp_path / "chat.jsonl", n_copies=4)
    out = tmp_path / "sft"
    args = ["--stage", "sft", f"init_from={pretrained_dir}", f"data_path={data}", "placeholders=name=Milli"]
    args += ["seq_len=64", "batch_size=4", "global_batch_size=4", "max_steps=4", "val_samples=4", "eval_every=2"]
    args += ["eval_batches=1", "log_every=1", "device=cpu", f"logger={kind}"]
    command, _ = main_py_command(out, args)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_losses(out, scalars: dict) -> None:
    """Every train and eval loss of metrics.jsonl is in the logger's record under <split>/loss, at its step."""
    from tests.helpers import read_metrics

    for split in ("train", "eval"):
        rows = read_metrics(str(out), split)
        assert rows, split
        for name in ("loss",):
            want = [[r["step"], r[name]] for r in rows]
            got = scalars[f"{split}/{name}"]
            assert [s for s, _ in got] == [s for s, _ in want], (split, got, want)
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert len(scalars) > 4  # lr, grad norm, throughput... not only the losses


@pytest.mark.slow
def test_tensorboard_reads_the_runs_event_files(pretrained_dir, tmp_path):
    """logger=tensorboard: tensorboard's own EventAccumulator reads the run folder's event files."""
    from tests.helpers_thirdparty import run_thirdparty

    out = sft_run_logged_to("tensorboard", pretrained_dir, tmp_path)
    scalars = run_thirdparty("tensorboard", "tensorboard", "run_tensorboard_read.py", [str(out)], tmp_path)["scalars"]
    assert_same_losses(out, scalars)


@pytest.mark.slow
def test_swanlab_offline_run_holds_the_runs_metrics(pretrained_dir, tmp_path):
    """logger=swanlab with SWANLAB_MODE=offline (no key, no network): the run is stored in the run's own folder, and
    swanlab's record reader (what `swanlab sync` uploads) finds every loss, as wandb's offline mode keeps them."""
    from tests.helpers_thirdparty import run_thirdparty

    home = {"HOME": str(tmp_path / "home"), "SWANLAB_SAVE_DIR": str(tmp_path / "home" / ".swanlab")}
    out = sft_run_logged_to("swanlab", pretrained_dir, tmp_path, {"SWANLAB_MODE": "offline", **home})
    read = run_thirdparty("swanlab", "swanlab", "run_swanlab_read.py", [str(out)], tmp_path)
    assert read["runs"] == 1  # under out_dir, not in a swanlog/ folder of the working directory
    assert_same_losses(out, read["scalars"])
