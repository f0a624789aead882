"""
One run per out_dir (trainer/run_lock.py): a second run into a folder in use stops at once naming the first; a
lock left by a SIGKILLed run is stale and taken over; the lock goes away when a run ends, however it ends.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import main_py_command, make_pretrain_cfg, pretrain_args
from trainer.core import run_trainer
from trainer.pretrain import Config, PretrainTrainer
from trainer.run_lock import LOCK_FILE, RunLockedError, acquire, out_dir_lock, pid_alive, release

ROOT = Path(__file__).resolve().parents[1]


def test_pid_alive_tells_a_running_process_from_an_ended_one():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now (pids are not reused this fast)
    assert pid_alive(os.getpid()) and not pid_alive(child.pid) and not pid_alive(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux only")
def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(500):  # bounded: until it has exited (not reaped yet: a zombie)
        with open(f"/proc/{child.pid}/stat", encoding="utf-8") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    child.wait()


class FakeKernel32:
    """The kernel32 calls pid_alive makes on Windows, answering from a table pid -> exit code (259, STILL_ACTIVE, for
    a running process; another code for one that ended while a handle keeps its process object) or "denied" (another
    user's: ERROR_ACCESS_DENIED); a pid not in the table names no process (ERROR_INVALID_PARAMETER)."""

    def __init__(self, processes: dict):
        self.processes, self.handles, self.last_error, self.opened = processes, {}, 0, []

    def OpenProcess(self, access, inherit, pid):
        self.opened.append((access, inherit, pid))
        state = self.processes.get(pid)
        if state is None or state == "denied":
            self.last_error = 87 if state is None else 5
            return 0
        handle = 4 * len(self.opened)  # like Windows: a small nonzero int
        self.handles[handle] = state
        return handle

    def GetLastError(self):
        return self.last_error

    def GetExitCodeProcess(self, handle, code):
        code._obj.value = self.handles[handle]  # code is ctypes.byref(c_ulong): write through it, as Windows does
        return 1

    def CloseHandle(self, handle):
        del self.handles[handle]
        return 1


def test_pid_alive_on_windows_asks_kernel32(monkeypatch):
    """The Windows branch, run here on a faked kernel32: os.kill(pid, 0) would terminate a Windows process, so it
    must not be called; alive is an open handle whose exit code is STILL_ACTIVE, or an access-denied open."""
    import ctypes
    import types

    import trainer.run_lock

    def kill(pid, sig):
        raise AssertionError("os.kill on Windows terminates the process")

    kernel32 = FakeKernel32({101: 259, 102: 0, 103: 1, 104: "denied"})
    monkeypatch.setattr(trainer.run_lock, "sys", types.SimpleNamespace(platform="win32"))
    monkeypatch.setattr(ctypes, "windll", types.SimpleNamespace(kernel32=kernel32), raising=False)
    monkeypatch.setattr(os, "kill", kill)
    assert pid_alive(101)  # running
    assert not pid_alive(102) and not pid_alive(103)  # ended (exit code 0, 1), its process object still held
    assert pid_alive(104)  # another user's: it exists
    assert not pid_alive(105)  # no such process
    assert not pid_alive(0) and not pid_alive(-1)  # never asked
    assert [pid for _, _, pid in kernel32.opened] == [101, 102, 103, 104, 105]
    assert all(access == 0x1000 and not inherit for access, inherit, _ in kernel32.opened)  # QUERY_LIMITED_INFORMATION
    assert kernel32.handles == {}  # every handle it opened is closed


def test_the_lock_is_released_when_the_block_raises_and_a_live_owner_blocks(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyError):
        with out_dir_lock(str(out), stage="sft"):
            assert (out / LOCK_FILE).exists()
            raise KeyError("a run that fails")
    assert not out.exists()  # nothing was written: the folder the lock created goes too
    # A live owner (here: this very process, seen from another "run") blocks, naming its pid and command.
    path = acquire(str(out), stage="sft")
    with pytest.raises(RunLockedError, match=f"is in use by another run \\(pid {os.getpid()} on "):
        acquire(str(out), stage="dpo")
    release(path)
    assert not Path(path).exists()


def test_a_lock_from_an_ended_or_torn_run_is_stale(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    owner = {"pid": child.pid, "host": os.uname().nodename, "started": time.time(), "command": "main.py x"}
    (out / LOCK_FILE).write_text(json.dumps(owner))
    release(acquire(str(out), stage="sft"))
    assert "taking over the stale lock" in capsys.readouterr().out
    # A lock torn by a crash between its create and its write (empty) is stale once a few seconds old.
    (out / LOCK_FILE).write_text("")
    with pytest.raises(RunLockedError):
        acquire(str(out), stage="sft")  # fresh: its run may be writing it right now
    os.utime(out / LOCK_FILE, (time.time() - 60, time.time() - 60))
    release(acquire(str(out), stage="sft"))
    # Another host's lock cannot be checked from here: it blocks, and the message says how to remove it.
    (out / LOCK_FILE).write_text(json.dumps({**owner, "host": "elsewhere"}))
    with pytest.raises(RunLockedError, match="on elsewhere.*delete .*\\.run\\.lock"):
        acquire(str(out), stage="sft")


def tiny_cfg(tokenizer_dir, shards, out_dir, **overrides) -> Config:
    """The helpers' tiny pretraining, cut to 2 steps without evaluation or checkpoints: only the lock matters here."""
    short = dict(max_steps=2, batch_size=2, global_batch_size=2, eval_every=0, eval_batches=1, save_every=0)
    return make_pretrain_cfg(tokenizer_dir, shards, out_dir, **{**short, **overrides})


@pytest.mark.slow  # a main.py process beside two in-process runs
def test_a_second_run_stops_naming_the_first_and_a_sigkilled_ones_lock_is_taken_over(
    tiny_tokenizer_dir, shards, tmp_path, capsys
):
    """Two runs trained into one out_dir at once (duplicated metrics.jsonl records, both writing step_* and
    final/). Now the second stops before it builds anything, naming the first's pid; after the first is SIGKILLed
    (no cleanup) its lock is stale and a new run takes it over, then releases it at its end."""
    out = tmp_path / "run"
    command, env = main_py_command(out, ["--stage", "pretrain", *pretrain_args(tiny_tokenizer_dir, shards)])
    command = [*command, "max_steps=100000"]  # runs until killed
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # training: the lock is held
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        owner = json.loads((out / LOCK_FILE).read_text())
        assert owner["pid"] == first.pid and "main.py" in owner["command"]
        with pytest.raises(RunLockedError, match=f"'{out}' is in use by another run \\(pid {first.pid} on .*main.py"):
            run_trainer(PretrainTrainer, tiny_cfg(tiny_tokenizer_dir, shards, out))
        assert first.poll() is None  # the first run was not disturbed
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (out / LOCK_FILE).exists()  # SIGKILL: nobody removed it
    trainer = run_trainer(PretrainTrainer, tiny_cfg(tiny_tokenizer_dir, shards, out, resume="never"))
    assert trainer.step == 2 and f"stale lock of a run that ended without releasing it (pid {first.pid}" in (
        capsys.readouterr().out
    )
    assert not (out / LOCK_FILE).exists() and (out / "final").is_dir()


@pytest.mark.slow  # main.py in a fresh interpreter
def test_main_py_reports_a_locked_out_dir_as_a_usage_error(tiny_tokenizer_dir, shards, tmp_path):
    out = tmp_path / "run"
    path = acquire(str(out), stage="pretrain")  # this test process is the live owner
    try:
        command, env = main_py_command(out, ["--stage", "pretrain", *pretrain_args(tiny_tokenizer_dir, shards)])
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        release(path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: out_dir '{out}' is in use by another run (pid {os.getpid()}" in done.stderr
    assert not (out / "metrics.jsonl").exists()


def test_the_tokenizer_stage_takes_the_lock_too(tmp_path):
    from trainer.train_tokenizer import Config, run

    corpus = tmp_path / "a.txt"
    corpus.write_text("你好世界。" * 50, encoding="utf-8")
    out = tmp_path / "tok"
    path = acquire(str(out), stage="sft")
    try:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            run(Config(data_path=str(corpus), out_dir=str(out), vocab_size=300, min_frequency=1))
    finally:
        release(path)
    assert not (out / "tokenizer.json").exists()
