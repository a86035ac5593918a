"""Host interfaces a driver domain holds (its config's ``nics``): moved into its network
namespace while it boots, before its kernel runs, and given back to the host's before it is
destroyed. Xen's assign_device and deassign, for the one native device a process domain holds.

``ip`` moves them (``ip link set dev NAME netns PID`` names a namespace by a process in it): a
handful of calls per driver domain, which would not repay pyroute2's import in hyperd.
A domain that dies by itself cannot be asked first: its namespace goes with it, and the kernel
returns a physical interface to the host's and deletes a veth.

Interfaces are given back by name, so a driver domain that turned hostile can rename what it
holds and have another interface of its making moved out instead: it is down in the host's
namespace, with no address, and whatever joined it to the domain goes with the domain's
namespace (a veth's other end, a tun's descriptors). It can keep the interfaces it was given,
which it held anyway. Moving them back by identity (an ifindex taken when given) is to do.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence

log = logging.getLogger("hyperd")

TIMEOUT = 10.0


def _ip(argv: list[str]) -> str | None:
    """Run a command; None if it worked, else what it said."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def give(names: Sequence[str], pid: int) -> str | None:
    """Move the host's interfaces ``names`` into process ``pid``'s network namespace; None, or
    why one could not go (those moved before it are brought back)."""
    moved: list[str] = []
    for name in names:
        why = _ip(["ip", "link", "set", "dev", name, "netns", str(pid)])
        if why is not None:
            take_back(moved, pid)
            return f"{name}: {why}"
        moved.append(name)
    return None


def take_back(names: Sequence[str], pid: int) -> None:
    """Move ``names`` from process ``pid``'s network namespace back into ours (the host's)."""
    for name in names:
        argv = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "link", "set", "dev", name]
        why = _ip([*argv, "netns", str(os.getpid())])
        if why is not None:
            log.warning("giving %s back to the host: %s", name, why)
