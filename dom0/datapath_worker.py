"""A backend device's data path in a process of its own, and dom0's handle on it.

dom0 negotiates a device (XenBus, event channels, the native device: a TAP, a loop device) and
then hands its data path to one worker process per device (``python -m dom0.netback.worker``,
``python -m dom0.blkback.worker``). Two reasons: CPython's GIL would otherwise serialise every
device's I/O through one interpreter, and the worker is the only process that touches the memory
the frontend shares, so a frontend that truncates its own pages to make the reader fault
(SIGBUS) brings down its own device's worker, never dom0.

The worker reads one JSON object on stdin: the device's parameters plus the numbers of the fds it
inherited: ``device_fd`` (the native device), ``control_fd`` (a socket to dom0) and
``counters_fd`` (a page of u64 counters that dom0 reads whenever it is asked). The parameters
name the frontend's domain (``frontend``), the device (``device``, ``<type>/<devid>``) and the
grant pools live for it as the worker starts (``pools``). Over the control socket, one JSON
object per line, the worker asks dom0 which of the device's grant pools are live now
(``{"id", "map_pools": {}}``: dom0 holds the hypercall socket) and reports a fatal protocol
error (``{"fatal"}``); dom0 hanging up tells it to stop. A setup the frontend broke (a ring ref
it did not grant, more pages for its device than the protocol can use, a pool it truncated) is
such an error too, reported as the worker connects (``serve_device``).

The worker runs on the frontend's pages and may be subverted, so it names nothing dom0 acts on:
dom0 answers for the device it started the worker for, never another device's pools or another
domain's, and at most ``grants.REFRESHES_PER_SECOND`` a second past a burst (each answer is a
hypercall on dom0's socket, which hyperd does not charge). A line that is not such a request
(not a JSON object, longer than ``MAX_LINE``, an unknown request) is a fatal error of the link.
After the first fatal error dom0 hangs up: the device is failing, and its worker's death is
no news.

A worker that dies unasked (killed, crashed) is restarted by its backend driver, through the
frontend (see DataPath): the device's state lives in its native device, its channel and the
frontend, not in the worker, so a new worker over a reset ring carries on.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from channels import grants
from channels import hypercall as hc
from channels.credit import Credit
from channels.gnttab import GrantError, GrantViolation
from channels.hypercall import HypercallClient, HypercallError
from channels.ring import RingBroken
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice

log = logging.getLogger(__name__)

_SOURCE_ROOT = str(Path(__file__).resolve().parents[1])
#: The longest line a worker may send dom0: a request is a few dozen bytes, a fatal report a
#: few hundred.
MAX_LINE = 4096


# -- the counter page ---------------------------------------------------------------------------


class CounterPage:
    """A device's counters as native u64s in ``buf`` (a page the worker counts in and dom0
    reads whenever asked), or in memory without a buffer. A subclass names them in ``FIELDS``,
    and each becomes an attribute: ``counters.rx_packets += 1``."""

    FIELDS: tuple[str, ...] = ()

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        for index, name in enumerate(cls.FIELDS):
            setattr(cls, name, _counter(index))

    def __init__(self, buf: memoryview | None = None) -> None:
        size = 8 * len(self.FIELDS)
        self._values = (buf if buf is not None else memoryview(bytearray(size)))[:size].cast("Q")

    @property
    def page(self) -> memoryview:
        """The counters as native u64s, in FIELDS' order (what a native pump counts in)."""
        return self._values

    def as_dict(self) -> dict[str, int]:
        return {name: int(self._values[i]) for i, name in enumerate(self.FIELDS)}

    def release(self) -> None:
        self._values.release()


def _counter(index: int) -> property:
    def get(self: CounterPage) -> int:
        return int(self._values[index])

    def put(self: CounterPage, value: int) -> None:
        self._values[index] = value

    return property(get, put)


# -- dom0's side --------------------------------------------------------------------------------


class WorkerProcess:
    """dom0's handle on one device's data-path process."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        control: socket.socket,
        counters_fd: int,
        map_pools: Callable[[], dict[str, Any]],
        on_fatal: Callable[[str], None],
        on_death: Callable[[str], None],
    ) -> None:
        self.process = process
        self.control = control
        self._page = mmap.mmap(counters_fd, mmap.PAGESIZE)
        os.close(counters_fd)
        self._map_pools = map_pools
        self._on_fatal = on_fatal
        self._on_death = on_death
        # What the worker's refreshes may cost dom0: as much as an honest mapper asks for.
        self._credit = Credit(grants.REFRESHES_PER_SECOND, grants.REFRESH_BURST)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="worker-link", daemon=True)
        self._thread.start()

    @classmethod
    def start(
        cls,
        module: str,
        params: dict[str, Any],
        device_fd: int,
        map_pools: Callable[[], dict[str, Any]],
        on_fatal: Callable[[str], None],
        on_death: Callable[[str], None],
    ) -> WorkerProcess:
        """Run ``python -m module`` with ``params`` and the device, control and counter fds.
        ``map_pools()``: hyperd's answer on the pools of the worker's device, for its refreshes.
        ``on_fatal(reason)``: the worker reported a protocol violation. ``on_death(how)``: it
        died without being stopped (killed, crashed)."""
        ours, theirs = socket.socketpair()
        counters_fd = os.memfd_create("hyper-counters", os.MFD_CLOEXEC)
        os.ftruncate(counters_fd, mmap.PAGESIZE)
        fds = (device_fd, theirs.fileno(), counters_fd)
        params = {
            **params,
            "device_fd": device_fd,
            "control_fd": theirs.fileno(),
            "counters_fd": counters_fd,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            pass_fds=fds,
            env={**os.environ, "PYTHONPATH": _SOURCE_ROOT},
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(params).encode())
        process.stdin.close()
        theirs.close()
        return cls(process, ours, counters_fd, map_pools, on_fatal, on_death)

    def counter_values(self, fields: Sequence[str]) -> dict[str, int]:
        """The worker's counters, named ``fields`` in page order."""
        values = memoryview(self._page)[: 8 * len(fields)].cast("Q")
        try:
            return {name: int(values[i]) for i, name in enumerate(fields)}
        finally:
            values.release()

    def _serve(self) -> None:
        """Answer the worker until it hangs up or reports a fatal error, or breaks the link
        (then that is its device's fatal error); report its death unless it was stopped or
        had reported one."""
        try:
            for line in _lines(self.control, MAX_LINE):
                if not self._handle(_message(line)):
                    return
        except LinkError as exc:
            self._fatal(f"the data path broke its link to dom0: {exc}")
            return
        if self._stopping:
            return
        try:  # the control socket closes as the process dies: collect how it ended
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return  # alive with its socket shut: it stops when stop() hangs up
        self._on_death(f"data path died ({_describe(code)})")

    def _handle(self, message: dict[str, Any]) -> bool:
        """Answer one request; False once dom0 is done with the worker (it reported a fatal
        error, or is being stopped). LinkError if it is no request."""
        if "fatal" in message:
            self._fatal(str(message["fatal"])[:500])
            return False
        if "map_pools" not in message or "id" not in message:
            raise LinkError(f"not a request: {sorted(message)[:4]}")
        self._wait_for_credit()
        if self._stopping:
            return False
        # Whatever the message names, the answer is about the device this worker serves.
        try:
            reply = {"id": message["id"], "result": self._map_pools()}
        except HypercallError as exc:
            reply = {"id": message["id"], "error": exc.errno_name, "message": exc.message}
        with contextlib.suppress(OSError):
            self.control.sendall(json.dumps(reply).encode() + b"\n")
        return True

    def _wait_for_credit(self) -> None:
        """Charge one refresh; wait out what it overdrew (only this worker's link waits)."""
        delay = self._credit.charge(1.0)
        if delay:
            time.sleep(delay)

    def _fatal(self, reason: str) -> None:
        """Report the device's fatal error, and hang up: its data path stops."""
        self._on_fatal(reason)
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Hang up; the worker stops its threads and exits."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_RDWR)
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.control.close()
        self._page.close()


class DataPath:
    """One device's data path across worker restarts: the worker running now (if any), what the
    ended ones counted, and when they died. Thread-safe: a worker's death is reported on its own
    link thread while the XenBus thread may be disconnecting the device."""

    RESTARTS = 3  # deaths a device survives within WINDOW seconds
    WINDOW = 60.0

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self.worker: WorkerProcess | None = None
        self._counted = dict.fromkeys(self.fields, 0)
        self._deaths: deque[float] = deque()
        self._lock = threading.Lock()

    def start(
        self,
        module: str,
        params: dict[str, Any],
        device_fd: int,
        hc: HypercallClient,
        dev: XenbusDevice,
        name: str,
    ) -> None:
        """Run the worker of backend device ``dev`` (``name`` in messages), with the device's
        frontend, name and live grant pools added to ``params``; its refreshes are answered for
        that device alone. A protocol violation it reports fails the device; its death restarts
        the data path through the frontend: the device returns to InitWait (see the backends'
        docstrings)."""
        pools = functools.partial(grants.map_pools, hc, dev.frontend_id, dev.device_name)
        device = {"frontend": dev.frontend_id, "device": dev.device_name, "pools": pools()}
        worker = WorkerProcess.start(
            module,
            {**params, **device},
            device_fd,
            pools,
            lambda message: dev.fatal(f"{name}: {message}"),
            lambda how: self._died(dev, name, how),
        )
        with self._lock:
            self.worker = worker

    def _died(self, dev: XenbusDevice, name: str, how: str) -> None:
        """On the dead worker's link thread."""
        if dev.state != XenbusState.Connected:
            return  # being disconnected, or not yet connected: that path stops it
        outcome = self.died()
        if outcome == "too often":
            dev.fatal(f"{name}: {how}, too often")
        elif outcome == "restart":
            log.warning("%s: %s; restarting it, the frontend starts its rings over", name, how)
            dev.switch_state(XenbusState.InitWait)

    def counter_values(self) -> dict[str, int]:
        """What every worker counted: the ended ones and the running one."""
        worker = self.worker
        running = worker.counter_values(self.fields) if worker is not None else {}
        return {name: value + running.get(name, 0) for name, value in self._counted.items()}

    def stats(self) -> dict[str, object]:
        """``connected`` (a worker runs), its ``worker_pid``, and the counters."""
        worker = self.worker
        return {
            "connected": worker is not None,
            "worker_pid": worker.process.pid if worker is not None else None,
            **self.counter_values(),
        }

    def stop(self) -> None:
        """Stop the running worker, if any, keeping what it counted; idempotent."""
        self._retire()

    def died(self) -> Literal["restart", "stopped", "too often"]:
        """The worker died unasked: retire it. "restart" if the device may go on with a new
        one, "too often" after more than RESTARTS deaths within WINDOW seconds, "stopped" if
        the device was being stopped anyway."""
        if not self._retire():
            return "stopped"
        now = time.monotonic()
        with self._lock:
            while self._deaths and now - self._deaths[0] > self.WINDOW:
                self._deaths.popleft()
            self._deaths.append(now)
            return "too often" if len(self._deaths) > self.RESTARTS else "restart"

    def _retire(self) -> bool:
        with self._lock:
            worker, self.worker = self.worker, None
        if worker is None:
            return False
        counted = worker.counter_values(self.fields)
        worker.stop()
        with self._lock:
            for name, value in counted.items():
                self._counted[name] += value
        return True


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"


class LinkError(Exception):
    """A worker sent dom0 what no worker sends: it is broken or subverted."""


def _lines(sock: socket.socket, limit: int | None = None) -> Iterator[bytes]:
    """The lines that arrive on ``sock`` until it closes; LinkError past ``limit`` bytes
    without a newline."""
    buffer = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return
        *lines, buffer = (buffer + data).split(b"\n")
        yield from lines
        if limit is not None and len(buffer) > limit:
            raise LinkError(f"a line of more than {limit} bytes")


def _message(line: bytes) -> dict[str, Any]:
    """One line of a worker's, checked to be a JSON object (LinkError if not)."""
    if len(line) > MAX_LINE:
        raise LinkError(f"a line of {len(line)} bytes, more than {MAX_LINE}")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise LinkError(f"a line that is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise LinkError(f"a JSON {type(message).__name__}, not an object")
    return message


# -- the worker's side ---------------------------------------------------------------------------


class Dom0Link:
    """The worker's side of the control socket: a hypercall client whose calls dom0 makes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._replies: dict[int, Any] = {}
        self._arrived = threading.Condition()
        self.closed = threading.Event()
        threading.Thread(target=self._read, name="dom0-link", daemon=True).start()

    def _read(self) -> None:
        for line in _lines(self._sock):  # dom0's replies: trusted
            reply = json.loads(line)
            with self._arrived:
                self._replies[reply["id"]] = reply
                self._arrived.notify_all()
        self.closed.set()
        with self._arrived:
            self._arrived.notify_all()

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    def call(self, op: hc.Op) -> dict[str, Any]:
        """Only the grant mapper's refresh travels this way (dom0 answers it for this worker's
        device: ``op`` names the same); the event channels are already bound."""
        if not isinstance(op, hc.GnttabMapPools):
            return {}
        req_id = next(self._ids)
        try:
            self._send({"id": req_id, "map_pools": {}})
        except OSError as exc:
            raise hc.HypercallError(op.op, "ENOTCONN", f"dom0 is gone: {exc}") from exc
        with self._arrived:
            self._arrived.wait_for(lambda: req_id in self._replies or self.closed.is_set(), 10)
            reply = self._replies.pop(req_id, None)
        if reply is None:
            raise hc.HypercallError(op.op, "ENOTCONN", "dom0 is gone")
        if "error" in reply:
            raise hc.HypercallError(op.op, reply["error"], reply.get("message", ""))
        return dict(reply["result"])

    def fatal(self, message: str) -> None:
        with contextlib.suppress(OSError):
            self._send({"fatal": message})


#: How a device worker starts its data path: from its parameters, its link to dom0 and its
#: counter page, over the frontend's pages; it returns how to stop that data path.
Start = Callable[[dict[str, Any], Dom0Link, memoryview], Callable[[], None]]


def serve_device(params: dict[str, Any], start: Start) -> int:
    """A device worker's life: connect to dom0, ``start`` the data path, run until dom0 hangs
    up, stop it. A setup the frontend broke (a ring ref it did not grant, more pages for its
    device than the protocol can use, a pool it broke, a ring index it lies about) is reported
    as its protocol violation, which fails the device: not a crash, on which dom0 would restart
    the worker over the same setup until the device failed for dying too often."""
    link = Dom0Link(socket.socket(fileno=params["control_fd"]))
    page = mmap.mmap(params["counters_fd"], mmap.PAGESIZE)
    try:
        stop = start(params, link, memoryview(page))
    except (GrantError, GrantViolation, RingBroken) as exc:
        link.fatal(f"connecting: {exc}")
        return 1
    link.closed.wait()  # dom0 hangs up when the device disconnects
    stop()
    return 0


def worker_main(run: Callable[[dict[str, Any]], object]) -> None:
    """A worker process's main: parameters from stdin, ``run`` them, exit without teardown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(json.load(sys.stdin))
    os._exit(0)  # no interpreter teardown over shared memory a peer may have broken
