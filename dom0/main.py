"""dom0: the store, the toolstack and the backends, in one privileged process.

The store is also served to the host's root on ``/run/hyper/xenstored/socket`` (RunDir's
``store_socket``), with dom0's privileges, as xenstored serves ``/run/xenstored/socket``: Xen's
own ``xenstore-*`` tools and clients such as pyxs reach it with ``XENSTORED_PATH``.

hyperd starts it with its hypercall socket (``--hypercall-fd``) and restarts it if it dies,
with ``--recover``: the new dom0 then starts from the store the old one left on disk
(xenstored/journal.py), forgets the domains that ended meanwhile, takes each live domain's
store connection over and re-probes every backend device, whose frontends reconnect. If those
files are of a format this dom0 does not read (a hyper upgraded while domains ran), it stops
at once with one line naming the file, exit status 2, and leaves them as they are: hyperd
restarts it (ever more slowly) until the hyper that wrote them is back, which then recovers
every domain, or the files are moved aside, after which dom0 starts from an empty store.
Recovering an empty store silently instead would lose every domain's store for good.
Threads: the hypercall reader, the toolstack's event thread (domain introductions and deaths
from hyperd), the control socket, and one per domain for each backend.

With the store in a stub domain (``--store-ring``: hyperd started with ``--store-domain``), dom0
keeps no store of its own: it is the store's client over its own store ring, as every domain
is, with dom0's privileges there, and a dom0 that restarts finds the store as it left it (the
store domain keeps it). That ring's page is shared with the store domain only, which is as
trusted as dom0 for the control plane (it holds every domain's configuration); dom0 maps it
itself, so a store domain that truncated it would crash dom0, which hyperd restarts.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from backends.drivers import BackendDrivers
from backends.host import BackendHost
from backends.netback.tap import remove_our_bridges
from channels import xenbus
from channels.evtchn import from_status
from channels.hypercall import HypercallClient
from channels.paths import RunDir
from channels.shm import attach
from channels.xenbus_bus import Bus
from channels.xs import XsClient
from channels.xs_ring import XenstoreRing
from dom0 import spawn
from dom0.control import ControlServer
from dom0.storeview import StoreView
from dom0.toolstack import Toolstack
from xenstored.core import Store
from xenstored.journal import Journal, StoreFormatError
from xenstored.local import connect_local
from xenstored.stream import UnixSocketServer

log = logging.getLogger("dom0")


def main(argv: list[str] | None = None) -> int:
    # First, while dom0 is single-threaded: its fork server is a fork of it (dom0/spawn.py).
    spawn.start()
    try:
        return _run(argv)
    finally:
        spawn.spawner.close()


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="dom0")
    parser.add_argument("--hypercall-fd", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument(
        "--recover", action="store_true", help="a restart: take over the previous dom0's store"
    )
    parser.add_argument(
        "--store-ring",
        type=json.loads,
        default=None,
        help="the store runs in a stub domain: dom0's store ring (JSON: segment, domu_port)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dom0 %(name)s: %(message)s")
    run = RunDir(args.run_dir) if args.run_dir else RunDir()
    store: Store | None = None
    if args.store_ring is None:
        try:
            store = Store(journal=Journal(run.root), recover=args.recover)
        except StoreFormatError as exc:
            log.error("%s", exc)
            return 2
    # Events may arrive as soon as the socket is read: queue them for the toolstack.
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    hc = HypercallClient(
        socket.socket(fileno=args.hypercall_fd),
        on_event=lambda name, data: events.put((name, data)),
    )
    xs: XsClient
    if store is not None:
        xs = connect_local(store, 0).client
    else:
        ring = args.store_ring
        evtchn = from_status(hc, ring["domu_port"])
        page = attach(ring["segment"])  # mapped for as long as dom0 runs
        xs = XenstoreRing(page.buf, evtchn, name="dom0-store").start().client
    toolstack = Toolstack(hc, store, xs, events)
    host_socket = None
    if store is not None:  # Xen's own tools, root's alone (the run directory is root's, 0700)
        run.store_dir.mkdir(mode=0o700, exist_ok=True)
        run.store_socket.unlink(missing_ok=True)  # a killed dom0's
        host_socket = UnixSocketServer(store, str(run.store_socket))
        toolstack.store_socket = run.store_socket
    signal.signal(signal.SIGTERM, lambda *_: toolstack.stopped.set())
    if args.recover:
        toolstack.recover()
    xs.write(xenbus.backend_root_path(0), "")
    drivers = BackendDrivers(BackendHost(hc, spawn.spawner))
    toolstack.drivers = drivers
    backends = Bus(xs, xenbus.backend_root_path(0), "backend", drivers.by_type()).start()
    threading.Thread(target=toolstack.run_events, name="events", daemon=True).start()
    server = ControlServer(run.toolstack_socket, toolstack, StoreView(xs), toolstack.stopped)
    threading.Thread(target=server.serve, name="control", daemon=True).start()
    log.info("dom0 up; toolstack on %s", run.toolstack_socket)
    toolstack.stopped.wait()
    server.close()
    if host_socket is not None:
        host_socket.close()
    backends.stop()
    for bridge in remove_our_bridges():
        log.info("removed bridge %s", bridge)
    log.info("dom0 stopping")
    return 0
