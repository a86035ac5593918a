"""Node operations with XenStore semantics, checked against the caller's permissions and quota.

Each function runs on a View (the live tree or a transaction) for domain ``domid`` and either
returns what it read, or makes its change and returns the ``Change`` for watches (None when
nothing changed). Refusals raise XsError with the errno xenstored uses:

* a missing node is ENOENT, unless the caller could not read (or, to create, write) the nearest
  existing ancestor: then EACCES, so nobody learns what exists in a home they cannot see;
* reading needs r or b; writing, creating a child, removing and listing need the access below;
* only the owner sets permissions (EACCES) and only dom0 changes the owner (EPERM);
* past a quota: ENOSPC. A value's size and a permission list's length are checked here; the
  nodes and bytes each domain owns are checked once the request is over
  (core.Store._check_quotas), so both quotas hold for every operation however many nodes it
  makes, and a refused request changes nothing. (In a transaction, that is at its commit.)

``quota`` is None for dom0, which is exempt.
"""

from __future__ import annotations

from dataclasses import replace

from channels.xenbus import basename, parent_path
from channels.xs_wire import XENSTORE_PAYLOAD_MAX, Perm, XsErrno, XsError
from xenstored import perms as P
from xenstored.quota import Quota
from xenstored.transactions import Change
from xenstored.tree import Node, View


def _missing(view: View, domid: int, path: str, access: P.Access) -> XsError:
    """The error for a missing ``path``: EACCES if the nearest existing ancestor is off limits."""
    ancestor = path
    while ancestor != "/":
        ancestor = parent_path(ancestor)
        node = view.get(ancestor)
        if node is not None:
            if not P.allows(node.perms, domid, access):
                return XsError(XsErrno.EACCES, path)
            break
    return XsError(XsErrno.ENOENT, path)


def lookup(view: View, domid: int, path: str, access: P.Access) -> Node:
    """The node at ``path`` if ``domid`` may ``access`` it; XsError ENOENT/EACCES otherwise."""
    node = view.get(path)
    if node is None:
        raise _missing(view, domid, path, access)
    if not P.allows(node.perms, domid, access):
        raise XsError(XsErrno.EACCES, path)
    return node


def read(view: View, domid: int, path: str) -> bytes:
    return lookup(view, domid, path, "r").value


def directory(view: View, domid: int, path: str) -> list[str]:
    names = sorted(lookup(view, domid, path, "r").children)
    if sum(len(n) + 1 for n in names) > XENSTORE_PAYLOAD_MAX:
        raise XsError(XsErrno.E2BIG, path, "directory listing does not fit one message")
    return names


def get_perms(view: View, domid: int, path: str) -> tuple[Perm, ...]:
    return lookup(view, domid, path, "r").perms


def write(view: View, domid: int, quota: Quota | None, path: str, value: bytes) -> Change:
    """Set ``path``'s value, creating it and missing parents (which need write on the ancestor)."""
    if quota is not None and len(value) > quota.value_size:
        raise XsError(XsErrno.ENOSPC, path, f"value of {len(value)} bytes over {quota.value_size}")
    node = view.get(path)
    if node is None:
        _create(view, domid, path, value)
    elif not P.allows(node.perms, domid, "w"):
        raise XsError(XsErrno.EACCES, path)
    else:
        view.put(path, replace(node, value=value))
    return Change(path)


def mkdir(view: View, domid: int, path: str) -> Change | None:
    """Create ``path`` empty; an existing node is left alone if the caller may write it."""
    node = view.get(path)
    if node is not None:
        if not P.allows(node.perms, domid, "w"):
            raise XsError(XsErrno.EACCES, path)
        return None
    _create(view, domid, path, b"")
    return Change(path)


def _create(view: View, domid: int, path: str, value: bytes) -> None:
    missing = [path]
    while (parent := view.get(parent_path(missing[-1]))) is None:
        missing.append(parent_path(missing[-1]))
    if not P.allows(parent.perms, domid, "w"):
        raise XsError(XsErrno.EACCES, path)
    for new_path in reversed(missing):
        parent_at = parent_path(new_path)
        parent = view.get(parent_at)
        assert parent is not None
        view.put(parent_at, replace(parent, children=parent.children | {basename(new_path)}))
        node_value = value if new_path == path else b""
        view.put(new_path, Node(node_value, P.inherit(parent.perms, domid)))


def rm(view: View, domid: int, path: str) -> Change | None:
    """Remove ``path`` and its subtree; absent is fine if its parent exists."""
    if path == "/":
        raise XsError(XsErrno.EINVAL, path, "the root node cannot be removed")
    node = view.get(path)
    if node is None:
        error = _missing(view, domid, path, "w")
        if error.errno_name == XsErrno.EACCES or view.get(parent_path(path)) is None:
            raise error
        return None
    if not P.allows(node.perms, domid, "w"):
        raise XsError(XsErrno.EACCES, path)
    return Change(path, remove_subtree(view, path))


def remove_subtree(view: View, path: str) -> dict[str, tuple[Perm, ...]]:
    """Remove ``path`` and everything below (no permission check); map removed paths to perms."""
    removed: dict[str, tuple[Perm, ...]] = {}
    stack = [path]
    while stack:
        current = stack.pop()
        node = view.get(current)
        if node is None:
            continue
        removed[current] = node.perms
        stack.extend(f"{current.rstrip('/')}/{child}" for child in node.children)
        view.delete(current)
    parent_at = parent_path(path)
    parent = view.get(parent_at)
    if parent is not None:
        view.put(parent_at, replace(parent, children=parent.children - {basename(path)}))
    return removed


def set_perms(
    view: View, domid: int, quota: Quota | None, path: str, perms: tuple[Perm, ...]
) -> Change:
    """Replace ``path``'s permission list (owner first)."""
    if not perms:
        raise XsError(XsErrno.EINVAL, path, "empty permission list")
    if quota is not None and len(perms) > quota.perms:
        raise XsError(XsErrno.ENOSPC, path, f"more than {quota.perms} permission entries")
    node = view.get(path)
    if node is None:
        raise _missing(view, domid, path, "w")
    if not P.is_owner(node.perms, domid):
        raise XsError(XsErrno.EACCES, path, "only the owner may set permissions")
    if perms[0].domid != node.owner and not P.is_privileged(domid):
        raise XsError(XsErrno.EPERM, path, "only dom0 may change a node's owner")
    view.put(path, replace(node, perms=perms))
    return Change(path)
