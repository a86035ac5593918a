"""The toolstack control protocol between `hyperctl` and dom0, over a root-only Unix socket.

One request per connection, as a JSON line; one reply line:

    -> {"method": "destroy", "params": {"domain": "web"}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "no domain named 'web'", "lines": [...], "usage": false}

``lines`` carries one line per problem when the request itself was bad (a config error, a
duplicate name): the CLI prints them and exits with status 2 (``usage`` true). Streaming methods
(``console``, ``store_watch``) keep the connection open after an ``ok`` reply: the console
carries raw terminal bytes both ways, a store watch sends one JSON line per event.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

MAX_LINE = 1 << 20


class ControlError(Exception):
    """The toolstack refused a request; ``lines`` are user-facing, one problem each."""

    def __init__(self, message: str, lines: list[str] | None = None, usage: bool = False) -> None:
        super().__init__(message)
        self.lines = lines or [message]
        self.usage = usage


class NotRunning(ControlError):
    """No toolstack answers on the socket: the hypervisor is not running."""


def read_line(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """One line from ``sock`` (without the newline); None at end of stream."""
    while b"\n" not in buffer:
        if len(buffer) > MAX_LINE:
            raise ControlError("message too large")
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


class Connection:
    """The client side: one request, then the reply or a stream."""

    def __init__(self, path: Path, timeout: float | None = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = bytearray()
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NotRunning("the hypervisor is not running (no toolstack socket)") from exc

    def request(self, method: str, /, **params: Any) -> Any:
        send_json(self.sock, {"method": method, "params": params})
        line = read_line(self.sock, self.buffer)
        if line is None:
            raise ControlError(f"{method}: the toolstack closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(
                reply.get("error", "failed"), reply.get("lines"), bool(reply.get("usage"))
            )
        return reply.get("result")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(socket_path: Path, method: str, /, timeout: float | None = 120.0, **params: Any) -> Any:
    with Connection(socket_path, timeout) as conn:
        return conn.request(method, **params)
