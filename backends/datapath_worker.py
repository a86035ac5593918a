"""A backend device's data path in a process of its own, and dom0's handle on it.

dom0 negotiates a device (XenBus, event channels, the native device: a TAP, a loop device) and
then hands its data path to one worker process per device (``python -m backends.netback.worker``,
``python -m backends.blkback.worker``). Two reasons: CPython's GIL would otherwise serialise every
device's I/O through one interpreter, and the worker is the only process that touches the memory
the frontend shares, so a frontend that truncates its own pages to make the reader fault
(SIGBUS) brings down its own device's worker, never dom0.

The worker reads one JSON object on stdin: the device's parameters plus the numbers of the fds it
inherited: ``device_fd`` (the native device; a device of several queues passes the others'
fds too, named in its own parameters), ``control_fd`` (a socket to dom0) and ``counters_fd``
(a page of u64 counters that dom0 reads whenever it is asked, sealed at its size: the worker
can neither shrink it under dom0's reads nor grow it; a device of several queues counts each
queue in a block of its own, which dom0 adds up; after the blocks, each of the device's rings
counts its figures, channels/ring.py's RING_FIGURES: ``ring_figures``). The parameters name the
frontend's domain (``frontend``), the device (``device``, ``<type>/<devid>``), the grant pools
live for it as the worker starts (``pools``, each opened by dom0: its ``fd`` is inherited too;
channels/grants.py), and the uid and gid it drops to (``worker_id``, its own; ``worker_gid``,
its domain's: backends/privilege.py). Over the control socket, one JSON object per line, the worker
asks dom0 which of the device's grant pools are live now (``{"id", "map_pools": {}}``: dom0
holds the hypercall socket, and opens the pools: the answer comes with one fd per pool,
SCM_RIGHTS, each pool's ``fd`` its index among them), reports a fatal protocol error
(``{"fatal"}``) and, while dom0 has asked it to trace, sends trace records (``{"trace"}``,
blkback's: checked by ``trace_record`` before anyone sees them); dom0 tells it changes of its
device's settings unasked (``{"settings": {"faults": spec}}`` or ``{"trace": bool}``), and
hanging up tells it to stop. A setup the frontend broke (a ring ref it did
not grant, more pages for its device than the protocol can use, a pool it truncated) is such an
error too, reported as the worker connects (``serve_device``). Its stdout and stderr are a
socket dom0 reads into its own log, a line at a time, at a bounded rate.

The worker holds no host privilege while it touches the frontend's memory (backends/privilege.py):
it opens its doorbells by name, drops to its own uid with no capability and no new privileges,
and only then maps the pools, starts its threads and reads the rings.
What it holds from then on: its native device (a TAP queue or a loop device), the control
socket, the counter page, the log socket, ``/dev/null`` as stdin, and the mappings of its
device's pools and doorbells.

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

import array
import contextlib
import fcntl
import functools
import itertools
import json
import logging
import mmap
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Self, TypeVar

from backends import privilege
from backends.host import BackendHost
from channels import grants
from channels import hypercall as hc
from channels.credit import Credit
from channels.errors import HyperError, ProtocolViolation
from channels.forkserver import Child, ChildSetup, Spawner
from channels.gnttab import GrantError
from channels.hypercall import HypercallError
from channels.ring import RING_FIGURES
from channels.xenbus import XenbusState
from channels.xenbus_bus import XenbusDevice

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The longest line a worker may send dom0: a request is a few dozen bytes, a fatal report a
#: few hundred.
MAX_LINE = 4096
#: The most fds one sendmsg may carry (Linux's SCM_MAX_FD).
SCM_MAX_FD = 253
#: A worker's output in dom0's log: each line cut at MAX_LOG_LINE characters, at most
#: LOG_RATE bytes a second past a burst of LOG_BURST (its writes wait in its socket meanwhile).
MAX_LOG_LINE = 1000
LOG_RATE = 16 << 10
LOG_BURST = 64 << 10


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
        #: Held around an increment of a counter that two threads count (netback's drops and
        #: errors, which a queue's path and its fault line both count); one thread's own
        #: counters need none.
        self.lock = threading.Lock()

    @classmethod
    def blocks(cls, buf: memoryview, count: int) -> list[Self]:
        """``count`` sets of counters one after another in ``buf`` (a block per queue of a
        device: WorkerProcess adds them up)."""
        size = 8 * len(cls.FIELDS)
        return [cls(buf[i * size : (i + 1) * size]) for i in range(count)]

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


class RingFigures(CounterPage):
    """One ring's figures (channels/ring.py's RING_FIGURES), which its BackRing, its loop's
    LateEoi and a native pump serving it count in (``page``)."""

    FIELDS = RING_FIGURES


def ring_figures(page: memoryview, fields: int, blocks: int, rings: int) -> list[RingFigures]:
    """Each ring's figures in a device's counter page, after its ``blocks`` blocks of
    ``fields`` counters; ValueError if they overflow it."""
    start = 8 * fields * blocks
    if start + rings * 8 * len(RingFigures.FIELDS) > len(page):
        raise ValueError(f"{rings} rings' figures after {blocks} blocks overflow the page")
    return RingFigures.blocks(page[start:], rings)


# -- dom0's side --------------------------------------------------------------------------------


class WorkerProcess:
    """dom0's handle on one device's data-path process."""

    def __init__(
        self,
        process: Child,
        links: WorkerLinks,
        map_pools: Callable[[], dict[str, Any]],
        on_fatal: Callable[[str], None],
        on_death: Callable[[str], None],
        counter_blocks: int = 1,
        on_trace: Callable[[dict[str, Any]], None] | None = None,
        rings: Sequence[str] = ("ring",),
    ) -> None:
        self.process = process
        self.counter_blocks = counter_blocks
        self.rings = tuple(rings)  # the names of the device's rings, in page order
        self.control = links.control
        self.worker_id = links.worker_id
        self._ids = links.ids
        self._page = mmap.mmap(links.counters_fd, mmap.PAGESIZE)
        self._page_lock = threading.Lock()  # a read of it, or its close at stop
        os.close(links.counters_fd)
        self._output = links.output
        self._map_pools = map_pools
        self._on_fatal = on_fatal
        self._on_death = on_death
        self._on_trace = on_trace
        self._tracing = False
        self._traced_until = 0.0
        self._trace_credit = Credit(TRACE_RATE, TRACE_BURST)
        self._send_lock = threading.Lock()  # replies and settings share the control socket
        # What the worker's refreshes may cost dom0: as much as an honest mapper asks for.
        self._credit = Credit(grants.REFRESHES_PER_SECOND, grants.REFRESH_BURST)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="worker-link", daemon=True)
        self._thread.start()
        self._logger = threading.Thread(
            target=_log_output, args=(links.output, links.label), name="worker-log", daemon=True
        )
        self._logger.start()

    @classmethod
    def start(
        cls,
        module: str,
        params: dict[str, Any],
        device_fd: int,
        map_pools: Callable[[], dict[str, Any]],
        on_fatal: Callable[[str], None],
        on_death: Callable[[str], None],
        host: BackendHost,
        extra_fds: Sequence[int] = (),
        counter_blocks: int = 1,
        on_trace: Callable[[dict[str, Any]], None] | None = None,
        rings: Sequence[str] = ("ring",),
    ) -> WorkerProcess:
        """Run ``module``'s ``main``, from ``host``'s fork server, with ``params``, the pools
        live now (``map_pools()``, each opened for it), a worker id of its own (from ``host``'s
        table), and the device, control and counter fds (and ``extra_fds``, under the same
        numbers; ``counter_blocks`` blocks of counters, then the figures of ``rings``).
        ``map_pools()``: hyperd's answer on the pools of the worker's device, for its refreshes.
        ``on_fatal(reason)``: the worker reported a protocol violation. ``on_death(how)``: it
        died without being stopped (killed, crashed). ``on_trace(record)``: a trace record it
        sent (blkback's, while it traces), checked (``trace_record``)."""
        pools = grants.open_pools(map_pools())
        try:
            label = f"{params.get('device')} of domain {params.get('frontend')}"
            links = WorkerLinks(label, host.worker_ids)
            process = _spawn(
                host.spawner, module, {**params, "pools": pools}, device_fd, links, extra_fds
            )
        finally:
            grants.close_pool_fds(pools)  # the worker has its own now
        return cls(process, links, map_pools, on_fatal, on_death, counter_blocks, on_trace, rings)

    def _read_page(self, read: Callable[[memoryview], _T], stopped: _T) -> _T:
        """``read(page)`` of the counter page, or ``stopped`` once ``stop`` closed it (a stats
        call racing the device's disconnection: DataPath holds what the worker counted)."""
        with self._page_lock:
            if self._page.closed:
                return stopped
            page = memoryview(self._page)
            try:
                return read(page)
            finally:
                page.release()

    def counter_blocks_values(self, fields: Sequence[str]) -> list[dict[str, int]]:
        """The worker's counters, named ``fields`` in page order, block by block (a block per
        queue)."""

        def read(page: memoryview) -> list[dict[str, int]]:
            values = page[: 8 * len(fields) * self.counter_blocks].cast("Q")
            try:
                return [
                    {name: int(values[b * len(fields) + i]) for i, name in enumerate(fields)}
                    for b in range(self.counter_blocks)
                ]
            finally:
                values.release()

        zero = dict.fromkeys(fields, 0)
        return self._read_page(read, [dict(zero) for _ in range(self.counter_blocks)])

    def counter_values(self, fields: Sequence[str]) -> dict[str, int]:
        """The worker's counters, named ``fields``: every block's added up."""
        blocks = self.counter_blocks_values(fields)
        return {name: sum(block[name] for block in blocks) for name in fields}

    def ring_values(self, fields: Sequence[str]) -> list[dict[str, Any]]:
        """Each ring's figures, after the counter blocks (``fields`` a block): its name as
        ``ring``, then RING_FIGURES."""

        def read(page: memoryview) -> list[dict[str, Any]]:
            rings = ring_figures(page, len(fields), self.counter_blocks, len(self.rings))
            try:
                return [
                    {"ring": name, **figures.as_dict()}
                    for name, figures in zip(self.rings, rings, strict=True)
                ]
            finally:
                for figures in rings:
                    figures.release()

        return self._read_page(read, [])

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
        if "trace" in message:
            return self._trace(message["trace"])
        if "map_pools" not in message or "id" not in message:
            raise LinkError(f"not a request: {sorted(message)[:4]}")
        self._wait_for_credit()
        if self._stopping:
            return False
        # Whatever the message names, the answer is about the device this worker serves; the
        # pools go opened (the worker may not open them by name), their fds ours to close.
        try:
            pools = grants.open_pools(self._map_pools())
        except HypercallError as exc:
            error = {"id": message["id"], "error": exc.errno_name, "message": exc.message}
            with contextlib.suppress(OSError), self._send_lock:
                self.control.sendall(json.dumps(error).encode() + b"\n")
            return True
        try:
            with contextlib.suppress(OSError), self._send_lock:
                _send_pools(self.control, message["id"], pools)
        finally:
            grants.close_pool_fds(pools)
        return True

    def _trace(self, value: Any) -> bool:
        """A trace record, taken only while dom0 has the worker trace (and TRACE_GRACE after,
        for the records already on their way) and at TRACE_RATE at most: the link waits out a
        faster worker, whose sends then block. Unasked, it is a broken link (LinkError); a
        record that is no record is dropped."""
        if not self._tracing and time.monotonic() > self._traced_until:
            raise LinkError("a trace record while not tracing")
        delay = self._trace_credit.charge(1.0)
        if delay:
            time.sleep(delay)
        record = trace_record(value)
        if record is not None and self._on_trace is not None:
            self._on_trace(record)
        return True

    def send_settings(self, settings: dict[str, Any]) -> None:
        """Tell the running worker a change of its device's settings (its faults; whether it
        traces)."""
        if "trace" in settings:
            self._tracing = bool(settings["trace"])
            self._traced_until = time.monotonic() + TRACE_GRACE
        with contextlib.suppress(OSError), self._send_lock:
            self.control.sendall(json.dumps({"settings": settings}).encode() + b"\n")

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
        """Hang up; the worker stops its threads and exits. Its id is free once it is reaped."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_RDWR)
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        privilege.kill_processes_of(self.worker_id)  # what a subverted worker forked
        self._ids.give_back(self.worker_id)
        with contextlib.suppress(OSError):  # ends the log's reader, whoever holds the other end
            self._output.shutdown(socket.SHUT_RDWR)
        self._logger.join(timeout=5.0)
        self._output.close()
        self.control.close()
        with self._page_lock:
            self._page.close()


class WorkerLinks:
    """What dom0 and one worker share besides the device: the control socket, the counter page
    (a memfd sealed at one page), the socket the worker's output goes to, and its id."""

    def __init__(self, label: str, ids: privilege.WorkerIds) -> None:
        self.label = label
        self.ids = ids
        self.control, self.theirs = socket.socketpair()
        self.output, self.theirs_output = socket.socketpair()
        self.counters_fd = _sealed_page()
        self.worker_id = ids.take()

    def close_theirs(self) -> None:
        """Once the worker has its ends (or never will)."""
        self.theirs.close()
        self.theirs_output.close()

    def close(self) -> None:
        """No worker was started: ours go too, and the id back."""
        self.control.close()
        self.output.close()
        os.close(self.counters_fd)
        self.ids.give_back(self.worker_id)


def _spawn(
    spawner: Spawner,
    module: str,
    params: dict[str, Any],
    device_fd: int,
    links: WorkerLinks,
    extra_fds: Sequence[int] = (),
) -> Child:
    """``module``'s ``main``, forked by ``spawner``'s fork server (dom0's: dom0/spawn.py), with
    ``params`` on its stdin, and its fds: the device (and ``extra_fds``), ``links``' ends and
    its pools' (``params["pools"]``, ``grants.open_pools``'s)."""
    theirs = (links.theirs.fileno(), links.counters_fd)
    params = {
        **params,
        "worker_id": links.worker_id,
        "device_fd": device_fd,
        "control_fd": theirs[0],
        "counters_fd": theirs[1],
    }
    try:
        process = spawner.server().spawn(
            f"{module}:main",
            stdin=subprocess.PIPE,
            stdout=links.theirs_output.fileno(),
            stderr=links.theirs_output.fileno(),
            pass_fds=(device_fd, *extra_fds, *theirs, *grants.pool_fds(params["pools"])),
            setup=ChildSetup(comm=_comm(module)),
        )
    except OSError:
        links.close()
        raise
    finally:
        links.close_theirs()
    assert process.stdin is not None
    process.stdin.write(json.dumps(params).encode())
    process.stdin.close()
    return process


def _comm(module: str) -> str:
    """A worker's name for ps and top: ``backends.netback.worker`` runs as ``netback``."""
    return module.split(".")[-2] if module.count(".") >= 2 else module


def _sealed_page() -> int:
    """A one-page memfd no holder can shrink (dom0 would fault reading it) or grow."""
    fd = os.memfd_create("hyper-counters", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, mmap.PAGESIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def _send_pools(sock: socket.socket, req_id: object, pools: dict[str, Any]) -> None:
    """Answer request ``req_id`` with ``pools`` (``grants.open_pools``'s): their fds go with the
    line (SCM_RIGHTS), each pool's ``fd`` replaced by its index among them. More fds than one
    message carries go first in messages of their own, each with a space the reader's JSON
    skips."""
    fds = grants.pool_fds(pools)
    index = {fd: i for i, fd in enumerate(fds)}
    wire = [
        {**entry, "fd": index[entry["fd"]]} if "fd" in entry else entry for entry in pools["pools"]
    ]
    line = json.dumps({"id": req_id, "result": {**pools, "pools": wire}, "fds": len(fds)})
    chunks = [fds[i : i + SCM_MAX_FD] for i in range(0, len(fds), SCM_MAX_FD)]
    for chunk in chunks[:-1]:
        _send_fds(sock, b" ", chunk)
    _send_fds(sock, line.encode() + b"\n", chunks[-1] if chunks else [])


def _send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], rights)
    sock.sendall(data[sent:])


def _log_output(sock: socket.socket, label: str) -> None:
    """A worker's output into dom0's log, one line at a time, each cut at MAX_LOG_LINE and the
    whole paced (see LOG_RATE), until the worker's end closes or ``stop`` shuts ours."""
    credit = Credit(LOG_RATE, LOG_BURST)
    pending = b""
    while data := _recv(sock):
        *lines, pending = (pending + data).split(b"\n")
        if len(pending) > MAX_LOG_LINE:  # no newline coming soon: a line of its own
            lines, pending = [*lines, pending], b""
        for line in lines:
            log.info("%s data path: %s", label, line[:MAX_LOG_LINE].decode(errors="replace"))
        delay = credit.charge(max(len(data), 512))  # a trickle costs as much as a chunk
        if delay:
            time.sleep(delay)


#: A trace record's fields and their types (backends/blkback/datapath.py makes them): a
#: request's, and its response's (which adds ``status`` and ``latency_us``). A worker may be
#: subverted, so what it sends is checked before anyone sees it.
TRACE_REQ: dict[str, type] = {
    "ev": str,
    "op": str,
    "id": int,
    "sector": int,
    "count": int,
    "t": float,
}
TRACE_RSP: dict[str, type] = {**TRACE_REQ, "status": str, "latency_us": int}
_TRACE_WORD = re.compile(r"[a-z_]{1,16}")
_TRACE_CLOCK = 2.0**40  # seconds: any time a host's clock can say, and finite
TRACE_RATE, TRACE_BURST = 100_000.0, 20_000.0  # records a second a traced worker may send
TRACE_GRACE = 2.0  # seconds after a trace ends in which its last records are still taken
_U64_MAX = (1 << 64) - 1


def trace_record(value: Any) -> dict[str, Any] | None:
    """``value`` as a trace record: a request's or a response's fields exactly, each of its
    type (words for strings, u64s for ints, a finite time), or None when it is not one."""
    if not isinstance(value, dict):
        return None
    fields = {"req": TRACE_REQ, "rsp": TRACE_RSP}.get(str(value.get("ev")))
    if fields is None or set(value) != set(fields):
        return None
    for key, kind in fields.items():
        field = value[key]
        if kind is float:
            if type(field) not in (int, float) or not 0 <= field < _TRACE_CLOCK:
                return None
        elif (
            type(field) is not kind
            or (isinstance(field, int) and not 0 <= field <= _U64_MAX)
            or (isinstance(field, str) and not _TRACE_WORD.fullmatch(field))
        ):
            return None
    return dict(value)


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
        self._tracers: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()

    def start(
        self,
        module: str,
        params: dict[str, Any],
        device_fd: int,
        host: BackendHost,
        dev: XenbusDevice,
        name: str,
        extra_fds: Sequence[int] = (),
        counter_blocks: int = 1,
        rings: Sequence[str] = ("ring",),
    ) -> None:
        """Run the worker of backend device ``dev`` (``name`` in messages), from ``host``'s fork
        server, with the device's
        frontend, name and live grant pools added to ``params`` (and ``extra_fds``, a device's
        other queues; ``counter_blocks``, one per queue; ``rings``, the names of its rings,
        whose figures follow the blocks); its refreshes are answered for that
        device alone. A protocol violation it reports fails the device; its death restarts
        the data path through the frontend: the device returns to InitWait (see the backends'
        docstrings)."""
        pools = functools.partial(grants.map_pools, host.hc, dev.frontend_id, dev.device_name)
        device = {
            "frontend": dev.frontend_id,
            "backend": host.domid,
            "device": dev.device_name,
            "worker_gid": host.worker_gid(dev.frontend_id),  # why: backends/privilege.py
        }
        worker = WorkerProcess.start(
            module,
            {**params, **device},
            device_fd,
            pools,
            lambda message: dev.fatal(f"{name}: {message}"),
            lambda how: self._died(dev, name, how),
            host,
            extra_fds,
            counter_blocks,
            self._traced,
            rings,
        )
        with self._lock:
            self.worker = worker
            tracing = bool(self._tracers)
        if tracing:
            worker.send_settings({"trace": True})

    def send_settings(self, settings: dict[str, Any]) -> None:
        """Tell the worker, if one runs, a change of its device's settings."""
        with self._lock:
            worker = self.worker
        if worker is not None:
            worker.send_settings(settings)

    def trace(self, sink: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Have ``sink`` told each trace record of the device's requests (on a link thread),
        until the function returned is called; the worker traces while anyone listens."""
        with self._lock:
            self._tracers.append(sink)
            first, worker = len(self._tracers) == 1, self.worker
        if first and worker is not None:
            worker.send_settings({"trace": True})

        def stop() -> None:
            with self._lock:
                self._tracers.remove(sink)
                last, running = not self._tracers, self.worker
            if last and running is not None:
                running.send_settings({"trace": False})

        return stop

    def _traced(self, record: dict[str, Any]) -> None:
        with self._lock:
            sinks = list(self._tracers)
        for sink in sinks:
            sink(record)

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

    def queue_counters(self) -> list[dict[str, int]]:
        """The running worker's counters, queue by queue ([] when none runs)."""
        worker = self.worker
        return worker.counter_blocks_values(self.fields) if worker is not None else []

    def ring_values(self) -> list[dict[str, Any]]:
        """The running worker's rings' figures ([] when none runs): a new worker starts its
        rings over, and their figures with them."""
        worker = self.worker
        return worker.ring_values(self.fields) if worker is not None else []

    def stats(self) -> dict[str, object]:
        """``connected`` (a worker runs), its ``worker_pid``, the counters, and ``rings``: each
        ring's figures."""
        worker = self.worker
        return {
            "connected": worker is not None,
            "worker_pid": worker.process.pid if worker is not None else None,
            **self.counter_values(),
            "rings": self.ring_values(),
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


class LinkError(HyperError):
    """A worker sent dom0 what no worker sends: it is broken or subverted."""


def _lines(
    sock: socket.socket, limit: int | None = None, fds: deque[int] | None = None
) -> Iterator[bytes]:
    """The lines that arrive on ``sock`` until it closes; LinkError past ``limit`` bytes
    without a newline. With ``fds``, the fds that come with them are added there (a line's
    come before it is yielded)."""
    buffer = b""
    while data := _recv(sock, fds):
        *lines, buffer = (buffer + data).split(b"\n")
        yield from lines
        if limit is not None and len(buffer) > limit:
            raise LinkError(f"a line of more than {limit} bytes")


def _recv(sock: socket.socket, fds: deque[int] | None = None) -> bytes:
    """What arrives next on ``sock``, b"" once it is closed or shut; with ``fds``, the fds
    that come with it (SCM_RIGHTS) are added there. Without, none is taken: the kernel closes
    whatever fds a peer sent (dom0 takes none from a worker)."""
    try:
        if fds is None:
            return sock.recv(65536)
        space = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
        data, ancillary, _, _ = sock.recvmsg(65536, space, socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return b""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return data


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
    """The worker's side of the control socket: a hypercall client whose calls dom0 makes.
    Its reader thread starts with ``start``: after the worker dropped privilege."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: set[int] = set()
        self._replies: dict[int, Any] = {}
        self._arrived = threading.Condition()
        self.closed = threading.Event()
        #: Told each change of the device's settings dom0 sends unasked (``{"faults": spec}``),
        #: on the reader thread; the data path sets it before the reader starts.
        self.on_settings: Callable[[dict[str, Any]], None] | None = None

    def start(self) -> None:
        threading.Thread(target=self._read, name="dom0-link", daemon=True).start()

    def _read(self) -> None:
        fds: deque[int] = deque()
        for line in _lines(self._sock, fds=fds):  # dom0's replies: trusted
            reply = json.loads(line)
            if "settings" in reply:  # unasked: dom0's, trusted as its replies are
                if self.on_settings is not None:
                    self.on_settings(reply["settings"])
                continue
            _take_fds(reply, [fds.popleft() for _ in range(min(reply.get("fds", 0), len(fds)))])
            with self._arrived:
                if reply["id"] in self._waiting:
                    self._replies[reply["id"]] = reply
                    self._arrived.notify_all()
                    continue
            grants.close_pool_fds(reply.get("result", {}))  # its caller gave up on it
        self.closed.set()
        with self._arrived:
            self._arrived.notify_all()

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    def send_trace(self, record: dict[str, Any]) -> None:
        """One trace record (TRACE_FIELDS) to dom0; dropped once the link is closed."""
        with contextlib.suppress(OSError):
            self._send({"trace": record})

    def call(self, op: hc.Op) -> dict[str, Any]:
        """Only the grant mapper's refresh travels this way (dom0 answers it for this worker's
        device: ``op`` names the same; each pool comes opened, its ``fd`` ours to close); the
        event channels are already bound."""
        if not isinstance(op, hc.GnttabMapPools):
            return {}
        req_id = next(self._ids)
        with self._arrived:
            self._waiting.add(req_id)
        try:
            self._send({"id": req_id, "map_pools": {}})
            with self._arrived:
                self._arrived.wait_for(lambda: req_id in self._replies or self.closed.is_set(), 10)
        except OSError as exc:
            raise hc.HypercallError(op.op, "ENOTCONN", f"dom0 is gone: {exc}") from exc
        finally:
            with self._arrived:
                self._waiting.discard(req_id)
                reply = self._replies.pop(req_id, None)
        if reply is None:
            raise hc.HypercallError(op.op, "ENOTCONN", "dom0 is gone")
        if "error" in reply:
            raise hc.HypercallError(op.op, reply["error"], reply.get("message", ""))
        return dict(reply["result"])

    def fatal(self, message: str) -> None:
        with contextlib.suppress(OSError):
            self._send({"fatal": message})


def _take_fds(reply: dict[str, Any], fds: list[int]) -> None:
    """Put the fds that came with ``reply`` in its pools' entries, each in place of its index
    (``_send_pools``); close any no entry names."""
    named = set()
    for entry in reply.get("result", {}).get("pools", []):
        if "fd" in entry:
            entry["fd"] = fds[entry["fd"]]
            named.add(entry["fd"])
    for fd in set(fds) - named:
        os.close(fd)


Channels = TypeVar("Channels")
#: What a device worker opens by name while it still may (its event channels: a doorbell is a
#: POSIX semaphore, which has no fd dom0 could hand it), from its parameters and its link.
Open = Callable[[dict[str, Any], Dom0Link], Channels]
#: How a device worker starts its data path, with no privilege left: from what it opened, its
#: parameters, its link to dom0 and its counter page, over the frontend's pages; it returns
#: how to stop that data path.
Start = Callable[[Channels, dict[str, Any], Dom0Link, memoryview], Callable[[], None]]


def serve_device(
    params: dict[str, Any], open_channels: Open[Channels], start: Start[Channels]
) -> int:
    """A device worker's life: connect to dom0, open its channels, drop every host privilege
    (backends/privilege.py; if it cannot, that fails the device), ``start`` the data path, run until
    dom0 hangs up, stop it. A setup the frontend broke (a ring ref it did not grant, more pages
    for its device than the protocol can use, a pool it broke, a ring index it lies about) is
    reported as its protocol violation, which fails the device: not a crash, on which dom0
    would restart the worker over the same setup until the device failed for dying too often."""
    link = Dom0Link(socket.socket(fileno=params["control_fd"]))
    page = _counter_page(params["counters_fd"])
    channels = open_channels(params, link)
    try:
        privilege.drop(params["worker_id"], params["worker_gid"])
    except privilege.PrivilegeError as exc:
        link.fatal(str(exc))
        return 1
    link.start()
    try:
        stop = start(channels, params, link, memoryview(page))
    except (GrantError, ProtocolViolation) as exc:
        link.fatal(f"connecting: {exc}")
        return 1
    link.closed.wait()  # dom0 hangs up when the device disconnects
    stop()
    return 0


def _counter_page(fd: int) -> mmap.mmap:
    """The counter page dom0 made: a file of one page (anything else would fault us)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != mmap.PAGESIZE:
        raise ValueError(f"counter page: {st.st_size} bytes, not {mmap.PAGESIZE}")
    return mmap.mmap(fd, mmap.PAGESIZE)


def worker_main(run: Callable[[dict[str, Any]], object]) -> None:
    """A worker process's main: parameters from stdin, ``run`` them, exit without teardown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = json.load(sys.stdin)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # for the pipe dom0 wrote the parameters to: nothing more comes on it
    os.close(null)
    run(params)
    os._exit(0)  # no interpreter teardown over shared memory a peer may have broken
