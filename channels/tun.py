"""Opening a TAP device's queue: the Linux tun driver's ioctls, for both ends of a vif.

pyroute2 creates and configures interfaces (netlink); reading and writing frames needs a file
descriptor on /dev/net/tun bound to the interface with TUNSETIFF, which netlink cannot give.
Frames carry a virtio_net_hdr (IFF_VNET_HDR, 10 bytes), and TUNSETOFFLOAD lets the kernel hand
us (and accept from us) checksum-offloaded and TSO frames up to 64 KiB, so one ring packet can
carry a whole TCP burst.

Every TAP is multi-queue (IFF_MULTI_QUEUE): each open of the same name attaches one more queue,
its own fd, and the kernel spreads flows over the queues by their hash, keeping a flow on the
queue its frames last came in on. netif's queues (netback and netfront each serve one fd per
queue) map onto them one to one; with a single queue the device behaves as a plain TAP.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct

from channels.waiting import readable

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

VNET_HDR_SIZE = 10


def open_tap(name: str, *, offload: bool = True) -> int:
    """A non-blocking, close-on-exec fd for frames of a queue of TAP ``name``: the first,
    creating the device in the caller's network namespace, or one more if it exists."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifreq = struct.pack(
            "16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
        )
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if offload else 0
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError:
        os.close(fd)
        raise
    return fd


class TapWaiter:
    """Sleep until a TAP has a frame to read, or until another thread interrupts the sleep.

    The data-path threads block here rather than on the fd alone so that stopping a vif never
    waits for traffic."""

    def __init__(self, tap_fd: int) -> None:
        self.tap_fd = tap_fd
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False

    def wait(self) -> bool:
        """True when the TAP is readable; False when interrupted (the interruption is then
        taken: the caller looks at why it was woken before it waits again)."""
        if self._r not in readable([self.tap_fd, self._r], None):
            return True
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 64)
        return False

    def interrupt(self) -> None:
        """Wake the waiter (a no-op once its thread has ended and closed us)."""
        if not self._closed:
            # EAGAIN: a wakeup is pending already; EBADF: the thread closed us meanwhile.
            with contextlib.suppress(OSError):
                os.write(self._w, b"x")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._r)
            os.close(self._w)
