"""Per-domain store quotas, with xenstored's defaults.

Quotas bound what one unprivileged domain can make the store hold: a domain past one gets an
error reply (ENOSPC, E2BIG; EAGAIN for an expired transaction) while every other domain carries
on. Nodes and their bytes are charged to each node's owner, as xenstored charges them. dom0 is
exempt from all of them except the output bounds (``outstanding``, ``queued_events``), which
are flow control: they keep memory bounded when any client stops reading, privileged or not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits for one domain. Defaults follow xenstored (tools/xenstored/domain.c)."""

    nodes: int = 1000  # nodes owned by the domain -> ENOSPC
    # Bytes of the paths, values and permission entries of the nodes the domain owns -> ENOSPC;
    # also what its open transactions may hold together. xenstored (since XSA-326) refuses past
    # 2.5 MiB and warns past 2 MiB, counting a record header and child list per node on top of
    # these: 2 MiB of ours is at least as tight, and hundreds of times what a guest's frontends
    # use.
    memory: int = 2 << 20
    watches: int = 128  # watches registered by the domain -> E2BIG
    transactions: int = 10  # transactions open at once -> ENOSPC
    # Seconds a transaction may stay open before the store drops it -> EAGAIN. Xen has no such
    # limit; 20 s is xenstored's patience with a client that does not take a watch event
    # (timeout_watch_event_msec), and libxl's own transactions last milliseconds.
    transaction_lifetime: int = 20
    transaction_nodes: int = 1024  # nodes one transaction may touch -> ENOSPC
    value_size: int = 2048  # bytes in one node's value -> ENOSPC
    perms: int = 5  # entries in one node's permission list -> ENOSPC
    outstanding: int = 20  # unsent replies before the connection stops reading requests
    queued_events: int = 256  # unsent watch events before they collapse per watch

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"store quota {name}={value!r} must be a positive int")
