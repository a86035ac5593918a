"""dom0's fork server (channels/forkserver.py): every process dom0 starts comes from it.

Those are each domain's relay (xenstored/relay.py) and each device's data-path worker
(backends/datapath_worker.py). ``main`` starts it first thing, while dom0 is still single-threaded:
it is then a fork of dom0 itself, every module already imported and its pages shared with
dom0's, so a relay or a worker costs a fork, not an interpreter and its imports. Anything else
(a unit test) gets one on first use, as a new interpreter.
"""

from __future__ import annotations

from channels.forkserver import Spawner

#: What dom0's children run: the relay, and each device kind's backend worker.
PRELOAD = (
    "xenstored.relay",
    "backends.netback.worker",
    "backends.blkback.worker",
    "backends.p9back.worker",
)

spawner = Spawner(PRELOAD)


def start() -> None:
    """Fork dom0 into its fork server now: call while dom0 has no other thread."""
    spawner.fork = True
    spawner.start()
