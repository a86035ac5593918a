"""A ring between two processes: a million request/response pairs, a hostile frontend, and the
shared-memory segments underneath (channels.shm), all in /dev/shm (no root needed).

The frontend runs in the test process, the backend in a forked child that attaches the segment
and opens the doorbells by name, as a backend domain would. Notification suppression is on
(each side rings only when ``push_*`` says so) and every sleep is bounded: a wait that times out
fails the test, so a lost wakeup shows up as a failure, never as a hang.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import stat
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from channels.doorbell import Doorbell, create_doorbell, unlink_doorbell
from channels.errors import ProtocolViolation
from channels.ring import (
    MASK32,
    PAGE_SIZE,
    REQ_PROD_OFFSET,
    BackRing,
    FrontRing,
    RingError,
    declare_ring,
)
from channels.shm import (
    SHM_DIR,
    ShmError,
    attach,
    create_segment,
    segment_path,
    unlink_segment,
)

logger = logging.getLogger(__name__)

STRESS = declare_ring("stress", "<QQ", "<QQ")  # 16-byte slots: RING_SIZE 128 on one page
PAIRS = 1_000_000
START = 2**32 - 1000  # the indices wrap early in the run
WAIT = 10.0  # any wait this long is a lost wakeup
SEED = 20261121
MASK64 = 2**64 - 1
MAGIC = 0x9E3779B97F4A7C15
REPO = Path(__file__).resolve().parents[2]
FORK = multiprocessing.get_context("fork")


class LostWakeup(AssertionError):
    """A bounded wait expired although the peer owed us work."""


@dataclass(frozen=True)
class Names:
    segment: str
    req_bell: str  # frontend -> backend
    rsp_bell: str  # backend -> frontend


@pytest.fixture
def names() -> Iterator[Names]:
    """A ring segment and one doorbell each way; removed afterwards, even on failure."""
    tag = uuid.uuid4().hex
    created = Names(f"hyper-test-ring-{tag}", f"hyper-test-req-{tag}", f"hyper-test-rsp-{tag}")
    try:
        create_segment(created.segment, PAGE_SIZE)
        create_doorbell(created.req_bell)
        create_doorbell(created.rsp_bell)
        yield created
    finally:
        unlink_segment(created.segment)
        unlink_doorbell(created.req_bell)
        unlink_doorbell(created.rsp_bell)
        assert [f for f in os.listdir(SHM_DIR) if tag in f] == []


def payload(seq: int) -> int:
    return (seq * 0x2545F4914F6CDD1D) & MASK64


# --- the backend process ---------------------------------------------------------------------


def serve(names: Names, pairs: int, seed: int, stats: dict[str, Any]) -> None:
    """Echo requests (seq, payload) as (seq, payload ^ MAGIC) until `pairs` are answered."""
    rng = random.Random(seed)
    segment = attach(names.segment)
    req_bell, rsp_bell = Doorbell(names.req_bell), Doorbell(names.rsp_bell)
    back: BackRing | None = None
    try:
        back = BackRing.attach(STRESS, segment.buf)
        while stats["handled"] < pairs:
            requests = back.get_requests(rng.randint(1, back.nr_ents))
            if requests:
                back.put_responses([(seq, value ^ MAGIC) for seq, value in requests])
                stats["handled"] += len(requests)
                if back.push_responses():
                    rsp_bell.ring()
                    stats["notifies"] += 1
                continue
            if back.final_check_for_requests():
                continue
            stats["sleeps"] += 1
            if not req_bell.wait(WAIT):
                raise LostWakeup(f"backend: no request for {WAIT}s at {stats['handled']}")
    except ProtocolViolation:
        stats["stays_broken"] = back is not None and _stays_broken(back)
        raise
    finally:
        if back is not None:
            back.close()
        req_bell.close()
        rsp_bell.close()
        segment.close()


def _stays_broken(back: BackRing) -> bool:
    try:
        back.final_check_for_requests()
    except ProtocolViolation:
        return True
    return False


def backend_main(names: Names, pairs: int, seed: int, report: Connection) -> None:
    """Child process entry: serve, then send one report dict whatever happened."""
    stats: dict[str, Any] = {"handled": 0, "notifies": 0, "sleeps": 0, "status": "ok"}
    try:
        serve(names, pairs, seed, stats)
    except ProtocolViolation as e:
        stats.update(status="broken", message=str(e))
    except BaseException as e:
        stats.update(status="error", message=f"{type(e).__name__}: {e}")
    report.send(stats)
    report.close()


class Backend:
    """The backend child process and its report pipe; killed if the test fails early."""

    def __init__(self, names: Names, pairs: int, seed: int) -> None:
        self._reader, writer = FORK.Pipe(duplex=False)
        self.process = FORK.Process(
            target=backend_main, args=(names, pairs, seed, writer), name="stress-backend"
        )
        self.process.start()
        writer.close()

    def report(self) -> dict[str, Any]:
        if not self._reader.poll(WAIT):
            raise LostWakeup(f"backend sent no report within {WAIT}s")
        stats: dict[str, Any] = self._reader.recv()
        self.process.join(WAIT)
        assert self.process.exitcode == 0
        return stats

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(WAIT)
        self._reader.close()


# --- the frontend (this process) --------------------------------------------------------------


def drive(front: FrontRing, names: Names, pairs: int, rng: random.Random) -> dict[str, int]:
    """Send `pairs` requests in random batches and check every echoed response, in order."""
    stats = {"notifies": 0, "sleeps": 0}
    sent = received = 0
    with Doorbell(names.req_bell) as req_bell, Doorbell(names.rsp_bell) as rsp_bell:
        while received < pairs:
            free = front.free_requests()
            # Usually refill; sometimes wait for responses with room to spare, so both
            # "ring full" and "ring idle" sleeps happen.
            if sent < pairs and free and (sent == received or rng.random() < 0.75):
                n = min(rng.randint(1, front.nr_ents), free, pairs - sent)
                front.put_requests([(seq, payload(seq)) for seq in range(sent, sent + n)])
                sent += n
                if front.push_requests():
                    req_bell.ring()
                    stats["notifies"] += 1
            responses = front.get_responses(rng.randint(1, front.nr_ents))
            if responses:
                expected = range(received, received + len(responses))
                assert responses == [(seq, payload(seq) ^ MAGIC) for seq in expected]
                received += len(responses)
                continue
            if sent == received or front.final_check_for_responses():
                continue
            stats["sleeps"] += 1
            if not rsp_bell.wait(WAIT):
                raise LostWakeup(f"frontend: no response for {WAIT}s, {sent - received} owed")
    return stats


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_million_pairs_cross_the_wrap_without_a_lost_wakeup(names: Names) -> None:
    segment = attach(names.segment)
    front = FrontRing.init(STRESS, segment.buf, start=START)
    backend = Backend(names, PAIRS, SEED + 1)
    try:
        began = time.monotonic()
        front_stats = drive(front, names, PAIRS, random.Random(SEED))
        back_stats = backend.report()
        elapsed = time.monotonic() - began
    finally:
        backend.stop()
        front.close()
        segment.close()

    assert back_stats["status"] == "ok", back_stats.get("message")
    assert back_stats["handled"] == PAIRS
    assert front.rsp_cons == front.req_prod_pvt == (START + PAIRS) & MASK32
    assert front.rsp_cons < START  # the indices wrapped
    logger.info(
        "%d pairs in %.2f s; frontend %s, backend %s", PAIRS, elapsed, front_stats, back_stats
    )


def test_backend_process_detects_an_impossible_req_prod(names: Names) -> None:
    segment = attach(names.segment)
    front = FrontRing.init(STRESS, segment.buf, start=START)
    backend = Backend(names, 2**62, SEED)
    try:
        with Doorbell(names.req_bell) as req_bell, Doorbell(names.rsp_bell) as rsp_bell:
            front.put_requests([(seq, payload(seq)) for seq in range(10)])
            if front.push_requests():
                req_bell.ring()
            answered = 0
            while answered < 10:  # an honest start: all 10 answered
                answered += len(front.get_responses())
                if answered < 10 and not front.final_check_for_responses():
                    assert rsp_bell.wait(WAIT), "lost wakeup"

            bogus = (front.req_prod_pvt + front.nr_ents + 7) & MASK32
            struct.pack_into("<I", segment.buf, REQ_PROD_OFFSET, bogus)
            req_bell.ring()
            report = backend.report()
    finally:
        backend.stop()
        front.close()
        segment.close()

    assert report["status"] == "broken", report
    assert report["handled"] == 10
    assert report["stays_broken"] is True
    assert f"stress ring: impossible req_prod {bogus}" in report["message"]
    assert f"rsp_prod_pvt {(START + 10) & MASK32}" in report["message"]


# --- shared memory segments -------------------------------------------------------------------


def run_python(code: str) -> None:
    """Run `code` in a fresh interpreter: its own resource tracker, like a domain's process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


@pytest.fixture
def segment_name() -> Iterator[str]:
    name = f"hyper-test-seg-{uuid.uuid4().hex}"
    yield name
    unlink_segment(name)
    assert not os.path.exists(segment_path(name))


def test_segments_outlive_the_processes_that_create_and_attach_them(segment_name: str) -> None:
    run_python(f"from channels.shm import create_segment; create_segment({segment_name!r}, 8192)")
    assert os.path.exists(segment_path(segment_name))  # the creator's tracker did not unlink it
    run_python(
        "from channels.shm import attach\n"
        f"s = attach({segment_name!r})\n"
        "s.buf[100] = 42\n"
        "s.close()\n"
    )
    with attach(segment_name) as segment:  # nor did the attacher's
        assert segment.size == 8192
        assert segment.buf[100] == 42


def test_create_segment_applies_the_exact_mode(segment_name: str) -> None:
    old_umask = os.umask(0o077)
    try:
        create_segment(segment_name, PAGE_SIZE, mode=0o640)
    finally:
        os.umask(old_umask)
    st = os.stat(segment_path(segment_name))
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == PAGE_SIZE
    with pytest.raises(ShmError, match=f"shared memory segment {segment_name}: already exists"):
        create_segment(segment_name, PAGE_SIZE)


def test_attach_to_a_missing_segment_names_it() -> None:
    missing = f"hyper-test-missing-{uuid.uuid4().hex}"
    with pytest.raises(ShmError, match=f"shared memory segment {missing}: cannot open"):
        attach(missing)
    unlink_segment(missing)  # missing is fine


def test_close_with_a_live_view_warns_and_keeps_the_view_valid(
    segment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_segment(segment_name, PAGE_SIZE)
    segment = attach(segment_name)
    view = segment.buf[0:16]
    with caplog.at_level(logging.WARNING, logger="channels.shm"):
        segment.close()
        segment.close()  # idempotent
    assert "views still exported" in caplog.text
    view[0] = 1  # still mapped: close never leaves a dangling view
    assert view[0] == 1
    view.release()
    with pytest.raises(ValueError, match="released"):
        segment.buf[0]


def test_closing_the_ring_first_lets_the_segment_unmap_cleanly(
    segment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_segment(segment_name, PAGE_SIZE)
    segment = attach(segment_name)
    front = FrontRing.init(STRESS, segment.buf)
    back = BackRing.attach(STRESS, segment.buf)
    front.close()
    back.close()
    with caplog.at_level(logging.WARNING, logger="channels.shm"):
        segment.close()
    assert caplog.text == ""
    with pytest.raises(RingError, match="stress ring: closed"):
        front.put_request((1, 1))
