"""blkback's native driver: the kernel's loop device over an image file.

``attach`` finds a free loop device (``LOOP_CTL_GET_FREE`` on /dev/loop-control) and configures
it over the image in one ioctl (``LOOP_CONFIGURE``): direct I/O to the image (no second copy of
the data in dom0's page cache), read-only for an ``ro`` disk, and **autoclear**, so the kernel
detaches the device when its last file descriptor closes. blkback holds that descriptor for
as long as the vbd exists; however dom0 or its worker ends (cleanly, or killed), no loop
device outlives them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from channels import images
from channels.errors import HyperError

log = logging.getLogger(__name__)

LOOP_MAJOR = 7
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64

# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
# struct loop_info64 { u64 device, inode, rdevice, offset, sizelimit; u32 number, encrypt_type,
#                      encrypt_key_size, flags; u8 file_name[64], crypt_name[64],
#                      encrypt_key[32]; u64 init[2]; }
LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q8Q")

SECTOR_SIZE = 512
ATTACH_TRIES = 8
#: How long close() waits for the kernel's detach after the last close, and how often it looks.
DETACH_TIMEOUT = 2.0
DETACH_POLL = 0.01


class LoopError(HyperError):
    """The image cannot be attached to a loop device."""


@dataclass
class LoopDevice:
    """An attached loop device: ``fd`` keeps it alive (autoclear)."""

    path: str
    fd: int
    sectors: int
    readonly: bool

    def close(self) -> None:
        """Close our descriptor; the kernel detaches the device once no one else has it open.
        Linux runs that detach after the last close returns (a work item): wait for it, a
        little, so that a device removed is a loop device gone (a rolled-back create, say)."""
        if self.fd < 0:
            return
        backing = Path("/sys/block", Path(self.path).name, "loop", "backing_file")
        before = _read(backing)
        os.close(self.fd)
        self.fd = -1
        deadline = time.monotonic() + DETACH_TIMEOUT
        while before is not None and _read(backing) == before and time.monotonic() < deadline:
            time.sleep(DETACH_POLL)

    def hand_over(self) -> int:
        """Our descriptor, now the caller's (dom0 hands it to a driver domain's blkback through
        hyperd, then closes its own copy): the device stays attached while anyone holds it."""
        fd, self.fd = self.fd, -1
        return fd


def adopt(fd: int) -> LoopDevice:
    """The loop device behind ``fd``, which dom0 attached with its checks and handed over (a
    driver domain's blkback opens no image itself): its size and access mode are the
    descriptor's own, whatever the store says. Raises LoopError for any other descriptor; the
    caller still owns ``fd`` then."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
        raise LoopError("the descriptor handed over is not a loop device")
    readonly = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    try:
        size = _device_bytes(fd)
    except OSError as exc:
        raise LoopError(f"the loop device handed over: {exc.strerror}") from exc
    if size < SECTOR_SIZE:
        raise LoopError("the loop device handed over is not attached")
    return LoopDevice(f"/dev/loop{os.minor(st.st_rdev)}", fd, size // SECTOR_SIZE, readonly)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def attach(image: str, *, readonly: bool, owner: int, direct_io: bool = True) -> LoopDevice:
    """Attach ``image`` to a free loop device and open it for I/O (``O_DIRECT`` when
    ``direct_io``); the device's size is the image's, rounded down to whole sectors. The image
    is opened only if it passes channels/images.py's rules for a disk of ``owner``'s, checked on
    what is opened (the path may have changed since the config was validated)."""
    mode = os.O_RDONLY if readonly else os.O_RDWR
    try:
        backing = images.open_image(image, mode, owner)
    except images.ImageError as exc:
        raise LoopError(str(exc)) from exc
    try:
        st = os.fstat(backing)
        if st.st_size < SECTOR_SIZE:
            raise LoopError(f"{image}: smaller than one {SECTOR_SIZE}-byte sector")
        for _ in range(ATTACH_TRIES):
            device = _configure_free(backing, image, readonly=readonly, direct_io=direct_io)
            if device is not None:
                return device
        raise LoopError(f"{image}: no free loop device after {ATTACH_TRIES} tries")
    finally:
        os.close(backing)  # the loop device holds its own reference to the image


def _configure_free(
    backing: int, image: str, *, readonly: bool, direct_io: bool
) -> LoopDevice | None:
    """Configure the device the kernel calls free; None if another process took it first."""
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise LoopError(f"/dev/loop-control: {exc.strerror}") from exc
    try:
        number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise LoopError(f"no free loop device: {exc.strerror}") from exc
    finally:
        os.close(ctl)
    path = f"/dev/loop{number}"
    mode = os.O_RDONLY if readonly else os.O_RDWR
    try:
        fd = os.open(path, mode | os.O_CLOEXEC)
    except OSError as exc:
        raise LoopError(f"{path}: {exc.strerror}") from exc
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if readonly else 0)
    flags |= LO_FLAGS_DIRECT_IO if direct_io else 0
    name = os.fsencode(image)[: LO_NAME_SIZE - 1]
    config = LOOP_CONFIG.pack(
        backing, 0, *(0,) * 5, 0, 0, 0, flags, name, b"", b"", 0, 0, *(0,) * 8
    )
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, config)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            return None  # raced with another attach: ask for a free one again
        if exc.errno == errno.EINVAL and direct_io:
            # The image's file system cannot do direct I/O (tmpfs, for one): buffered then.
            log.info("%s: no direct I/O on this file system; attaching buffered", image)
            return _configure_free(backing, image, readonly=readonly, direct_io=False)
        raise LoopError(f"{path} over {image}: {exc.strerror}") from exc
    try:
        size = _device_bytes(fd)
        io_fd = os.open(path, mode | os.O_CLOEXEC | (os.O_DIRECT if direct_io else 0))
    except OSError as exc:
        os.close(fd)
        raise LoopError(f"{path}: {exc.strerror}") from exc
    os.close(fd)  # io_fd now holds the device
    return LoopDevice(path, io_fd, size // SECTOR_SIZE, readonly)


BLKGETSIZE64 = 0x80081272


def _device_bytes(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("=Q", buf)[0])
