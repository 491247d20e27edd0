"""Fixtures shared by the tests: in-process nodes, a DICOM SCP, a refusing port; and a
private bytecode cache for the ``syncnode`` processes the tests start."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncnode.local import LocalNode
from syncnode.node import RunningNode

StartNode = Callable[..., Awaitable[RunningNode]]
_PYC_KEY = pytest.StashKey[tuple[dict[str, str | None], str]]()


def pytest_configure(config: pytest.Config) -> None:
    """The tests start the ``syncnode`` CLI and ``syncnode run`` many hundreds of times.
    Where ``PYTHONDONTWRITEBYTECODE`` is set (no bytecode written beside the sources),
    every one of those processes compiled all of syncnode again (~0.1 s of CPU each):
    here they share a bytecode cache in a private temporary folder instead, removed at
    the end of the run. Nothing is written beside the sources either way."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    saved = {k: os.environ.get(k) for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    cache = tempfile.mkdtemp(prefix="syncnode-tests-pyc-")
    config.stash[_PYC_KEY] = (saved, cache)
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PYC_KEY not in config.stash:
        return
    saved, cache = config.stash[_PYC_KEY]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else gets it), never
    listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
async def running() -> AsyncIterator[StartNode]:
    """Start in-process nodes (``await running(node, **settings)``); every one is stopped
    at the end of the test."""
    from syncsupport import start_node

    started: list[RunningNode] = []

    async def start(node: LocalNode, **kw: Any) -> RunningNode:
        r = await start_node(node, **kw)
        started.append(r)
        return r

    yield start
    for r in reversed(started):
        await r.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalNode]:
    """One fresh node in the test's folder, closed at the end (test files may define
    their own ``node``)."""
    n = LocalNode.init(tmp_path / "node")
    yield n
    n.close()


@pytest.fixture
def scp(node: LocalNode) -> Iterator[Any]:
    """The node's DICOM SCP on a free loopback port (AE title SYNCNODE), stopped at the end."""
    from syncnode.dicom.scp import DicomServer

    server = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def new_node(tmp_path: Path) -> Iterator[Callable[[str], LocalNode]]:
    """Initialise nodes in the test's folder (``new_node("a")``); closed at the end."""
    opened: list[LocalNode] = []

    def make(name: str) -> LocalNode:
        node = LocalNode.init(tmp_path / name)
        opened.append(node)
        return node

    yield make
    for n in opened:
        n.close()


# -- a failed test's report ends with the tails of the node logs it wrote ------------------
_LOGS_BEFORE = pytest.StashKey[int]()


def _support() -> Any:
    """tests/syncsupport.py if a test imported it (no node process was started otherwise);
    not imported here, so a run that needs no nodes does not pay for its imports."""
    return sys.modules.get("syncsupport")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    support = _support()
    item.stash[_LOGS_BEFORE] = len(support.NODE_LOGS) if support else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    support = _support()
    if report.failed and support is not None:
        tails = support.log_tails(support.NODE_LOGS[item.stash.get(_LOGS_BEFORE, 0):])
        if tails:
            report.sections.append(("node logs", tails))


# -- the fault matrix's counts, shown in the terminal summary (also under -q) -------------
_FAULT_MATRIX = pytest.StashKey[list[str]]()


@pytest.fixture
def fault_matrix_summary(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``report(line)``: a line for the "fault matrix" section of the terminal summary, shown
    even with ``-q`` and without ``-s`` (it is also printed for ``-s`` runs)."""
    lines = request.config.stash.setdefault(_FAULT_MATRIX, [])

    def report(line: str) -> None:
        print(f"fault matrix: {line}")
        lines.append(line)

    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    lines = config.stash.get(_FAULT_MATRIX, [])
    if lines:
        terminalreporter.write_sep("-", "fault matrix counts")
        for line in lines:
            terminalreporter.write_line(line)
