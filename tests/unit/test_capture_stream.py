"""`hyperctl capture`'s stream (dom0/capture.py): a pcap file of what a socket sees, ended by a
count, a duration or the client's hangup; and its bad arguments, refused before anything runs."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading

from dom0.capture import PCAP_HEADER, RECORD, stream_pcap


def read_pcap(data: bytes) -> list[bytes]:
    """The frames of a classic pcap file, checking its header."""
    magic, major, minor, _, _, _, linktype = struct.unpack_from("=IHHiIII", data)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)
    frames, at = [], len(PCAP_HEADER)
    while at < len(data):
        _, usec, kept, length = RECORD.unpack_from(data, at)
        assert usec < 1_000_000 and kept == length
        frames.append(data[at + RECORD.size : at + RECORD.size + kept])
        at += RECORD.size + kept
    return frames


def capture(count: int = 0, duration: float = 0.0, hang_up_after: int | None = None) -> bytes:
    """stream_pcap over a stand-in TAP fed three frames; what its client received."""
    tap, feed = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server, client = socket.socketpair()
    for n in range(3):
        feed.send(bytes([n]) * (60 + n))

    def serve() -> None:
        stream_pcap(tap, server, count, duration)
        server.shutdown(socket.SHUT_WR)  # as dom0 closes the connection after the stream

    done = threading.Thread(target=serve)
    done.start()
    received = b""
    while hang_up_after is None or received.count(b"\x02" * 62) < 1:
        chunk = client.recv(65536)
        if not chunk:
            break
        received += chunk
    client.shutdown(socket.SHUT_WR)
    done.join(timeout=10)
    assert not done.is_alive()
    for s in (tap, feed, server, client):
        s.close()
    return received


def test_a_count_ends_the_capture_after_that_many_frames() -> None:
    assert read_pcap(capture(count=2)) == [b"\x00" * 60, b"\x01" * 61]


def test_a_duration_ends_a_capture_that_sees_nothing_more() -> None:
    assert len(read_pcap(capture(duration=0.3))) == 3


def test_the_clients_hangup_ends_the_capture() -> None:
    assert len(read_pcap(capture(hang_up_after=3))) == 3


def test_a_negative_count_is_refused_with_one_line() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "hyper.cli", "capture", "web", "vif0", "-c", "-1", "-w", "x"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["capture: -c: -1 is not a count of 0 or more"]
