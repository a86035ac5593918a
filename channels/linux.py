"""The Linux system calls Python 3.11's os module lacks: namespaces, mounts, prctl; and a
``recv_fds`` that honours its flags.

Everything here is a thin ctypes wrapper that raises OSError with errno, so callers handle
failures exactly as they would for os.* calls. Only the sandbox builder and the hypervisor's
spawn path use these; nothing else in hyper touches namespaces or mounts.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import os
import socket
from collections.abc import Iterable

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2

# <linux/mount.h>: mount_setattr(2)
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
_SYS_MOUNT_SETATTR = 442  # x86_64 and aarch64 share this number (new syscall table)
_SYS_PIVOT_ROOT = 155 if os.uname().machine == "x86_64" else 41

# <linux/openat2.h>
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    result = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(result, f"mount {source or fstype} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    result = _libc.syscall(
        ctypes.c_long(_SYS_PIVOT_ROOT), os.fsencode(new_root), os.fsencode(put_old)
    )
    _check(result, f"pivot_root {new_root}")


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def mount_setattr(path: str, *, set_: int = 0, clear: int = 0, recursive: bool = False) -> None:
    """Change mount attributes, optionally for a whole subtree in one call (Linux >= 5.12)."""
    attr = _MountAttr(set_, clear, 0, 0)
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(-100),  # AT_FDCWD
        os.fsencode(path),
        ctypes.c_uint(AT_RECURSIVE if recursive else 0),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, f"mount_setattr {path}")


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """open(2) of ``path`` below ``dirfd``, its lookup restricted by ``resolve`` (RESOLVE_*;
    Linux >= 5.6): the way to open a file inside another root without following its links.
    ``mode`` is for O_CREAT and O_TMPFILE (the kernel refuses it otherwise)."""
    how = _OpenHow(flags, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
    result = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(result)


def prctl(option: int, arg: int = 0) -> None:
    _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        f"prctl {option}",
    )


def set_comm(name: str) -> None:
    """The name ps shows for this process (at most 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(
        _libc.prctl(
            ctypes.c_int(PR_SET_NAME), buf, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        ),
        "prctl PR_SET_NAME",
    )


def recv_fds(
    sock: socket.socket, size: int, most_fds: int, flags: int = 0
) -> tuple[bytes, list[int]]:
    """One message of up to ``size`` bytes and the descriptors it carried, up to ``most_fds``
    (the kernel closes any beyond, and all of them when ``most_fds`` is 0), received
    close-on-exec. ``socket.recv_fds`` would do, but Python 3.11's drops its ``flags``: a
    MSG_PEEK through it consumes the message, and MSG_CMSG_CLOEXEC is lost."""
    fds = array.array("i")
    room = socket.CMSG_SPACE(most_fds * fds.itemsize) if most_fds else 0
    data, ancillary, _, _ = sock.recvmsg(size, room, flags | socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def close_fds(fds: Iterable[int]) -> None:
    """Close each of ``fds``; one already closed is no error."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
