"""A frontend's FUSE server: the child that serves one device's mount, and the lines the frontend
and it exchange (blkfront's disk, domu/blkfront/server.py; p9front's share, domu/p9front/fs.py).

The frontend forks it from the kernel's fork server (domu/spawn.py) and writes its parameters
as one JSON line on its stdin. The server answers on its stdout, one word per line: ``mounted``
once, ``reset`` after each ring reset (blkfront after a backend restart), ``broken <reason>``
when the backend broke the protocol. A ``reset`` line on its stdin asks it to start its ring
over; its stdin closing asks it to unmount and exit; its stdout closing means it ended. A server
that broke or ended without being asked makes the device fatal, as a Linux frontend's
``xenbus_dev_fatal``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from typing import Any

from channels import linux
from channels.forkserver import Child
from channels.xenbus_bus import XenbusDevice
from domu.spawn import spawner

#: How long a server may take to mount, or to reset its ring, before the device fails.
MOUNT_TIMEOUT = 10.0
#: How long a server asked to stop may take to unmount before it is killed.
STOP_TIMEOUT = 5.0


class FuseServer:
    """One device's running FUSE server; ``what`` names the device in its fatal errors."""

    def __init__(self, dev: XenbusDevice, what: str, entry: str, params: dict[str, Any]) -> None:
        self.dev, self.what = dev, what
        self._mounted = threading.Event()
        self._reset = threading.Event()
        self._stopping = False
        self.child: Child = spawner.server().spawn(
            entry, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._send(json.dumps(params))
        threading.Thread(target=self._watch, name=f"fuse-{what}", daemon=True).start()

    def wait_mounted(self, mountpoint: str) -> None:
        if not self._mounted.wait(MOUNT_TIMEOUT):
            raise TimeoutError(f"the FUSE server did not mount {mountpoint}")

    def reset(self, mountpoint: str) -> None:
        """Have the server start its ring over, replaying what the backend had not answered."""
        self._reset.clear()
        self._send("reset")
        if not self._reset.wait(MOUNT_TIMEOUT):
            raise TimeoutError(f"the FUSE server of {mountpoint} did not reset its ring")

    def stop(self, mountpoint: str) -> None:
        """Ask the server to unmount and exit, kill it if it does not, and detach a mount a
        server that died left behind."""
        self._stopping = True
        with contextlib.suppress(OSError):
            assert self.child.stdin is not None
            self.child.stdin.close()
        try:
            self.child.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        with contextlib.suppress(OSError):  # EINVAL: not a mount point, the usual case
            linux.umount(mountpoint, linux.MNT_DETACH)

    def _send(self, line: str) -> None:
        assert self.child.stdin is not None
        self.child.stdin.write(line.encode() + b"\n")
        self.child.stdin.flush()

    def _watch(self) -> None:
        assert self.child.stdout is not None
        for raw in self.child.stdout:
            line = raw.decode(errors="replace").strip()
            if line == "mounted":
                self._mounted.set()
            elif line == "reset":
                self._reset.set()
            elif line.startswith("broken "):
                self.dev.fatal(f"{self.what}: backend misbehaved: {line[len('broken ') :]}")
        if not self._stopping:  # it ended without being asked to: the device is gone
            self.dev.fatal(f"{self.what}: the FUSE server ended")
