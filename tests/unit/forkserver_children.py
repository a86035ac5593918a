"""Entry points the fork server tests run in children (tests/unit/test_forkserver.py).

Each takes its arguments as a fork server passes them (what follows the program name). The
ones that report write one JSON object to the descriptor named by their first argument and
close it, so the test reads to its end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any


def _open_fds() -> list[int]:
    """This process's descriptors, without the one listing /proc/self/fd used."""
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    found = []
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue  # the directory's own, closed by now
        found.append(fd)
    return sorted(found)


def _write(fd: int, report: dict[str, Any]) -> None:
    with os.fdopen(fd, "w") as out:
        json.dump(report, out)


def report(argv: list[str]) -> int:
    """What the child holds: descriptors, environment, modules imported, ids, session."""
    fd, *modules = argv
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    with open("/proc/self/environ", "rb") as f:
        environ = f.read().decode(errors="replace")
    _write(
        int(fd),
        {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "fds": _open_fds(),
            "fd_links": {str(n): os.readlink(f"/proc/self/fd/{n}") for n in _open_fds()},
            "env": dict(os.environ),
            "proc_environ": environ,
            "preloaded": [m for m in modules if m in sys.modules],
            "argv": sys.argv,
            "sid": os.getsid(0),
            "cwd": os.getcwd(),
            "umask": os.umask(0),
            "comm": comm,
            "native_id": threading.get_native_id(),
            "sigint": repr(signal.getsignal(signal.SIGINT)),
            "sigterm": repr(signal.getsignal(signal.SIGTERM)),
            "stdio": [s is not None for s in (sys.stdin, sys.stdout, sys.stderr)],
            # Differs between two interpreters unless PYTHONHASHSEED fixes it; equal in forks.
            "str_hash": hash("hyper"),
        },
    )
    return 0


def exit_with(argv: list[str]) -> int:
    """Exit with the status given (the request's order, checked by the requester)."""
    return int(argv[0])


def fail(argv: list[str]) -> None:
    raise RuntimeError("this child fails on purpose")


def echo(argv: list[str]) -> int:
    """Copy stdin to stdout in upper case, then report on stderr."""
    data = sys.stdin.read()
    sys.stdout.write(data.upper())
    sys.stdout.flush()
    print("echoed", file=sys.stderr)
    return 0


def wait_for_eof(argv: list[str]) -> int:
    """Say it runs (a byte on the descriptor named), then wait until stdin ends."""
    os.write(int(argv[0]), b"r")
    os.close(int(argv[0]))
    sys.stdin.buffer.read()
    return 0


def threads_and_fork(argv: list[str]) -> int:
    """A child can do what a normal process does: start threads, fork, run a program."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    thread.start()
    thread.join()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    ran = subprocess.run(["/bin/sh", "-c", "exit 3"], check=False)
    ok = len(seen) == 1 and seen[0] != os.getpid()
    ok = ok and os.waitstatus_to_exitcode(status) == 7 and ran.returncode == 3
    return 0 if ok else 1


def start_server_and_report(argv: list[str]) -> int:
    """Used as a requester of its own: start a fork server, say its pid, wait to be killed."""
    from channels.forkserver import ForkServer

    server = ForkServer.start([], fork=argv[1] == "fork")
    server.wait_ready()
    os.write(int(argv[0]), f"{server.pid}\n".encode())
    signal.pause()
    return 0


if __name__ == "__main__":
    start_server_and_report(sys.argv[1:])
