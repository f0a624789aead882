"""
The quick lane's budget (issue 23 point 6: `pytest -m "not slow"` in under 60 s on two idle cores), as a pytest
plugin that tests/conftest.py loads. Every run ends with the quick tests (not marked slow) that took longer than
quick_test_limit_s (pytest.ini's default 3; setup, call and teardown together), so CI's log shows a test that grew
slow without a timing assertion that would fail on a busy machine. The CPU time beside the wall time tells a test
that computes from one that waits (a timeout, a sleep, a busy machine); a child process counts once waited for.
"""

import os
import time

import pytest

_quick_tests: dict[str, tuple[float, float]] = {}  # nodeid -> (wall s, CPU s)


def pytest_addoption(parser):
    parser.addini(
        "quick_test_limit_s", "list the quick tests (not marked slow) slower than this (seconds)", default="3"
    )


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, cpu = time.perf_counter(), cpu_seconds()
    try:
        return (yield)
    finally:
        if item.get_closest_marker("slow") is None:
            _quick_tests[item.nodeid] = (time.perf_counter() - wall, cpu_seconds() - cpu)


def pytest_terminal_summary(terminalreporter, config):
    if not _quick_tests:
        return
    limit = float(config.getini("quick_test_limit_s"))
    over = sorted(((w, c, nodeid) for nodeid, (w, c) in _quick_tests.items() if w > limit), reverse=True)
    terminalreporter.write_sep("=", f"quick tests (not slow) over {limit:g} s: {len(over)}")
    for w, c, nodeid in over:
        terminalreporter.write_line(f"{w:6.2f}s wall {c:6.2f}s CPU  {nodeid}")
    wall, cpu = (sum(t[i] for t in _quick_tests.values()) for i in (0, 1))
    terminalreporter.write_line(
        f"{len(_quick_tests)} quick tests: {wall:.1f}s wall, {cpu:.1f}s CPU (collection not counted)"
    )
