"""The test suite's own settings (pytest.ini): a run leaves nothing in the system temp folder (issue 27.6: every
full run left 1.6 GB there, kept for the last three runs); every run lists the quick tests over the quick lane's
per-test limit (tests/quick_lane.py, issue 23 point 6)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _run_inner(tmp_path, body: str, *args: str):
    test = tmp_path / "inner" / "test_inner.py"
    test.parent.mkdir()
    test.write_text(body, encoding="utf-8")
    root = tmp_path / "temproot"
    root.mkdir()
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root), "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(ROOT / "pytest.ini"),
        "--rootdir",
        str(test.parent),
        str(test),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    return proc, [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow  # a pytest in a fresh interpreter
def test_a_passing_run_leaves_no_files_in_the_temp_folder(tmp_path):
    body = (
        "import pytest\n\n@pytest.fixture(scope='session')\ndef shared(tmp_path_factory):\n"
        "    path = tmp_path_factory.mktemp('shared') / 'weights.bin'\n    path.write_bytes(b'0' * 1000)\n"
        "    return path\n\ndef test_writes(tmp_path, shared):\n    (tmp_path / 'ckpt.bin').write_bytes(b'1' * 1000)\n"
    )
    proc, left = _run_inner(tmp_path, body)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert left == []


@pytest.mark.slow  # a pytest in a fresh interpreter
def test_a_failing_test_keeps_its_folder(tmp_path):
    body = "def test_fails(tmp_path):\n    (tmp_path / 'evidence.txt').write_text('x')\n    assert False\n"
    proc, left = _run_inner(tmp_path, body)
    assert proc.returncode == 1 and [p.name for p in left] == ["evidence.txt"]


@pytest.mark.slow  # a pytest in a fresh interpreter
def test_the_quick_tests_over_the_limit_are_listed_and_the_slow_ones_are_not(tmp_path):
    body = (
        "import time\n\nimport pytest\n\ndef test_quick_but_sleepy():\n    time.sleep(0.3)\n\n"
        "def test_quick():\n    pass\n\n@pytest.mark.slow\ndef test_slow():\n    time.sleep(0.3)\n"
    )
    proc, _ = _run_inner(tmp_path, body, "-p", "tests.quick_lane", "-o", "quick_test_limit_s=0.2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.split("quick tests (not slow) over 0.2 s: 1 ")[1]
    listed = [line.split()[-1] for line in summary.splitlines() if "::" in line]
    assert listed == ["test_inner.py::test_quick_but_sleepy"]
    assert "2 quick tests: " in summary


@pytest.mark.slow  # two fresh interpreters and a 3 s timeout: the quick lane listed it over 3 s
def test_a_timed_out_run_kills_the_workers_in_their_own_sessions_too():
    """run_main_py's timeout (a hung collective) must end with a failure, not a hang: torchrun's workers run in
    sessions of their own and hold the output pipes, so killing torchrun's process group alone left communicate()
    waiting for them forever."""
    from tests.helpers import processes_tagged, run_killing_all_on_timeout

    # A "launcher" that starts a "worker" in a new session (as torchrun does) and both then wait forever.
    worker = "import time; time.sleep(600)"
    launcher = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True)\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ}
    with pytest.raises(AssertionError, match="did not finish in 3 s"):
        run_killing_all_on_timeout([sys.executable, "-c", launcher], env, timeout=3)
    # Nothing of that run is left (its tag is the only one this process made just now).
    leftovers = [pid for pid in os.listdir("/proc") if pid.isdigit() and _tagged_by_this_test(int(pid))]
    assert leftovers == []
    assert processes_tagged("no-such-tag") == []


def _tagged_by_this_test(pid: int) -> bool:
    """Whether a live process carries a MILLI_TEST_RUN tag made by this pytest process (zombies are gone already:
    they have no environment to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"MILLI_TEST_RUN={os.getpid()}-".encode() in f.read()
    except OSError:
        return False
