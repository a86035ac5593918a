"""A hostile domU kernel that turns on hyperd: floods its log, loops on hypercalls.

``python -m tests.hostile_kernel {log,hypercalls} --fd N --seconds S``, run as the domain's
kernel would be (tests/integration/conftest.py's ``as_kernel``: root of the domain's user
namespace, in its namespaces and cgroup) while the real kernel, pid 1 of the domain, is
stopped, with a duplicate of the kernel's own descriptor ``N`` (``steal`` takes it, from the
host: the kernel's memory was made by a host-root exec, so nothing in the domain may ptrace
it, but the kernel itself, were it hostile, holds it):

- ``log``: writes to the kernel's output (hyperd's end is ``dom<N>.log``) as fast as it can;
- ``hypercalls``: calls ``evtchn_alloc_unbound`` then ``evtchn_close`` on the kernel's hypercall
  socket, each answered before the next, as fast as hyperd answers.

After S seconds it prints one line, ``log bytes=<n> seconds=<t>`` or ``hypercalls calls=<n>
seconds=<t>``, and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import time

from hyperd.domain import BOOT_HYPERCALL_FD

_SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64
_libc = ctypes.CDLL(None, use_errno=True)


def steal(pid: int, fd: int) -> int:
    """A duplicate of process ``pid``'s descriptor ``fd`` (pidfd_getfd: ptrace access)."""
    pidfd = os.pidfd_open(pid)
    try:
        stolen = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if stolen < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd {pid} {fd}")
        return int(stolen)
    finally:
        os.close(pidfd)


def kernel_fds(kernel_pid: int) -> dict[str, int]:
    """Which of the kernel's descriptors is what: its output, and its hypercall socket (where
    hyperd put the boot process's, which the kernel inherited)."""
    return {"log": 2, "hypercalls": BOOT_HYPERCALL_FD}


def flood_log(out: int, seconds: float) -> str:
    line = b"hostile kernel: " + b"x" * 4000 + b"\n"
    written = 0
    end = time.monotonic() + seconds
    sock = socket.socket(fileno=out)
    while time.monotonic() < end:
        try:  # past what hyperd reads, try again (the kernel's own writes stay blocking)
            written += sock.send(line, socket.MSG_DONTWAIT)
        except BlockingIOError:
            time.sleep(0.001)
    return f"log bytes={written} seconds={seconds}"


def loop_hypercalls(fd: int, seconds: float) -> str:
    sock = socket.socket(fileno=fd)
    sock.settimeout(30)
    calls = 0
    ids = iter(range(1 << 30, 1 << 31))

    def call(op: str, **args: object) -> dict[str, object]:
        nonlocal calls
        req_id = next(ids)
        sock.send(json.dumps({"id": req_id, "op": op, "args": args}).encode())
        while True:  # skip a reply the kernel's own calls left unread
            reply = json.loads(sock.recv(1 << 18))
            if reply.get("id") == req_id:
                calls += 1
                return dict(reply)

    start = time.monotonic()
    while time.monotonic() - start < seconds:
        port = call("evtchn_alloc_unbound", remote_dom=0)["result"]["port"]  # type: ignore[index]
        call("evtchn_close", port=port)
    return f"hypercalls calls={calls} seconds={time.monotonic() - start:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.hostile_kernel")
    parser.add_argument("attack", choices=("log", "hypercalls"))
    parser.add_argument("--fd", type=int, required=True, help="the kernel's descriptor")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    attack = flood_log if args.attack == "log" else loop_hypercalls
    print(attack(args.fd, args.seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
