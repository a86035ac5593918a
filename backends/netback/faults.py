"""Faults injected into a vif's frames (issue 16): a fault line between each netif queue's
data path and its TAP queue, as netem is a queueing discipline between a stack and its device.

While a vif has faults, its paths no longer speak to the TAP. TxPath writes each frame
(virtio-net header first) into one end of a ``SOCK_SEQPACKET`` socket pair and RxPath reads
each frame from another; the line's thread carries frames between those pairs and the TAP,
taking each frame's fate from the vif's dice (``VifFaults``, over channels/faults.py's
NetDice): dropped, sent twice, a bit flipped, or held back for a delay (with jitter, frames
overtake each other). Every fault is counted in the queue's counters (``fault_*``).

Why a socket pair rather than decisions inside the paths: the paths keep their form (one frame
per readv or writev, non-blocking, a full queue counted as the TAP's would be), a delayed frame
leaves the ring at once (its slots answered, its buffer posted back, as a frame held in a
qdisc has left the guest), and the line is one thread that sleeps until a frame arrives or a
held one is due: idle, it costs nothing. The native pumps speak to the TAP directly, so a vif
that gets faults is handed to its Python paths (NativePump.interrupt), and a line once put in
stays until the vif reconnects: clearing the faults leaves it carrying frames unharmed.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time

from backends.netback.datapath import Counters
from channels import netif as N
from channels.faults import NetDecision, NetDice, flip, parse_net
from channels.threadname import NamedThread
from channels.tun import VNET_HDR_SIZE

log = logging.getLogger(__name__)

#: Frames a line holds back at most (netem's default limit); one more is dropped, counted as
#: the TAP's or the ring's full queue would be.
LIMIT = 1000
BATCH = 64  # frames taken from one side per wakeup
MAX_FRAME = 65536 + VNET_HDR_SIZE
_NEEDS_CSUM = N.VIRTIO_NET_HDR_F_NEEDS_CSUM
_CSUM = struct.Struct("!H")  # a checksum, IP length or id, as on the wire
_SEQ = struct.Struct("!I")
_IPPROTO_TCP = 6
_ETH_P_IP = 0x0800
_FIN_PSH, _CWR = 0x01 | 0x08, 0x80
TX, RX = "tx", "rx"


class VifFaults:
    """A vif's faults as its queues' lines share them: the spec, and the dice each frame is
    decided by (one sequence for the whole vif, so that a seed gives a one-queue vif the same
    faults for the same frames)."""

    def __init__(self, spec: str = "") -> None:
        self._lock = threading.Lock()
        self._dice: NetDice | None = None
        self.set(spec)

    def set(self, spec: str) -> None:
        """The faults of ``spec`` (channels/faults.py; empty: none) from the next frame on."""
        faults = parse_net(spec) if spec else None
        with self._lock:
            self._dice = NetDice(faults) if faults else None

    def decide(self, direction: str, length: int) -> NetDecision:
        with self._lock:
            if self._dice is None:
                return NetDecision()
            return self._dice.frame(direction, length)


def corrupt(frame: bytes, bit: int) -> list[bytes]:
    """``frame`` (virtio-net header first) as the frames a wire would carry, the first with bit
    ``bit`` (modulo its length) flipped, as netem corrupts: a receiver must be able to see the
    damage. A frame whose checksum is still to be made (NEEDS_CSUM: offloaded) gets it made
    first, and a GSO frame is cut into its segments first (each with its checksums made), or a
    local receiver would trust a flipped frame's offloaded checksum, or the kernel would compute
    a good one over the flipped bytes; DATA_VALID is dropped, so that the receiver checks."""
    frames = [bytearray(f) for f in wire_frames(frame)]
    first = frames[0]
    flip(first, 8 * VNET_HDR_SIZE + bit % (8 * (len(first) - VNET_HDR_SIZE)))
    return [bytes(f) for f in frames]


def wire_frames(frame: bytes) -> list[bytes]:
    """What ``frame`` becomes on a wire: checksums made, GSO cut into segments; the virtio-net
    header of each says nothing more is to be done. A GSO frame that is not TCP over IPv4 or
    IPv6 with whole headers is left as it is (the kernel refuses such a frame anyway)."""
    flags, gso_type, _, gso_size, csum_start, csum_offset = N.VNET_HDR.unpack_from(frame)
    body = frame[VNET_HDR_SIZE:]
    plain = bytes(VNET_HDR_SIZE)
    if gso_type & ~N.VIRTIO_NET_HDR_GSO_ECN and gso_size:
        segments = _segment(body, gso_size)
        return [plain + s for s in segments] if segments else [frame]
    if flags & _NEEDS_CSUM and csum_start + csum_offset + 2 <= len(body):
        filled = bytearray(body)
        at = csum_start + csum_offset
        # The field holds the pseudo-header's sum; the sum over the rest completes it.
        filled[at : at + 2] = _CSUM.pack(~_sum16(filled[csum_start:]) & 0xFFFF)
        return [plain + bytes(filled)]
    return [plain + body]


def _segment(body: bytes, mss: int) -> list[bytes] | None:
    """A TCP GSO frame's segments, as the kernel's tcp_gso_segment makes them: ``mss`` bytes
    of payload each, the IP length and id, the TCP sequence number and flags (FIN and PSH on
    the last alone, CWR on the first) and both checksums made for each."""
    ethertype, l3, proto, l4 = N.frame_layout(body)
    if proto != _IPPROTO_TCP or l4 + 20 > len(body):
        return None
    end = l4 + max((body[l4 + 12] >> 4) * 4, 20)
    v4 = ethertype == _ETH_P_IP
    seq = _SEQ.unpack_from(body, l4 + 4)[0]
    ip_id = _CSUM.unpack_from(body, l3 + 4)[0] if v4 else 0
    tcp_flags = body[l4 + 13]
    payload = body[end:]
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        seg = bytearray(body[:end] + chunk)
        tcp_len = len(seg) - l4
        if v4:
            _CSUM.pack_into(seg, l3 + 2, len(seg) - l3)
            _CSUM.pack_into(seg, l3 + 4, (ip_id + i) & 0xFFFF)
            _CSUM.pack_into(seg, l3 + 10, 0)
            _CSUM.pack_into(seg, l3 + 10, ~_sum16(seg[l3:l4]) & 0xFFFF)
            pseudo = seg[l3 + 12 : l3 + 20] + struct.pack("!BBH", 0, _IPPROTO_TCP, tcp_len)
        else:
            _CSUM.pack_into(seg, l3 + 4, tcp_len)
            pseudo = seg[l3 + 8 : l3 + 40] + struct.pack("!IxxxB", tcp_len, _IPPROTO_TCP)
        _SEQ.pack_into(seg, l4 + 4, (seq + i * mss) & 0xFFFFFFFF)
        last, first = i == len(chunks) - 1, i == 0
        seg[l4 + 13] = tcp_flags & ~((0 if last else _FIN_PSH) | (0 if first else _CWR))
        _CSUM.pack_into(seg, l4 + 16, 0)
        _CSUM.pack_into(seg, l4 + 16, ~_sum16(pseudo + seg[l4:]) & 0xFFFF)
        out.append(bytes(seg))
    return out


def _sum16(data: bytes | bytearray) -> int:
    """The ones' complement sum of ``data`` as big-endian 16-bit words, folded to 16 bits."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class FaultLine:
    """One netif queue's line: ``tx_fd`` is where its TxPath writes, ``rx_fd`` where its RxPath
    reads; the thread carries frames between them and ``tap_fd``."""

    def __init__(self, name: str, tap_fd: int, faults: VifFaults, counters: Counters) -> None:
        self.name = name
        self.tap_fd = tap_fd
        self.faults = faults
        self.counters = counters
        self.tx_fd, self._from_tx = _pair()
        self.rx_fd, self._to_rx = _pair()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._held: list[tuple[float, int, str, bytes]] = []  # (due, order, direction, frame)
        self._order = itertools.count()
        self._stopping = False
        self.thread = NamedThread(target=self._run, name="netback-fault", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the thread (frames held are dropped, as a wire's are when it is cut) and close
        the sockets; the paths are stopped first."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self.thread.is_alive():
            self.thread.join(timeout=5.0)
        for fd in (self.tx_fd, self._from_tx, self.rx_fd, self._to_rx, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        for fd in (self._from_tx, self.tap_fd, self._wake_r):
            poller.register(fd, select.POLLIN)
        try:
            while not self._stopping:
                timeout = None
                if self._held:
                    timeout = max(0, int((self._held[0][0] - time.monotonic()) * 1000) + 1)
                for fd, _ in poller.poll(timeout):
                    if fd == self._from_tx:
                        self._take(self._from_tx, TX)
                    elif fd == self.tap_fd:
                        self._take(self.tap_fd, RX)
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 64)
                self._release()
        except OSError:
            if not self._stopping:
                log.exception("%s: fault line failed; the vif stops carrying frames", self.name)

    def _take(self, fd: int, direction: str) -> None:
        """Read up to BATCH frames from ``fd`` and give each its fate."""
        for _ in range(BATCH):
            try:
                frame = os.read(fd, MAX_FRAME)
            except BlockingIOError:
                return
            if len(frame) <= VNET_HDR_SIZE:
                continue
            self._admit(direction, frame)

    def _admit(self, direction: str, frame: bytes) -> None:
        c = self.counters
        decision = self.faults.decide(direction, len(frame) - VNET_HDR_SIZE)
        if decision.drop:
            _count(c, "fault_dropped")
            return
        frames = [frame]
        if decision.flip_bit is not None:
            frames = corrupt(frame, decision.flip_bit)
            _count(c, "fault_corrupted")
        if decision.copies > 1:
            frames *= decision.copies
            _count(c, "fault_duplicated")
        if not decision.delay:
            for one in frames:
                self._send(direction, one)
            return
        due = time.monotonic() + decision.delay
        for one in frames:
            if len(self._held) >= LIMIT:
                _count(c, f"{direction}_dropped")
                continue
            heapq.heappush(self._held, (due, next(self._order), direction, one))
            _count(c, "fault_delayed")

    def _release(self) -> None:
        """Send every held frame that is due, earliest first."""
        now = time.monotonic()
        while self._held and self._held[0][0] <= now:
            _, _, direction, frame = heapq.heappop(self._held)
            self._send(direction, frame)

    def _send(self, direction: str, frame: bytes) -> None:
        """A frame on its way: to the TAP (tx), or to the RxPath (rx). A full queue drops it,
        counted as the TAP's own would be; a frame the TAP refuses is a tx error."""
        try:
            os.write(self.tap_fd if direction == TX else self._to_rx, frame)
        except BlockingIOError:
            _count(self.counters, f"{direction}_dropped")
        except OSError as exc:
            if direction == RX or exc.errno is None:
                raise
            _count(self.counters, "tx_errors")


def _pair() -> tuple[int, int]:
    """A SOCK_SEQPACKET pair (one frame a message), both ends non-blocking, with room for a
    ring's worth of large frames; (the path's end, the line's end) as fds of their own."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = []
    for end in ends:
        end.setblocking(False)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        fds.append(end.detach())
    return fds[0], fds[1]


def _count(counters: Counters, name: str) -> None:
    """One more of ``name``; under the counters' lock, since the queue's paths count their
    own drops and errors in the same fields."""
    with counters.lock:
        setattr(counters, name, getattr(counters, name) + 1)
