"""netback's fault line (backends/netback/faults.py): each frame's fate from the vif's spec,
between a path's socket and the TAP (a socket pair stands in for the TAP here), and frames
corrupted so that their receiver can tell: checksums made, GSO cut into segments first."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from backends.netback.datapath import COUNTER_FIELDS, Counters
from backends.netback.faults import FaultLine, VifFaults, corrupt, wire_frames
from channels import netif as N
from channels.tun import VNET_HDR_SIZE

MSS = 1000


def checksum(data: bytes) -> int:
    """RFC 1071's sum, written the long way (not the code under test's): 0 for a good one."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_frame(payload: bytes, v6: bool = False, gso: bool = True) -> bytes:
    """A TCP frame as a guest's stack hands it over with offloads: virtio-net header with
    NEEDS_CSUM (and GSO), the TCP checksum field holding the pseudo-header's sum."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 0, 5 << 4, 0x18 | 0x01, 512, 0, 0))
    length = len(tcp) + len(payload)
    if v6:
        src, dst = bytes(15) + b"\1", bytes(15) + b"\2"
        ip = struct.pack("!IHBB", 6 << 28, length, 6, 64) + src + dst
        pseudo = src + dst + struct.pack("!IxxxB", length, 6)
        eth = b"\2" * 6 + b"\4" * 6 + b"\x86\xdd"
    else:
        src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + length, 7, 0, 64, 6, 0) + src + dst
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        pseudo = src + dst + struct.pack("!BBH", 0, 6, length)
        eth = b"\2" * 6 + b"\4" * 6 + b"\x08\x00"
    tcp[16:18] = struct.pack("!H", ~checksum(pseudo) & 0xFFFF)  # the partial sum, uncomplemented
    l4 = len(eth) + len(ip)
    gso_type = (N.VIRTIO_NET_HDR_GSO_TCPV6 if v6 else N.VIRTIO_NET_HDR_GSO_TCPV4) if gso else 0
    header = N.VNET_HDR.pack(
        N.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, l4 + 20, MSS if gso else 0, l4, 16
    )
    return header + eth + ip + bytes(tcp) + payload


def segments_check(frames: list[bytes], v6: bool) -> bytes:
    """Each segment's checksums hold and its sequence number follows; the payloads joined."""
    l3 = 14
    l4 = l3 + (40 if v6 else 20)
    payload = b""
    for i, frame in enumerate(frames):
        assert frame[:VNET_HDR_SIZE] == bytes(VNET_HDR_SIZE), "nothing left to offload"
        body = frame[VNET_HDR_SIZE:]
        length = len(body) - l4
        if v6:
            pseudo = body[l3 + 8 : l3 + 40] + struct.pack("!IxxxB", length, 6)
        else:
            assert checksum(body[l3:l4]) == 0, f"segment {i}: IP checksum"
            assert struct.unpack_from("!H", body, l3 + 2)[0] == len(body) - l3
            pseudo = body[l3 + 12 : l3 + 20] + struct.pack("!BBH", 0, 6, length)
        assert checksum(pseudo + body[l4:]) == 0, f"segment {i}: TCP checksum"
        assert struct.unpack_from("!I", body, l4 + 4)[0] == 1000 + len(payload)
        last = i == len(frames) - 1
        assert bool(body[l4 + 13] & 0x01) == last and bool(body[l4 + 13] & 0x08) == last
        payload += body[l4 + 20 :]
    return payload


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_gso_frame_is_cut_into_segments_with_their_checksums(v6: bool) -> None:
    payload = os.urandom(2 * MSS + 300)

    frames = wire_frames(tcp_frame(payload, v6))

    assert [len(f) - VNET_HDR_SIZE - 14 - (40 if v6 else 20) - 20 for f in frames] == [
        MSS,
        MSS,
        300,
    ]
    assert segments_check(frames, v6) == payload


def test_an_offloaded_checksum_is_made_before_a_bit_is_flipped() -> None:
    frame = tcp_frame(b"hello, world", gso=False)
    (whole,) = wire_frames(frame)
    segments_check([whole], v6=False)

    (flipped,) = corrupt(frame, 8 * 40 + 3)

    differing = [i for i in range(len(whole)) if whole[i] != flipped[i]]
    assert len(differing) == 1
    assert bin(whole[differing[0]] ^ flipped[differing[0]]).count("1") == 1
    assert flipped[0] & N.VIRTIO_NET_HDR_F_DATA_VALID == 0


def test_a_corrupted_gso_frame_is_damaged_in_its_first_segment_alone() -> None:
    frame = tcp_frame(os.urandom(3 * MSS), gso=True)

    frames = corrupt(frame, 12345)

    good = wire_frames(frame)
    assert len(frames) == 3 and frames[0] != good[0] and frames[1:] == good[1:]


# -- the line -------------------------------------------------------------------------------


@pytest.fixture
def line() -> Iterator[tuple[FaultLine, socket.socket, Counters]]:
    """A running line over a stand-in TAP: (the line, the TAP's far end, its counters); the
    line's thread must have ended afterwards."""
    tap, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)  # as a TAP's fd is in netback
    counters = Counters(memoryview(bytearray(8 * len(COUNTER_FIELDS))))
    faults = VifFaults()
    running = FaultLine("vif1.0", tap.fileno(), faults, counters)
    running.start()
    try:
        yield running, far, counters
    finally:
        running.stop()
        tap.close()
        far.close()
    assert not running.thread.is_alive()


def frame(n: int) -> bytes:
    return bytes(VNET_HDR_SIZE) + b"\2" * 6 + b"\4" * 6 + b"\x08\x00" + n.to_bytes(4, "big")


def received(sock: socket.socket | int, wait: float = 0.5) -> list[bytes]:
    """Every frame that arrives at ``sock`` until it has been quiet for ``wait`` seconds."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    out = []
    while select.select([fd], [], [], wait)[0]:
        out.append(os.read(fd, 70000))
    return out


def test_without_faults_frames_pass_both_ways_unharmed(
    line: tuple[FaultLine, socket.socket, Counters],
) -> None:
    running, far, _ = line
    os.write(running.tx_fd, frame(1))
    far.send(frame(2))

    assert received(far) == [frame(1)]
    assert received(running.rx_fd) == [frame(2)]


def test_drop_100_drops_every_frame_of_its_direction_and_counts_them(
    line: tuple[FaultLine, socket.socket, Counters],
) -> None:
    running, far, counters = line
    running.faults.set("drop=100,dir=tx")
    for n in range(5):
        os.write(running.tx_fd, frame(n))
    far.send(frame(9))

    assert received(far) == []
    assert received(running.rx_fd) == [frame(9)]
    assert counters.fault_dropped == 5


def test_duplicate_sends_twice_and_clearing_stops_it(
    line: tuple[FaultLine, socket.socket, Counters],
) -> None:
    running, far, counters = line
    running.faults.set("duplicate=100")
    os.write(running.tx_fd, frame(1))
    assert received(far) == [frame(1), frame(1)]

    running.faults.set("")
    os.write(running.tx_fd, frame(2))
    assert received(far) == [frame(2)]
    assert counters.fault_duplicated == 1


def test_a_delayed_frame_arrives_no_sooner_than_its_delay(
    line: tuple[FaultLine, socket.socket, Counters],
) -> None:
    running, far, counters = line
    running.faults.set("delay=80ms")
    sent = time.monotonic()
    far.send(frame(1))

    assert select.select([running.rx_fd], [], [], 5)[0], "the delayed frame never came"
    # Taken as the frame arrives (received() then waits for quiet). A lower bound holds however
    # loaded the machine is: the frame was held at least that long.
    arrived = time.monotonic()
    assert received(running.rx_fd) == [frame(1)]
    assert arrived - sent >= 0.08
    assert counters.fault_delayed == 1


def test_a_seed_gives_the_same_frames_the_same_fate() -> None:
    def fates() -> list[bool]:
        faults = VifFaults("drop=50,seed=11")
        return [faults.decide("tx", 60).drop for _ in range(64)]

    first = fates()
    assert first == fates() and any(first) and not all(first)
