"""Store permission rules (xenstore.txt), in one place.

A node's permission list is ``[owner, *others]``. The owner always has full access and its letter
is the access of every domain not listed; a listed domain gets its own letter. dom0 is privileged
and bypasses every check. A node created by an unprivileged domain inherits its parent's list with
that domain as the owner; one created by dom0 inherits the list unchanged. Only the owner may set
a node's permissions and only dom0 may hand a node to another owner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from channels.xs_wire import Perm

Access = Literal["r", "w"]

PRIVILEGED_DOMID = 0


def is_privileged(domid: int) -> bool:
    return domid == PRIVILEGED_DOMID


def owner(perms: Sequence[Perm]) -> int:
    return perms[0].domid


def is_owner(perms: Sequence[Perm], domid: int) -> bool:
    return is_privileged(domid) or owner(perms) == domid


def allows(perms: Sequence[Perm], domid: int, access: Access) -> bool:
    """True if ``domid`` may ``access`` ("r" read, "w" write) a node with ``perms``."""
    if is_owner(perms, domid):
        return True
    entry = next((p for p in perms[1:] if p.domid == domid), perms[0])
    return entry.can_read if access == "r" else entry.can_write


def inherit(parent: Sequence[Perm], creator: int) -> tuple[Perm, ...]:
    """The permissions of a node ``creator`` makes under a node with ``parent`` permissions."""
    if is_privileged(creator):
        return tuple(parent)
    return (Perm(creator, parent[0].perm), *parent[1:])
