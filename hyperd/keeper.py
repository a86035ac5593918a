"""The fd keeper: holds hyperd's end of every domain's hypercall socket, so that a killed hyperd
is a pause and not the end of the hypervisor.

A domain's hypercall socket is a SOCK_SEQPACKET pair. If hyperd's end closed with hyperd, every
domain would read EOF, and dom0 treats that as the hypervisor gone and stops. The keeper, a tiny
process of the hypervisor's trusted base, holds a duplicate of each of hyperd's ends: hyperd
hands it each one as it creates it and tells it to drop one when the domain is destroyed. While
no hyperd runs, a domain's calls queue in the kernel and wait; the next hyperd gets every end
back and answers them.

Protocol: one SOCK_SEQPACKET connection from hyperd to ``keeper.sock`` in the run directory
(channels/paths.py), mode 0600; each side checks with SO_PEERCRED that the other runs as its own
uid (root, as hyperd runs). One JSON object per message:

    {"op": "put", "name": "hc.3"}  with one fd (SCM_RIGHTS): keep it, replacing any of that name
    {"op": "drop", "name": "hc.3"}                           close it
    {"op": "get"}   answered by {"names": [...], "last": bool} with those fds, in batches
    {"op": "exit"}                                           close everything and exit

No message is acknowledged: an fd in flight is already held by the kernel, and the keeper reads
in order, so a hyperd killed just after sending loses nothing. A new connection replaces the
current one (hyperd's pidfile lock lets only one run).

Lifetime: the first hyperd of a run starts it in a session of its own, outside every domain's
cgroup, so neither a kill of hyperd nor the destruction of a domain reaches it. It exits when
told to (a clean halt, ``hyperctl cleanup``), or when no hyperd is connected and every socket it
holds has hung up (every domain is dead, so nothing is left to keep).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from channels import linux
from channels.errors import HyperError
from channels.forkserver import Child, ChildSetup, Spawner
from channels.paths import listen_root_only
from channels.waiting import readable

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
GET_BATCH = 200  # fds per message; the kernel allows 253 (SCM_MAX_FD)
CONNECT_TIMEOUT = 10.0
START_TIMEOUT = 10.0
_HUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


class KeeperError(HyperError):
    """No keeper answers, or it broke the protocol; the message names the socket."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _receive(sock: socket.socket, maxfds: int) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; (None, []) at end of stream. A message that is not a JSON
    object comes back as {}."""
    data, fds = linux.recv_fds(sock, MAX_MESSAGE, maxfds)
    if not data:
        linux.close_fds(fds)
        return None, []
    try:
        message = json.loads(data)
    except ValueError:
        message = {}
    return (message if isinstance(message, dict) else {}), fds


# -- the keeper process --------------------------------------------------------------------------


class Keeper:
    """The keeper's loop: one listening socket, at most one hyperd, and the fds it holds."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.held: dict[str, int] = {}
        self.hung_up: set[int] = set()  # held fds whose domain end has closed
        self.client: socket.socket | None = None
        self.served = False  # a hyperd has connected at least once
        self.poll = select.poll()
        self.poll.register(listener, select.POLLIN)

    def run(self) -> None:
        while self.client is not None or self._anything_live() or not self.served:
            # The hyperd that started us connects at once; if it died first, do not linger.
            ready = self.poll.poll(None if self.served else START_TIMEOUT * 1000)
            if not ready and not self.served:
                log.warning("no hyperd connected in %.0f s", START_TIMEOUT)
                return
            for fd, events in ready:
                if fd == self.listener.fileno():
                    self._accept()
                elif self.client is not None and fd == self.client.fileno():
                    if not self._on_client():
                        return
                elif events & _HUP and self._newly_hung_up(fd):
                    # Registered for no event at all: only a hang-up wakes us. Not polled again
                    # (a hung-up socket stays ready), but kept: the next hyperd may still read
                    # the domain's last calls from it.
                    self.poll.unregister(fd)
                    self.hung_up.add(fd)
        log.info("no hyperd and no live domain: nothing left to keep")

    def close(self) -> None:
        linux.close_fds(list(self.held.values()))
        self.held.clear()
        if self.client is not None:
            self.client.close()
        self.listener.close()

    def _newly_hung_up(self, fd: int) -> bool:
        """Asked again: this round may have closed the fd the event was about and reused its
        number for a newly kept socket."""
        if fd not in self.held.values() or fd in self.hung_up:
            return False
        probe = select.poll()
        probe.register(fd, 0)
        return any(events & _HUP for _, events in probe.poll(0))

    def _anything_live(self) -> bool:
        return any(fd not in self.hung_up for fd in self.held.values())

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
            pid, uid, _ = peer_credentials(conn)
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        if uid != os.geteuid():
            log.warning("refused a connection from pid %d (uid %d)", pid, uid)
            conn.close()
            return
        if self.client is not None:
            log.info("a new hyperd (pid %d) replaces the previous connection", pid)
            self._drain_client()
            self._drop_client()
        self.client = conn
        self.served = True
        self.poll.register(conn, select.POLLIN)

    def _drain_client(self) -> None:
        """Take in what a replaced hyperd sent before it died: a put it sent just before a kill
        may still be queued behind the new hyperd's connection."""
        assert self.client is not None
        self.client.setblocking(False)
        while True:
            try:
                message, fds = _receive(self.client, 1)
            except OSError:
                return
            if message is None:
                return
            if message.get("op") in ("put", "drop"):
                self._apply(message, fds)
            linux.close_fds(fds)

    def _drop_client(self) -> None:
        assert self.client is not None
        self.poll.unregister(self.client)
        self.client.close()
        self.client = None

    def _on_client(self) -> bool:
        """Handle one message from hyperd; False when told to exit."""
        assert self.client is not None
        try:
            message, fds = _receive(self.client, 1)
        except OSError:
            message, fds = None, []
        if message is None:
            log.info("hyperd's connection ended; keeping %d sockets", len(self.held))
            self._drop_client()
            return True
        op = message.get("op")
        if op in ("put", "drop"):
            self._apply(message, fds)
        elif op == "get":
            try:
                self._hand_over()
            except OSError as exc:
                log.warning("hand-over failed: %s", exc)
                self._drop_client()
        elif op == "exit":
            linux.close_fds(fds)
            return False
        else:
            log.warning("ignored a bad message %r", str(message)[:80])
        linux.close_fds(fds)
        return True

    def _apply(self, message: dict[str, Any], fds: list[int]) -> None:
        """A put (taking its fd out of ``fds``) or a drop."""
        name = str(message.get("name"))
        self._forget(name)
        if message.get("op") == "put" and len(fds) == 1:
            self.held[name] = fds.pop()
            self.poll.register(self.held[name], 0)

    def _forget(self, name: str) -> None:
        fd = self.held.pop(name, None)
        if fd is None:
            return
        if fd in self.hung_up:
            self.hung_up.discard(fd)
        else:
            self.poll.unregister(fd)
        os.close(fd)

    def _hand_over(self) -> None:
        assert self.client is not None
        names = sorted(self.held)
        for start in range(0, max(len(names), 1), GET_BATCH):
            batch = names[start : start + GET_BATCH]
            last = start + GET_BATCH >= len(names)
            _send(self.client, {"names": batch, "last": last}, [self.held[n] for n in batch])


def listen(path: Path) -> socket.socket:
    """The keeper's listening socket at ``path``, mode 0600 (any stale socket file replaced)."""
    return listen_root_only(path, socket.SOCK_SEQPACKET, 8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperd.keeper", description="hyperd's fd keeper")
    parser.add_argument("--socket", type=Path, required=True, help="where to listen for hyperd")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper %(process)d: %(message)s")
    # hyperd may be killed at any time: writing to a pipe it left must not kill the keeper.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keeper = Keeper(listen(args.socket))
    inode = args.socket.stat().st_ino
    # Ready: whoever started us reads this line (then the pipe is closed for good).
    os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    log.info("listening on %s", args.socket)
    try:
        keeper.run()
    finally:
        keeper.close()
        with contextlib.suppress(OSError):
            # Only our own socket file: a newer keeper may have replaced it.
            if args.socket.stat().st_ino == inode:
                args.socket.unlink()
    log.info("exiting")
    return 0


# -- hyperd's side -------------------------------------------------------------------------------


class KeeperClient:
    """hyperd's connection to the keeper."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        pid, uid, _ = peer_credentials(sock)
        if uid != os.geteuid():
            sock.close()
            raise KeeperError(f"{path}: the process listening there runs as uid {uid}")
        self.pid = pid
        self.process: Child | None = None  # set when we started it
        self.pidfd: int | None
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = None

    @classmethod
    def connect(cls, path: Path, timeout: float = CONNECT_TIMEOUT) -> KeeperClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise KeeperError(f"no fd keeper answers on {path}: {exc.strerror or exc}") from exc
        return cls(sock, path)

    def put(self, name: str, fd: int) -> None:
        """Keep a duplicate of ``fd`` under ``name`` (replacing any)."""
        _send(self.sock, {"op": "put", "name": name}, [fd])

    def drop(self, name: str) -> None:
        _send(self.sock, {"op": "drop", "name": name})

    def fetch(self) -> dict[str, socket.socket]:
        """Every socket the keeper holds, by name (duplicates: it keeps its own)."""
        found: dict[str, socket.socket] = {}
        try:
            _send(self.sock, {"op": "get"})
            while True:
                message, fds = _receive(self.sock, GET_BATCH)
                if message is None:
                    raise KeeperError(f"{self.path}: the keeper hung up during a hand-over")
                names = message.get("names")
                if not isinstance(names, list) or len(names) != len(fds):
                    linux.close_fds(fds)
                    raise KeeperError(f"{self.path}: a bad hand-over message")
                for name, fd in zip(names, fds, strict=True):
                    found[str(name)] = socket.socket(fileno=fd)
                if message.get("last"):
                    return found
        except OSError as exc:
            for sock in found.values():
                sock.close()
            raise KeeperError(f"{self.path}: hand-over failed: {exc}") from exc
        except KeeperError:
            for sock in found.values():
                sock.close()
            raise

    def exit(self, timeout: float = 5.0) -> None:
        """Tell the keeper to close everything and exit; kill it if it has not after
        ``timeout`` seconds. Returns once it is gone."""
        with contextlib.suppress(OSError):
            _send(self.sock, {"op": "exit"})
        if self.pidfd is not None and not _wait_pidfd(self.pidfd, timeout):
            log.warning("the fd keeper (pid %d) did not exit; killing it", self.pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            _wait_pidfd(self.pidfd, timeout)
        if self.process is not None:  # our child: collect it (hyperd's _reap may have)
            self.process.wait()
        self.close()

    def close(self) -> None:
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """True once the process is dead (a pidfd becomes readable when it exits)."""
    return bool(readable([pidfd], timeout))


def start(path: Path, spawner: Spawner, log_path: Path | None = None) -> Child:
    """Start a keeper listening on ``path``, in a session of its own (it outlives hyperd);
    returns once it listens. Its log goes to ``log_path`` (appended), or nowhere."""
    with open(log_path or os.devnull, "ab") as out:
        proc = spawner.server().spawn(
            "hyperd.keeper:main",
            ["--socket", str(path)],
            env=dict(os.environ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=out,
            setup=ChildSetup(cwd="/", new_session=True, comm="hyper-keeper"),
        )
    assert proc.stdout is not None
    line = proc.stdout.readline() if readable([proc.stdout.fileno()], START_TIMEOUT) else b""
    proc.stdout.close()
    if line != b"ready\n":
        proc.kill()
        proc.wait()
        raise KeeperError(f"the fd keeper did not start on {path}")
    return proc


def connect_or_start(path: Path, spawner: Spawner, log_path: Path | None = None) -> KeeperClient:
    """The running keeper, or a new one."""
    try:
        return KeeperClient.connect(path)
    except KeeperError:
        pass
    process = start(path, spawner, log_path)
    client = KeeperClient.connect(path)
    client.process = process
    return client


def stop(path: Path) -> int | None:
    """Stop the keeper on ``path`` if one answers (``hyperctl cleanup``); its pid, or None."""
    try:
        client = KeeperClient.connect(path, timeout=2.0)
    except KeeperError:
        return None
    pid = client.pid
    client.exit()
    return pid


if __name__ == "__main__":
    sys.exit(main())
