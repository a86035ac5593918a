"""Captures at the ring (issue 16): `hyperctl capture` writes the frames crossing a vif as a
pcap file that tshark reads, and `hyperctl trace` prints each blkif request and response of a
disk as blkback handles it."""

from __future__ import annotations

import json
import queue
import select
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.golden import assert_matches_schema
from tests.integration.conftest import as_kernel, hyperctl, hyperctl_started, wait_for
from tests.integration.test_block import disk
from tests.integration.test_network import vif

pytestmark = pytest.mark.root


def quiet_ipv6(name: str) -> None:
    """No IPv6 on the domain's links: no router solicitation or MLD report lands among the
    frames a test counts."""
    kernel = as_kernel(name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
    assert kernel.wait(timeout=10) == 0, kernel.communicate()


def test_a_capture_holds_the_echo_requests_and_replies_of_five_pings(
    make_domain: Callable[..., str], lan: tuple[str, str], tmp_path: Path
) -> None:
    bridge, net = lan
    a = make_domain(vif(bridge, f"{net}.2"))
    b = make_domain(vif(bridge, f"{net}.3"))
    for name in (a, b):
        quiet_ipv6(name)
    hyperctl("exec", a, "--", "ping", "-c", "1", "-W", "5", f"{net}.3")  # ARP settled first
    pcap = tmp_path / "f.pcap"

    capture = hyperctl_started("capture", a, "vif0", "-c", "10", "-w", str(pcap))
    try:
        wait_for(lambda: pcap.exists() and pcap.stat().st_size >= 24, 10, "the capture to run")
        hyperctl("exec", a, "--", "ping", "-c", "5", "-i", "0.2", "-W", "5", f"{net}.3")
        assert capture.wait(timeout=20) == 0, capture.communicate()
    finally:
        capture.kill()
        capture.wait()

    fields = ["-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type"]
    read = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "icmp", *fields], capture_output=True, text=True
    )
    assert read.returncode == 0, read.stderr
    seen = [line.split("\t") for line in read.stdout.splitlines()]
    assert seen.count([f"{net}.2", f"{net}.3", "8"]) == 5, read.stdout
    assert seen.count([f"{net}.3", f"{net}.2", "0"]) == 5, read.stdout


def test_a_capture_of_no_vif_is_refused_with_one_line(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    refused = hyperctl("capture", name, "xvda", "-w", str(tmp_path / "x.pcap"), check=False)
    assert refused.status == 2
    assert refused.err.strip().splitlines() == ["capture: 'xvda' is not a vif"]


def test_trace_shows_each_write_of_dd_with_its_sectors(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    # Four direct 4 KiB writes from byte 400 KiB: sectors 800, 808, 816 and 824, 8 each.
    dd = ["dd", "if=/dev/zero", "of=/dev/xvda", "bs=4k", "count=4", "seek=100", "oflag=direct"]

    trace = hyperctl_started("trace", name, "xvda", "--json", "--duration", "60")
    assert trace.stdout is not None and trace.stderr is not None
    lines: queue.Queue[str] = queue.Queue()

    def read_lines() -> None:
        for line in trace.stdout or ():
            lines.put(line)

    threading.Thread(target=read_lines, daemon=True).start()
    try:
        ready = select.select([trace.stderr], [], [], 15)[0]
        assert ready and "tracing" in trace.stderr.readline(), "trace never started"
        hyperctl("exec", name, "--", *dd)
        writes: list[dict[str, Any]] = []
        first: dict[str, dict[str, Any]] = {}  # a request's record and a response's
        while len(writes) < 4:
            record = json.loads(lines.get(timeout=15))
            first.setdefault(record["ev"], record)
            if record["ev"] == "rsp" and record["op"] == "write":
                writes.append(record)
    finally:
        trace.kill()
        trace.wait()

    # trace --json's schema, golden-tested as every --json output is (test_json_outputs).
    assert_matches_schema(first, "trace")

    assert [(w["sector"], w["count"], w["status"]) for w in writes] == [
        (800, 8, "ok"),
        (808, 8, "ok"),
        (816, 8, "ok"),
        (824, 8, "ok"),
    ]
    assert all(w["latency_us"] >= 0 for w in writes)
