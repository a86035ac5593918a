"""The host ids a domain's processes run as: hyperd assigns them when it builds a domain, dom0
runs each data-path worker under them, and the domain's own kernel maps them inside.

Every domU gets a private range of ID_RANGE host uids and gids starting at ``uid_base(domid)``,
never shared with another domain: inside its user namespace, 0 is the domain's kernel and
WORKLOAD_UID runs its programs. A domain's shared objects (rings, doorbells, grant pools) are
owned by root with the group ``host_gid(domid)``, so only dom0 and that domain can open them.
"""

from __future__ import annotations

#: Inside the user namespace: uid/gid 0 is the domain kernel, WORKLOAD_UID runs programs.
WORKLOAD_UID = 1000
WORKLOAD_GID = 1000
#: Each domain gets this many host uids, starting at uid_base(domid).
ID_RANGE = 65536
_ID_BASE = 1_000_000_000


def uid_base(domid: int) -> int:
    """The first host uid (and gid) of a domain's private range; never shared between domains."""
    return _ID_BASE + domid * ID_RANGE


def id_map(domid: int) -> str:
    """The uid_map/gid_map line for a domain: inside 0..65535 -> its host range."""
    return f"0 {uid_base(domid)} {ID_RANGE}\n"


def host_gid(domid: int) -> int:
    """The host gid whose members may open a domain's objects: root's for dom0."""
    return 0 if domid == 0 else uid_base(domid)
