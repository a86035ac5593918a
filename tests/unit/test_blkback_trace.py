"""blkback's trace (`hyperctl trace`): while a sink listens, each request is told as it is taken
off the ring and its response as it is put on, with the sectors the copy of it named; with the
native pump and the Python path (``both_pumps``: a running pump hands the ring over). What a
worker sends is checked by dom0 before anyone sees it (``trace_record``)."""

from __future__ import annotations

import json
import socket
import threading
import types
from typing import Any

import pytest

from backends.datapath_worker import trace_record
from channels import control
from channels.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, Request
from dom0.control import ControlServer
from tests.unit.pumps import both_pumps  # noqa: F401  (runs each test with both)
from tests.unit.test_blkback_hostile import Vbd, make_vbd, vbd  # noqa: F401  (the fixtures)


def test_each_request_and_response_is_told_with_its_sectors_while_traced(vbd: Vbd) -> None:  # noqa: F811
    assert vbd.answer(Request.rw(BLKIF_OP_READ, 1, 0, [vbd.full(0)]))[2] == BLKIF_RSP_OKAY
    records: list[dict[str, Any]] = []
    vbd.path.set_trace(records.append)

    vbd.answer(Request.rw(BLKIF_OP_WRITE, 7, 64, [vbd.full(0)]))
    vbd.answer(Request.rw(BLKIF_OP_READ, 8, 128, [vbd.full(1)]))
    vbd.path.set_trace(None)
    vbd.answer(Request.rw(BLKIF_OP_READ, 9, 0, [vbd.full(0)]))

    told = [(r["ev"], r["op"], r["id"], r["sector"], r["count"], r.get("status")) for r in records]
    assert told == [
        ("req", "write", 7, 64, 8, None),
        ("rsp", "write", 7, 64, 8, "ok"),
        ("req", "read", 8, 128, 8, None),
        ("rsp", "read", 8, 128, 8, "ok"),
    ]
    assert all(trace_record(r) == r for r in records), "dom0 would refuse its own worker's"


@pytest.mark.parametrize(
    "sent",
    [
        "not a record",
        {"ev": "rsp", "op": "\x1b[2Jwrite"},  # a terminal escape in a word
        {"ev": "rsp", "sector": "64"},
        {"ev": "rsp", "extra": 1},
        {"ev": "rsp", "id": True},
    ],
)
def test_a_subverted_workers_record_is_dropped(sent: object) -> None:
    assert trace_record(sent) is None


# -- dom0's stream of them (dom0/control.py) ---------------------------------------------------


class FakePath:
    """A DataPath whose worker sends two requests and their responses as soon as a trace
    starts, and a record that is none."""

    def __init__(self) -> None:
        self.tracing = False

    def trace(self, sink: Any) -> Any:
        self.tracing = True
        for n in (1, 2):
            request = {"ev": "req", "op": "write", "id": n, "sector": 8 * n, "count": 8, "t": 1.0}
            sink(request)
            sink({**request, "ev": "rsp", "status": "ok", "latency_us": 5})

        def stop() -> None:
            self.tracing = False

        return stop


def stream(count: int = 0, duration: float = 0.0) -> tuple[list[dict[str, Any]], FakePath]:
    """What a client of the trace stream reads to its end, and the path it traced."""
    path = FakePath()
    toolstack = types.SimpleNamespace(trace_target=lambda domain, device: path)
    server, client = socket.socketpair()
    request = control.Trace(domain="web", device="xvda", count=count, duration=duration)
    serving = threading.Thread(
        target=ControlServer.trace,
        args=(types.SimpleNamespace(toolstack=toolstack), server, request),
    )
    serving.start()
    client.settimeout(10)
    received = b""
    while chunk := client.recv(65536):  # the stream's end is an EOF, or this times out
        received += chunk
    serving.join(timeout=10)
    assert not serving.is_alive()
    server.close()
    client.close()
    return [json.loads(line) for line in received.splitlines()], path


def test_a_count_of_responses_ends_the_stream_and_the_trace() -> None:
    records, path = stream(count=1)
    assert records[0] == {"ok": True, "result": {}}
    assert [(r["ev"], r["id"]) for r in records[1:]] == [("req", 1), ("rsp", 1)]
    assert not path.tracing


def test_a_duration_ends_the_stream_and_the_trace() -> None:
    records, path = stream(duration=0.2)
    assert [r.get("ev") for r in records[1:]] == ["req", "rsp", "req", "rsp"]
    assert not path.tracing
