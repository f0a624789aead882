"""
The errors main.py reports as a usage mistake (exit code 2, the message, no traceback), and the writers' handling of a
full disk. A module of its own, free of torch, so that the scripts (prepare_shards, the exports) use it without
loading the training code; trainer/config.py re-exports ConfigError and MissingPathError.
"""

import os
import shutil
from contextlib import contextmanager


class ConfigError(ValueError):
    """A bad config key or value; main.py prints it without a traceback."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A config path that must exist and does not (still a FileNotFoundError for code that catches that)."""


class OutputError(ConfigError):
    """An output that could not be written (the disk is full, a quota, no permission): main.py and the scripts
    print it like a config error, without a traceback. The message names the path and says what was left."""


# errno values that mean the disk (not the program) refused a write: full, over quota, file too large for a limit
DISK_FULL_ERRNOS = (28, 122, 27)  # ENOSPC, EDQUOT (Linux), EFBIG


def is_disk_full(e: BaseException) -> bool:
    """An OSError with a disk errno, or the plain Exception the Rust writers (tokenizers, safetensors) raise for
    one, which carries only its text."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    text = str(e)
    return any(f"os error {n})" in text for n in DISK_FULL_ERRNOS) or "No space left on device" in text


@contextmanager
def whole_output(path: str, what: str):
    """Around code that writes `path` (a file, or a folder it creates): on a full disk, what it left there is
    removed (a cut export must not look like one) and OutputError names the path."""
    existed = os.path.exists(path)
    try:
        yield
    except Exception as e:  # the Rust writers raise plain Exceptions
        # numpy's tofile reports a short write with no errno ("N requested and M written"): the disk says it
        full = is_disk_full(e) or (isinstance(e, OSError) and e.errno is None and _free_bytes(path) < 1 << 16)
        if not full:
            raise
        if not is_disk_full(e):
            e = f"{e}: No space left on device"
        if not existed and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif not existed:
            _remove(path)
        left = "the old one is left as it was" if existed else "nothing is left there"
        raise OutputError(f"could not write {what} {path} ({e}); {left}: free some space and rerun") from None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _free_bytes(path: str) -> int:
    """Free bytes on the file system that holds path (or its nearest existing parent)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free
