"""The control socket: where `hyperctl` reaches the toolstack (channels/control.py is its wire).

``ControlServer`` owns the root-only Unix socket, decodes one request per connection and
answers it through a table keyed by request type: the toolstack's operations (dom0/toolstack.py)
and the store browser (dom0/storeview.py). A streaming request (a console, a store watch) keeps
its connection, served here until the client hangs up. A request that fails answers with its
error's kind; one that breaks unexpectedly is logged and answered as an internal error, and the
server goes on serving the others.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from channels import control
from channels.control import MAX_LINE, error_reply, read_line, send_json
from channels.errors import HyperError, NotAllowed, NotFound
from channels.paths import listen_root_only
from dom0.capture import open_tap_socket, stream_pcap
from dom0.storeview import StoreView
from dom0.toolstack import Toolstack

log = logging.getLogger(__name__)

CONSOLE_CLIENT_TIMEOUT = 2.0
TRACE_BACKLOG = 10_000  # trace records waiting for a slow client; more are counted as lost

#: Answers a request with the reply's result.
Handler = Callable[[Any], Any]
#: Serves a streaming request on its connection (``buffer``: what the client sent past the
#: request line).
StreamHandler = Callable[[socket.socket, bytearray, Any], None]


class ControlServer:
    def __init__(
        self, socket_path: Path, toolstack: Toolstack, store: StoreView, stopped: threading.Event
    ) -> None:
        """``stopped`` is dom0's: the server accepts until it is set, and ``close`` sets it."""
        self.socket_path = socket_path
        self.toolstack = toolstack
        self.store = store
        self.stopped = stopped
        self._listener: socket.socket | None = None
        self._handlers = self._request_table()
        self._streams = self._stream_table()

    def serve(self) -> None:
        listener = listen_root_only(self.socket_path, socket.SOCK_STREAM, 64)
        self._listener = listener
        while not self.stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_client, args=(client,), daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        if self._listener is not None:
            self._listener.close()
            self.socket_path.unlink(missing_ok=True)

    def _serve_client(self, client: socket.socket) -> None:
        with client:
            if not _peer_is_root(client):
                send_json(client, error_reply(NotAllowed("permission denied: root only")))
                return
            client.settimeout(30.0)
            buffer = bytearray()
            try:
                line = read_line(client, buffer)
                if line is None:
                    return
                request = control.decode_request(line)
            except HyperError as exc:
                send_json(client, error_reply(exc))
                return
            except OSError:
                return
            client.settimeout(None)
            try:
                if request.streaming:
                    self._streams[type(request)](client, buffer, request)
                    return
                result = self._handlers[type(request)](request)
                send_json(client, {"ok": True, "result": result})
            except HyperError as exc:
                send_json(client, error_reply(exc))
            except OSError:
                pass  # the client went away
            except Exception as exc:
                log.exception("control request %s failed", request.method)
                failed = HyperError(f"{request.method}: internal error: {exc}")
                send_json(client, error_reply(failed))

    def _request_table(self) -> dict[type[control.Request], Handler]:
        """Which method answers each request (a test checks that every request has one)."""
        ts, store = self.toolstack, self.store
        return {
            control.Create: ts.create,
            control.List: lambda req: ts.list_domains(),
            control.Destroy: lambda req: ts.destroy(req.domain),
            control.Shutdown: lambda req: ts.shutdown(req.domain, req.wait, req.grace),
            control.Reboot: lambda req: ts.reboot(req.domain),
            control.Pause: lambda req: ts.pause(req.domain),
            control.Unpause: lambda req: ts.unpause(req.domain),
            control.ExecTarget: lambda req: ts.exec_target(req.domain),
            control.SchedCredit: lambda req: ts.sched_credit(req.domain, req.cpu_weight, req.cap),
            control.MemSet: lambda req: ts.mem_set(req.domain, req.memory),
            control.Info: lambda req: ts.host_info(),
            control.Dmesg: lambda req: ts.dmesg(req.clear),
            control.Halt: lambda req: ts.halt(),
            control.StoreLs: lambda req: store.ls(req.path),
            control.StoreRead: lambda req: store.read(req.path),
            control.StoreWrite: lambda req: store.write(req.path, req.value),
            control.StoreRm: lambda req: store.rm(req.path),
            control.DeviceAttach: ts.device_attach,
            control.DeviceDetach: ts.device_detach,
            control.DeviceList: ts.device_list,
            control.DeviceStats: ts.device_stats,
            control.FaultSet: ts.fault_set,
            control.FaultList: lambda req: ts.fault_list(req.domain),
        }

    def _stream_table(self) -> dict[type[control.Request], StreamHandler]:
        """Which method serves each streaming request."""
        return {
            control.Console: lambda client, buffer, req: self.console(client, buffer, req.domain),
            control.StoreWatch: lambda client, buffer, req: self.store_watch(
                client, buffer, req.path
            ),
            control.Capture: lambda client, buffer, req: self.capture(client, req),
            control.Trace: lambda client, buffer, req: self.trace(client, req),
        }

    # -- streaming requests -------------------------------------------------------------------

    def console(self, client: socket.socket, buffer: bytearray, domain: str) -> None:
        """A running domU: attach to its console until the client hangs up."""
        domid, console = self.toolstack.console_of(domain)
        send_json(client, {"ok": True, "result": {"domid": domid}})
        client.sendall(console.history())
        # A client that stops reading (a paused pager) is dropped after this long, rather than
        # stalling the console ring for the domain: the ring thread sends to every client.
        client.settimeout(CONSOLE_CLIENT_TIMEOUT)
        console.attach(client)
        try:
            if buffer:
                console.to_guest(bytes(buffer))
            while True:
                try:
                    data = client.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    break
                console.to_guest(data)
        finally:
            console.detach(client)

    def store_watch(self, client: socket.socket, buffer: bytearray, path: str) -> None:
        """Always allowed (as dom0): one JSON line per event until the client hangs up."""
        watch = self.store.watch(path)
        send_json(client, {"ok": True, "result": {}})
        gone = threading.Event()

        def hangup() -> None:
            try:
                while client.recv(MAX_LINE):
                    pass
            except OSError:
                pass
            gone.set()

        threading.Thread(target=hangup, daemon=True).start()
        try:
            while not gone.is_set():
                try:
                    event = watch.get(timeout=0.5)
                except TimeoutError:
                    continue
                send_json(client, {"path": event.path, "token": event.token})
        except OSError:
            pass
        finally:
            watch.unwatch()

    def capture(self, client: socket.socket, req: control.Capture) -> None:
        """A running domU's vif: its frames as a pcap stream (dom0/capture.py)."""
        tap, netns_pid = self.toolstack.capture_target(req.domain, req.device)
        try:
            sock = open_tap_socket(tap, netns_pid)
        except OSError as exc:
            raise NotFound(f"capture: {req.device}: no interface {tap}: {exc.strerror}") from exc
        with sock:
            send_json(client, {"ok": True, "result": {"interface": tap}})
            stream_pcap(sock, client, req.count, req.duration)

    def trace(self, client: socket.socket, req: control.Trace) -> None:
        """A running domU's disk dom0 serves: one JSON line per request and response blkback
        handles (backends/blkback/datapath.py's trace records) until the client hangs up, or
        ``count`` responses or ``duration`` seconds have passed. Records the client is too slow
        for are dropped past TRACE_BACKLOG, and counted in a last ``lost`` record."""
        path = self.toolstack.trace_target(req.domain, req.device)
        records: queue.Queue[dict[str, Any] | None] = queue.Queue(TRACE_BACKLOG)
        lost = 0

        def sink(record: dict[str, Any]) -> None:
            nonlocal lost
            try:
                records.put_nowait(record)
            except queue.Full:
                lost += 1

        gone = threading.Event()

        def hangup() -> None:
            with contextlib.suppress(OSError):
                while client.recv(MAX_LINE):
                    pass
            gone.set()
            with contextlib.suppress(queue.Full):  # full: the loop sees ``gone`` as it drains
                records.put_nowait(None)

        stop = path.trace(sink)
        watcher = threading.Thread(target=hangup, name="trace-hangup", daemon=True)
        try:
            send_json(client, {"ok": True, "result": {}})
            watcher.start()
            deadline = time.monotonic() + req.duration if req.duration else None
            responses = 0
            while (not req.count or responses < req.count) and not gone.is_set():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    break
                try:
                    record = records.get(timeout=wait)
                except queue.Empty:
                    break
                if record is None:
                    return
                send_json(client, record)
                responses += record.get("ev") == "rsp"
            if lost:
                send_json(client, {"ev": "lost", "count": lost})
        finally:
            stop()
            # The end of the stream: the client sees it, and the hang-up watcher wakes from its
            # recv (closing the socket alone would not wake it).
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            if watcher.is_alive():
                watcher.join(timeout=5.0)


def _peer_is_root(client: socket.socket) -> bool:
    creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    uid = int.from_bytes(creds[4:8], "little")
    return uid == 0
