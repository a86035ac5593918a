"""A hostile frontend against the real netback, while a neighbour's iperf3 runs; a hostile kernel
forging addresses onto the bridge.

The first test takes over a real domain's vif: it pauses the domain (its netfront is frozen, so only
the test writes the ring), maps the domain's tx ring page and tx buffer pool from /dev/shm as
root can, writes raw requests, and rings the domain's doorbells. netback in dom0 sees exactly
what a compromised domain kernel could produce. Every bad request must be answered with an
error and counted, and an honest frame sent after them must cross the bridge; the violations
must disconnect that vif alone; the neighbours' iperf3 must finish meanwhile. The second runs as
a domain's kernel would (``as_kernel``: root of its user namespace) and writes raw frames on its
eth0 with another MAC, another address, a forged ARP reply, a VLAN tag and UDP from ``::``; a raw
socket on the host's bridge must see only the honest frames sent after them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from channels import netif as N
from channels.gnttab import table_pages
from channels.ring import HEADER_SIZE, PAGE_SIZE, u32_view
from channels.shm import Segment, attach
from tests.integration.conftest import (
    BOTH_PUMPS,
    REPO,
    as_kernel,
    domain_info,
    hyperctl,
    iperf3_report,
    start_iperf3_server,
    wait_for,
)
from tests.integration.test_network import counters, vif
from tests.raw_bell import ring_once
from tests.unit.test_netback_antispoof import arp, ether, ipv4, ipv6, tagged

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("data_path_pumps")]
PUMPS = BOTH_PUMPS  # every test on the native pumps, then on the Python reference

TX_POOL_PAGES = 256  # netfront's tx pool (domu/netfront/xenbus.py)


class HostileFrontend:
    """Raw access to a paused domain's vif 0 tx ring and tx pages."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        front = f"/local/domain/{domid}/device/vif/0"
        self.ring_ref = int(hyperctl("store", "read", f"{front}/tx-ring-ref").out)
        self.segments: list[Segment] = []
        ring_pool = self._pool("gnt0")
        tx_pool = self._pool("gnt1")
        self.ring = ring_pool.buf[table_pages(2) * PAGE_SIZE :][:PAGE_SIZE]
        self.index = u32_view(self.ring, 0, 4)  # req_prod, req_event, rsp_prod, rsp_event
        self.data = tx_pool.buf[table_pages(TX_POOL_PAGES) * PAGE_SIZE :]
        self.tx_base = self.ring_ref + 2  # netfront grants its 2 ring pages, then the tx pool
        # Whatever the real netfront sent before the pause must be answered first.
        wait_for(lambda: self.index[0] == self.index[2], 10, "the tx ring to go quiet")
        self.req_prod = self.index[0]
        self.rsp_cons = self.index[2]
        self.nr_ents = N.TX_RING.nr_ents(PAGE_SIZE)

    def _pool(self, kind: str) -> Segment:
        path = next(Path("/dev/shm").glob(f"hyper.d{self.domid}.{kind}.*"))
        segment = attach(path.name)
        self.segments.append(segment)
        return segment

    def page(self, index: int, data: bytes) -> int:
        self.data[index * PAGE_SIZE : index * PAGE_SIZE + len(data)] = data
        return self.tx_base + index

    def send(self, *slots: tuple[int, ...] | bytes) -> None:
        for slot in slots:
            offset = HEADER_SIZE + (self.req_prod % self.nr_ents) * N.TX_RING.slot_size
            raw = slot if isinstance(slot, bytes) else N.TX_RING.request.pack(*slot)
            self.ring[offset : offset + len(raw)] = raw
            self.req_prod = (self.req_prod + 1) & 0xFFFFFFFF
        self.index[0] = self.req_prod
        self.kick()

    def lie(self, req_prod: int) -> None:
        self.index[0] = req_prod & 0xFFFFFFFF
        self.kick()

    def kick(self) -> None:
        """Ring every doorbell of the domain: netback's among them (spurious ones are fine)."""
        for sem in Path("/dev/shm").glob(f"sem.hyper.d{self.domid}.*"):
            ring_once(sem.name.removeprefix("sem."))

    def responses(self, count: int) -> list[tuple[int, int]]:
        def arrived() -> bool:
            return (self.index[2] - self.rsp_cons) & 0xFFFFFFFF >= count

        wait_for(arrived, 10, f"{count} responses from netback")
        got = []
        for _ in range(count):
            offset = HEADER_SIZE + (self.rsp_cons % self.nr_ents) * N.TX_RING.slot_size
            got.append(struct.unpack_from("<Hh", self.ring, offset))
            self.rsp_cons = (self.rsp_cons + 1) & 0xFFFFFFFF
        return got

    def close(self) -> None:
        self.index.release()
        del self.ring, self.data
        for segment in self.segments:
            segment.close()


@pytest.fixture
def neighbours(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> Iterator[subprocess.Popen[str]]:
    """Two domains on the same bridge with iperf3 running between them for 20 s."""
    bridge, net = lan
    server = make_domain(vif(bridge, f"{net}.2"))
    client = make_domain(vif(bridge, f"{net}.3"))
    start_iperf3_server(server)
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hyper.cli",
            "exec",
            client,
            "--",
            "iperf3",
            "-c",
            f"{net}.2",
            "-t",
            "20",
            "-J",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield run
    run.kill()
    run.wait()


def tx_errors(name: str) -> int:
    return int(json.loads(hyperctl("network-list", "--json", name).out)[0]["tx_errors"])


BAD_REQUESTS: list[tuple[str, Callable[[int], Sequence[tuple[int, ...] | bytes]]]] = [
    ("offset + size past the page", lambda g: [(g, 4000, 0, 1, 200)]),
    (
        "total size over 65535",
        lambda g: (
            [(g, 0, N.NETTXF_more_data, 1, 65535)]
            + [(g, 0, N.NETTXF_more_data, i, 4096) for i in range(2, 17)]
            + [(g, 0, 0, 17, 4096)]
        ),
    ),
    ("first slot shorter than an Ethernet header", lambda g: [(g, 0, 0, 1, 10)]),
    ("bad grant ref", lambda g: [(123456, 0, 0, 1, 64)]),
    (
        "unknown extra type",
        lambda g: [(g, 0, N.NETTXF_extra_info, 1, 64), N.Extra(9, 0, 0, 0).pack_tx()],
    ),
    (
        "zero GSO size",
        lambda g: [(g, 0, N.NETTXF_extra_info, 1, 64), N.Extra(1, 0, 0, 1).pack_tx()],
    ),
    (
        "GSO size 1",
        lambda g: [(g, 0, N.NETTXF_extra_info, 1, 64), N.Extra(1, 0, 1, 1).pack_tx()],
    ),
    (
        "too many slots",
        lambda g: [(g, 0, N.NETTXF_more_data, i, 1000) for i in range(19)] + [(g, 0, 0, 19, 1000)],
    ),
]


def test_hostile_frontend_is_refused_and_disconnected_while_a_neighbour_runs(
    make_domain: Callable[..., str],
    lan: tuple[str, str],
    neighbours: subprocess.Popen[str],
) -> None:
    bridge, net = lan
    victim = make_domain(vif(bridge, f"{net}.9"))
    info = domain_info(victim)
    assert info is not None
    # A frame the victim may send (its MAC, its address), so that the source check passes it.
    mac = bytes.fromhex(counters(victim)[0]["mac"].replace(":", ""))
    frame = ether(0x0800, ipv4(socket.inet_aton(f"{net}.9"), MARK + b"7"), src=mac)
    hyperctl("pause", victim)
    evil = HostileFrontend(info["domid"])
    try:
        gref = evil.page(0, frame)
        for count, (what, slots_of) in enumerate(BAD_REQUESTS, start=1):
            slots = slots_of(gref)
            evil.send(*slots)
            answers = evil.responses(len(slots))
            statuses = {
                s
                for (_, s), slot in zip(answers, slots, strict=True)
                if not isinstance(slot, bytes)
            }
            assert statuses == {N.NETIF_RSP_ERROR}, f"{what}: {answers}"
            assert tx_errors(victim) == count, what
        # Broadcast, seen without promiscuous mode: the neighbours' unicast iperf3 stream
        # would flood a promiscuous socket.
        [before] = counters(victim)
        with capture_on(bridge, promiscuous=False) as capture:
            evil.send((gref, 0, 0, 77, len(frame)))
            assert evil.responses(1) == [(77, N.NETIF_RSP_OKAY)]
            [after] = counters(victim)
            sent, spoofed = (after[k] - before[k] for k in ("tx_packets", "tx_spoofed"))
            assert (sent, spoofed) == (1, 0), "netback sent the frame, and counted no spoof"
            marks_seen(capture, {MARK + b"7"}, timeout=10)  # the vif still works

        # A protocol violation: an impossible req_prod. Only this vif is disconnected.
        evil.lie(evil.rsp_cons + 5000)
        backend = f"/local/domain/0/backend/vif/{info['domid']}/0"
        wait_for(
            lambda: hyperctl("store", "read", f"{backend}/error", check=False).status == 0,
            10,
            "netback to report the error",
        )
        assert "req" in hyperctl("store", "read", f"{backend}/error").out.lower()
    finally:
        evil.close()
    out, err = neighbours.communicate(timeout=60)
    assert neighbours.returncode == 0, err
    report = iperf3_report(out)
    assert report["end"]["sum_received"]["bytes"] > 0
    assert "error" not in report


QUEUE_LIES = [
    ({"multi-queue-num-queues": "3"}, "frontend requested 3 queues; the backend offers 1 to"),
    ({"multi-queue-num-queues": "0"}, "frontend requested 0 queues"),
    ({"multi-queue-num-queues": "two"}, "invalid literal"),
    ({"queue-1/tx-ring-ref": None}, "queue-1/tx-ring-ref missing"),
]


@pytest.mark.parametrize(
    ("lie", "reason"), QUEUE_LIES, ids=["more than offered", "none", "no number", "a ring missing"]
)
def test_a_frontend_lying_about_its_queues_fails_its_vif_alone(
    make_domain: Callable[..., str],
    lan: tuple[str, str],
    lie: dict[str, str | None],
    reason: str,
) -> None:
    """A frontend's queues are read as its backend connects: here again, once the vif's worker
    was killed and the real netfront started its rings over under keys the test rewrote, as a
    subverted kernel could. More queues than offered, none, a count that is no number, or a
    queue without its ring: the vif fails, saying why, and its neighbours talk on."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one host CPU: netback offers one queue")
    bridge, net = lan
    victim = make_domain("vcpus: 2\n" + vif(bridge, f"{net}.2"))
    first, second = (make_domain(vif(bridge, f"{net}.{i}")) for i in (3, 4))
    info = domain_info(victim)
    assert info is not None
    front = f"/local/domain/{info['domid']}/device/vif/0"
    backend = f"/local/domain/0/backend/vif/{info['domid']}/0"
    for key, value in lie.items():
        if value is None:
            hyperctl("store", "rm", f"{front}/{key}")
        else:
            hyperctl("store", "write", f"{front}/{key}", value)
    os.kill(counters(victim)[0]["worker_pid"], signal.SIGKILL)
    wait_for(
        lambda: hyperctl("store", "read", f"{backend}/error", check=False).status == 0,
        15,
        "netback to fail the vif",
    )
    assert reason in hyperctl("store", "read", f"{backend}/error").out
    assert hyperctl("exec", first, "--", "ping", "-c", "2", "-W", "5", f"{net}.4").status == 0
    assert domain_info(second) is not None


# -- antispoof: only the vif's own addresses leave the bridge -----------------------------------

SEND_RAW = """
import socket, sys
link = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
link.bind(("eth0", 0))
for frame in sys.argv[1:]:
    link.send(bytes.fromhex(frame))
"""
MARK = b"hyper-antispoof-"
ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC, PACKET_STATISTICS = 263, 1, 1, 6


@contextlib.contextmanager
def capture_on(bridge: str, promiscuous: bool = True) -> Iterator[socket.socket]:
    """A raw socket that sees every frame the bridge forwards (it is put in promiscuous mode
    while the socket is open), or without ``promiscuous`` only the broadcasts and multicasts."""
    # Protocol 0 until bound: a socket made with ETH_P_ALL takes every interface's frames from
    # its first moment, and a few of the neighbours' 64 KiB frames, queued before the bind, fill
    # its buffer, so the frame the test waits for is dropped (seen: 49 drops, the mark lost).
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((bridge, ETH_P_ALL))
        index = socket.if_nametoindex(bridge)
        if promiscuous:
            sock.setsockopt(
                SOL_PACKET,
                PACKET_ADD_MEMBERSHIP,
                struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""),
            )
        yield sock
    finally:
        sock.close()


def marks_seen(sock: socket.socket, until: set[bytes], timeout: float) -> set[bytes]:
    """The marks of the test's frames that cross the bridge, until all of ``until`` did."""
    seen: set[bytes] = set()
    sock.settimeout(timeout)
    while not until <= seen:
        try:
            frame = sock.recv(70000)
        except TimeoutError:
            # What the socket itself took and dropped (struct tpacket_stats): a drop here is the
            # capture's, not the bridge's.
            packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            raise AssertionError(
                f"{sorted(until - seen)} never crossed the bridge "
                f"(the capture saw {len(seen)} marks; socket: {packets} frames, {drops} dropped)"
            ) from None
        at = frame.find(MARK)
        if at >= 0:
            seen.add(frame[at : at + len(MARK) + 1])
    return seen


def test_frames_from_another_address_leave_the_bridge_only_as_counted_drops(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    bridge, net = lan
    name = make_domain(vif(bridge, f"{net}.9"))
    [entry] = counters(name)
    mac = bytes.fromhex(entry["mac"].replace(":", ""))
    ours, neighbour = socket.inet_aton(f"{net}.9"), socket.inet_aton(f"{net}.1")
    forged = {
        b"1": ether(0x0800, ipv4(ours, MARK + b"1"), src=bytes.fromhex("00163e0000ee")),
        b"2": ether(0x0800, ipv4(socket.inet_aton(f"{net}.77"), MARK + b"2"), src=mac),
        b"3": ether(0x0806, arp(2, mac, neighbour) + MARK + b"3", src=mac),  # "I am .1"
        b"4": ether(0x0806, arp(2, bytes.fromhex("00163e0000ee"), ours) + MARK + b"4", src=mac),
        b"7": tagged(0x0800, ipv4(ours, MARK + b"7"), src=mac),  # onto the host's VLAN 7
        b"8": ether(0x86DD, ipv6(bytes(16), 17, bytes(8) + MARK + b"8"), src=mac),  # UDP from ::
    }
    honest = {
        b"5": ether(0x0800, ipv4(ours, MARK + b"5"), src=mac),
        b"6": ether(0x0806, arp(2, mac, ours) + MARK + b"6", src=mac),
    }
    spoofed_before = entry["tx_spoofed"]
    with capture_on(bridge) as capture:
        frames = [frame.hex() for frame in (*forged.values(), *honest.values())]
        kernel = as_kernel(name, sys.executable, "-c", SEND_RAW, *frames)
        _, err = kernel.communicate(timeout=30)
        assert kernel.returncode == 0, err
        # netback takes the frames in order: once the honest ones are on the bridge, the forged
        # ones before them have been judged.
        seen = marks_seen(capture, {MARK + k for k in honest}, timeout=10)
    assert seen == {MARK + k for k in honest}, "no forged frame may leave"
    [entry] = counters(name)
    assert entry["tx_spoofed"] - spoofed_before == len(forged)
    assert entry["ip"] == f"{net}.9", "network-list shows the address netback enforces"
