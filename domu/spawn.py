"""The domain kernel's fork server (channels/forkserver.py): it starts the kernel's FUSE servers
(a disk's blkfront server, a share's p9front file system).

The kernel starts it right after it forks the workload's init and before it starts any thread:
it is then a fork of the kernel itself, inside the domain's sandbox by construction (its
namespaces, its cgroup, its ids, no host privilege), every module already imported, so a disk
or a share costs a fork, not an interpreter and its imports. Anything else (a unit test, or a
kernel whose server died) gets one as a new interpreter on first use.
"""

from __future__ import annotations

from channels.forkserver import Spawner

#: What the kernel's children run: each frontend's FUSE server.
PRELOAD = ("domu.blkfront.server", "domu.p9front.fs")

spawner = Spawner(PRELOAD)


def start() -> None:
    """Fork the kernel into its fork server now: call while the kernel has no other thread."""
    spawner.fork = True
    spawner.start()
