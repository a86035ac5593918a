"""channels/threadname.py: a Python thread's name reaches the kernel, where per-thread figures
(/proc/<pid>/task/<tid>/comm) read it; and blkback's data-path threads use it."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from channels import pumps
from channels.threadname import NamedThread, native_name, set_native_name
from tests.unit import test_blkback_hostile as blkback_tests

JOIN_TIMEOUT = 10.0


def comm_of(tid: int) -> str:
    return Path(f"/proc/{os.getpid()}/task/{tid}/comm").read_text().rstrip("\n")


def comm_seen_by(start: type[threading.Thread], **kwargs: Any) -> str:
    """The kernel's name of a thread made by ``start(**kwargs)``, read while it runs."""
    seen: list[str] = []

    def target() -> None:
        seen.append(comm_of(threading.get_native_id()))

    thread = start(target=target, **kwargs)
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    return seen[0]


def test_a_plain_python_thread_shows_its_process_name() -> None:
    """Why the module exists: threading's name stays in Python."""
    process = Path(f"/proc/{os.getpid()}/comm").read_text().rstrip("\n")
    assert comm_seen_by(threading.Thread, name="netback-tx") == process


def test_set_native_name_names_the_calling_thread_only() -> None:
    seen: list[str] = []

    def target() -> None:
        set_native_name("blkfront-req")
        seen.append(comm_of(threading.get_native_id()))

    main_before = comm_of(threading.get_native_id())
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert seen == ["blkfront-req"]
    assert comm_of(threading.get_native_id()) == main_before


def test_named_thread_uses_its_native_name_else_its_python_name() -> None:
    assert comm_seen_by(NamedThread, name="vbd 3/51712 io7", native_name="blkback-io") == (
        "blkback-io"
    )
    assert comm_seen_by(NamedThread, name="netfront-rx") == "netfront-rx"


def test_a_long_name_is_cut_to_what_the_kernel_keeps() -> None:
    assert comm_seen_by(NamedThread, name="a-name-of-twenty-chars") == "a-name-of-twent"
    # Never half a character: "é" is two bytes, and the 15th byte would split it.
    assert native_name("netback-worker-é") == b"netback-worker-"
    assert native_name("netback-worke-é") == b"netback-worke-"


@pytest.fixture
def blkback_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[threading.Thread]]:
    """The threads of a running VbdPath with 3 I/O threads (the Python pumps: the native one
    has no I/O threads, and names its AIO reaper in C), built as blkback's hostile-frontend
    tests build it (real ring, grants and doorbell; an image file as its device)."""
    monkeypatch.setenv(pumps.ENV, "python")
    with contextlib.ExitStack() as stack:
        yield list(blkback_tests._build(stack, tmp_path, io_threads=3).path.threads)


def test_blkbacks_data_path_threads_carry_their_kind_as_kernel_name(
    blkback_threads: list[threading.Thread],
) -> None:
    def names() -> list[str]:
        return sorted(comm_of(t.native_id) for t in blkback_threads if t.native_id is not None)

    wanted = ["blkback-disp", "blkback-io", "blkback-io", "blkback-io"]
    deadline = time.monotonic() + JOIN_TIMEOUT  # each names itself as it starts to run
    while names() != wanted and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert names() == wanted
