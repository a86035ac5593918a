"""The store domain's kernel: pid 1 of the stub domain that runs the store (Xen's xenstore stubdom).

hyperd builds this domain first when it starts with ``--store-domain`` (hyperd/store_domain.py),
in the same sandbox as any domU: its own namespaces, a private host id range, no host
privilege, a /dev/shm view holding only the rings it serves. Its kernel runs no frontend and no
workload: it runs the store (xenstored/), its tree kept in the host directory bound into the
sandbox at ``sandbox.STATE_MOUNT`` (``state_dir`` in the boot parameters, the kernel's alone),
and serves every domain's store ring through a relay process per domain (xenstored/rings.py),
forked from the kernel's fork server so that a guest that breaks its page crashes its relay, not
the store.

Restarted after a death (``recover``), it starts from the tree its journal holds and takes
every ring over. It ends only when hyperd destroys it (at halt).
"""

from __future__ import annotations

import logging
import queue
import socket
from pathlib import Path
from typing import Any

from channels import linux
from channels.hypercall import HypercallClient, SchedBooted
from domu import sandbox, spawn
from xenstored.core import Store
from xenstored.journal import Journal
from xenstored.rings import RingServer

log = logging.getLogger("xenstored")


def main(params: dict[str, Any], hypercall_fd: int) -> int:
    logging.basicConfig(level=logging.INFO, format=f"dom{params['domid']} %(name)s: %(message)s")
    linux.set_comm("hyper-xenstored")
    sandbox.enter_kernel_mounts(params["name"])
    # Still no thread: the relays' fork server is a fork of us, the relay already imported.
    spawn.spawner.preload[:] = ["xenstored.relay"]
    spawn.start()
    # hyperd's events may come before the ring server exists: they wait in its queue.
    work: queue.Queue[tuple[str, int]] = queue.Queue()

    def on_event(name: str, data: dict[str, Any]) -> None:
        if name == "dom0_restarted":
            RingServer.dom0_restarted(work, int(data["dom0_restarts"]))

    hc = HypercallClient(socket.socket(fileno=hypercall_fd), on_event=on_event)
    recover = bool(params.get("recover"))
    store = Store(journal=Journal(Path(sandbox.STATE_MOUNT)), recover=recover)
    server = RingServer(hc, store, spawn.spawner.server, work)
    server.serve_all(reconnect=recover)
    hc.call(SchedBooted())
    log.info("the store is up%s", ", recovered from its journal" if recover else "")
    server.run()
    return 0
