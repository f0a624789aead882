"""
One run per out_dir: a lock file taken when a stage starts writing there and removed when it ends, so a second run
into the same folder stops at once, naming the first, instead of both writing step_*/, final/ and metrics.jsonl.

    with out_dir_lock(cfg.out_dir, stage="sft"):
        ...  # train

The lock is `out_dir/.run.lock`, created with O_EXCL (atomic on POSIX and Windows, no fcntl), holding the owner's
pid, host name, start time and command line. A run killed with SIGKILL cannot remove it; the next run finds it
stale (same host, that pid no longer running) and takes it over with a note. A lock from another host (a shared
file system) cannot be checked from here: it stops the run, and the message says how to remove it. A module of its
own, free of torch, so the tokenizer stage takes the same lock.
"""

import json
import os
import socket
import sys
import time
from contextlib import contextmanager

from trainer.config import ConfigError

LOCK_FILE = ".run.lock"


class RunLockedError(ConfigError):
    """Another run holds out_dir (main.py prints it like a config error: exit code 2, no traceback)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine. Windows has no signal 0 (os.kill would terminate
    the process): OpenProcess + GetExitCodeProcess there."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes  # Windows only: kernel32 exists nowhere else

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists, owned by someone else
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    try:  # Linux: a killed process nobody reaped (a container's PID 1 often does not) is a zombie, not a run
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_owner(path: str) -> dict | None:
    """The lock's owner, {} for a lock whose content is unreadable (torn by a crash mid-write), None if gone."""
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {when}: {owner.get('command', '?')}"


def _is_stale(owner: dict, path: str) -> bool:
    if not owner:  # torn: written by a run killed between create and write; stale once it is a few seconds old
        try:
            return time.time() - os.path.getmtime(path) > 5.0
        except OSError:
            return True
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def acquire(out_dir: str, *, stage: str) -> str:
    """Take out_dir's lock (creating out_dir); returns the lock's path. RunLockedError when a live run holds it."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    for _ in range(3):  # a stale lock is removed and the create retried; a racing run may take it first
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            remove_stale_lock(path, out_dir, stage=stage)
            continue
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "stage": stage,
            "command": " ".join(sys.argv) or "python",
        }
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(owner, f)
        return path
    raise RunLockedError(f"out_dir '{out_dir}': could not take {path} (another run is starting there)")


def remove_stale_lock(path: str, out_dir: str, *, stage: str) -> None:
    """The lock another run left: removed, with a note, when that run is gone (stale); RunLockedError naming it
    while it runs."""
    owner = _read_owner(path)
    if owner is None:
        return  # released meanwhile
    if not _is_stale(owner, path):
        raise RunLockedError(
            f"out_dir '{out_dir}' is in use by another run ({_describe(owner)}). Wait for it to end, or "
            f"choose another out_dir; if that run is gone (e.g. on another machine), delete {path}"
        ) from None
    print(
        f"[{stage}] note: taking over the stale lock of a run that ended without releasing it ({_describe(owner)})",
        flush=True,  # torchrun's workers may end without flushing stdout
    )
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def release(path: str) -> None:
    """Remove the lock if it is still ours (a run that took over a stale one must not lose its own)."""
    owner = _read_owner(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@contextmanager
def out_dir_lock(out_dir: str, *, stage: str, enabled: bool = True):
    """Hold out_dir's lock for the with block (enabled=False, e.g. on ranks other than 0: nothing)."""
    existed = os.path.isdir(out_dir)
    path = acquire(out_dir, stage=stage) if enabled else None
    try:
        yield path
    finally:
        if path:
            release(path)
            if not existed and not os.listdir(out_dir):  # a run that failed before writing anything leaves nothing
                os.rmdir(out_dir)
