"""channels.waiting and its users watch descriptors numbered past select(2)'s 1024."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import pytest

from channels.tun import TapWaiter
from channels.waiting import readable

HIGH = 1500  # past FD_SETSIZE


@pytest.fixture
def high_pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose read end is numbered HIGH (the soft fd limit raised to allow it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH:
        pytest.skip(f"the fd limit ({hard}) does not reach {HIGH}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH + 1), hard))
    r, w = os.pipe()
    os.dup2(r, HIGH)
    os.close(r)
    try:
        yield HIGH, w
    finally:
        os.close(HIGH)
        os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_readable_watches_a_descriptor_past_1024(high_pipe: tuple[int, int]) -> None:
    r, w = high_pipe
    assert readable([r], 0) == set()
    os.write(w, b"x")
    assert readable([r], 5.0) == {r}


def test_a_tap_waiter_on_a_descriptor_past_1024_wakes(high_pipe: tuple[int, int]) -> None:
    r, w = high_pipe
    waiter = TapWaiter(r)
    try:
        os.write(w, b"x")
        assert waiter.wait() is True
        waiter.interrupt()
        assert waiter.wait() is False  # interrupted, though the TAP is readable too
    finally:
        waiter.close()
