"""Where hyper keeps its runtime state on the host (all of it under one root-only directory)."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = Path(os.environ.get("HYPER_RUN_DIR", "/run/hyper"))
#: Logs outlive the hypervisor (a halt or a crash is when you want them).
DEFAULT_LOG_DIR = Path(os.environ.get("HYPER_LOG_DIR", "/var/log/hyper"))


@dataclass(frozen=True)
class RunDir:
    root: Path = DEFAULT_RUN_DIR
    logs: Path = DEFAULT_LOG_DIR

    @property
    def pidfile(self) -> Path:
        return self.root / "hyperd.pid"

    @property
    def toolstack_socket(self) -> Path:
        return self.root / "toolstack.sock"

    @property
    def keeper_socket(self) -> Path:
        """Where the fd keeper (hyperd/keeper.py) listens for hyperd, root only."""
        return self.root / "keeper.sock"

    @property
    def store_dir(self) -> Path:
        """The store's directory: its socket when dom0 runs it, its journal when the stub
        domain does (that domain's kernel's alone, then)."""
        return self.root / "xenstored"

    @property
    def store_socket(self) -> Path:
        """Where dom0 serves the store to the host's root, as xenstored serves
        ``/run/xenstored/socket``: Xen's xenstore tools reach it with ``XENSTORED_PATH``."""
        return self.store_dir / "socket"

    @property
    def state_file(self) -> Path:
        """hyperd's tables, rewritten after every change, for a restarted hyperd to adopt."""
        return self.root / "hyperd.state"

    @property
    def rootfs(self) -> Path:
        """An empty directory each domain's boot process mounts its sandbox root on (privately)."""
        return self.root / "rootfs"

    def hyperd_alive(self) -> bool:
        """A hyperd holds the pidfile's lock (it takes it for its whole life)."""
        try:
            fd = os.open(self.pidfile, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        # Traversable but not listable: boot processes need to reach rootfs, nothing else.
        self.rootfs.mkdir(mode=0o755, exist_ok=True)
        self.logs.mkdir(mode=0o700, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def listen_root_only(path: Path, kind: socket.SocketKind, backlog: int) -> socket.socket:
    """A Unix socket listening at ``path`` (a stale socket file there replaced), mode 0600 from
    the moment it exists: bound under a umask, never chmod-ed after (no window where another
    user could connect). The control socket and the fd keeper's."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, kind)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(backlog)
    return listener
