"""Captures of a vif's frames (`hyperctl capture`): a packet socket on the vif's TAP, written
as a pcap file, as one would run tcpdump on ``vif<domid>.<devid>`` in Xen's dom0.

The TAP is the backend's end of the vif: every frame netback takes off the tx ring is written
into it, and every frame it puts on the rx ring is read from it. A packet socket bound to it
(``ETH_P_ALL``) sees both, from the kernel's side: netback's code is not touched (the kernel
hands the socket its own reference to each frame while a capture runs), and nothing at all is
done when none runs. A vif with faults
(backends/netback/faults.py) shows what its fault line let through on the way out of the
domain, and what arrived for it on the way in (before the line drops or delays it). A vif
served by a driver domain has its TAP in that domain's network namespace: the socket is made
there (``setns`` in a thread of its own, which affects that thread alone).

The pcap format (libpcap's classic file: a 24-byte header, then a 16-byte header before each
frame) is written here: it is three structs, and a library for them would bring far more.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from channels import linux
from channels.waiting import readable

ETH_P_ALL = 0x0003
SNAPLEN = 262144  # a whole GSO frame (64 KiB and headers) with room to spare
LINKTYPE_ETHERNET = 1
#: magic (microseconds), version 2.4, GMT, sigfigs, snaplen, link type
PCAP_HEADER = struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
RECORD = struct.Struct("=IIII")  # seconds, microseconds, bytes captured, bytes on the wire
CLONE_NEWNET = 0x40000000


def open_tap_socket(tap: str, netns_pid: int | None = None) -> socket.socket:
    """A packet socket seeing every frame of interface ``tap``, both ways; in the network
    namespace of process ``netns_pid`` when given (a driver domain's). OSError if the TAP is
    not there."""
    if netns_pid is None:
        return _packet_socket(tap)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def in_namespace() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            target = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(target, CLONE_NEWNET)
                try:
                    made.append(_packet_socket(tap))
                finally:
                    linux.setns(home, CLONE_NEWNET)
            finally:
                os.close(target)
                os.close(home)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=in_namespace, name="capture-setns")
    thread.start()
    thread.join()
    if failed:
        for sock in made:  # made, but the thread could not go home: not ours to keep
            sock.close()
        raise failed[0]
    return made[0]


def _packet_socket(tap: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)  # bursts
        sock.bind((tap, ETH_P_ALL))
    except OSError:
        sock.close()
        raise
    return sock


def stream_pcap(
    sock: socket.socket, client: socket.socket, count: int = 0, duration: float = 0.0
) -> int:
    """Send ``client`` the pcap header, then each frame ``sock`` sees, until ``count`` frames
    (0: no limit), ``duration`` seconds (0: none), or the client hangs up; the number of frames
    sent. Asleep between frames: nothing wakes it but a frame, the client or the deadline."""
    client.sendall(PCAP_HEADER)
    deadline = time.monotonic() + duration if duration else None
    frames = 0
    buffer = bytearray(SNAPLEN)
    while not count or frames < count:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            break
        ready = readable([sock.fileno(), client.fileno()], wait)
        if client.fileno() in ready and not client.recv(4096):
            break  # hung up (anything it sends is ignored)
        if sock.fileno() not in ready:
            continue
        length = sock.recv_into(buffer, SNAPLEN, socket.MSG_TRUNC)
        kept = min(length, SNAPLEN)
        now = time.time_ns()
        client.sendall(RECORD.pack(now // 10**9, now % 10**9 // 1000, kept, length) + buffer[:kept])
        frames += 1
    return frames
