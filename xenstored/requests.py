"""Request handlers: one row per message type (xenstored's wire_funcs[]).

Each handler parses its payload (see channels.xs_wire for the formats), calls the store and
returns the reply payload, or raises XsError for an ERROR reply. Malformed arguments are EINVAL;
a privileged request from a domU is EACCES; a type nobody implements is ENOSYS; WATCH_EVENT and
ERROR are server-to-client only, so a client sending them gets EINVAL. The store lock is held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from channels.xenbus import SPECIAL_WATCH_PATHS, XsPathError, domain_path, resolve_path
from channels.xs_wire import (
    OK_PAYLOAD,
    Message,
    Perm,
    XsErrno,
    XsError,
    XsType,
    check_domid,
    join_strings,
    split_strings,
)
from xenstored import nodes
from xenstored.perms import is_privileged
from xenstored.watches import Watch

if TYPE_CHECKING:
    from xenstored.connection import Connection
    from xenstored.core import Store

# A watch event carries the changed path (up to 3072 bytes) and the token in one 4096-byte
# payload; longer tokens could make an event for some other domain's write unsendable.
MAX_WATCH_TOKEN = 1022


@dataclass(frozen=True, slots=True)
class Handler:
    fn: Callable[[Store, Connection, Message], bytes]
    privileged: bool = False


def dispatch(store: Store, conn: Connection, msg: Message) -> bytes:
    handler = HANDLERS.get(msg.type)
    if handler is None:
        raise XsError(XsErrno.ENOSYS, "", f"{msg.type.name} is not implemented")
    if handler.privileged and not is_privileged(conn.domid):
        raise XsError(XsErrno.EACCES, "", f"{msg.type.name} is for dom0 only")
    return handler.fn(store, conn, msg)


# -- argument parsing ----------------------------------------------------------------------------


def _args(msg: Message, least: int, most: int) -> list[str]:
    """The payload's NUL-terminated strings, requiring ``least``..``most`` of them."""
    parts = split_strings(msg.payload)
    if not msg.payload.endswith(b"\0") or not least <= len(parts) <= most:
        raise XsError(XsErrno.EINVAL, "", f"{msg.type.name} takes {least}..{most} strings")
    return parts


def _path(conn: Connection, raw: str) -> str:
    try:
        return resolve_path(raw, conn.domid)
    except XsPathError as exc:
        raise XsError(XsErrno.EINVAL, raw[:80], str(exc)) from exc


def _one_path(conn: Connection, msg: Message) -> str:
    return _path(conn, _args(msg, 1, 1)[0])


def _domid(text: str) -> int:
    if not text.isascii() or not text.isdecimal() or len(text) > 5:
        raise XsError(XsErrno.EINVAL, "", f"bad domid {text[:16]!r}")
    try:
        return check_domid(int(text))
    except ValueError as exc:
        raise XsError(XsErrno.EINVAL, "", str(exc)) from exc


def _watch_path(conn: Connection, raw: str) -> tuple[str, str]:
    """(absolute path, prefix to strip from reported paths) for a WATCH/UNWATCH path."""
    if raw in SPECIAL_WATCH_PATHS:
        return raw, ""
    path = _path(conn, raw)
    prefix = "" if raw.startswith("/") else domain_path(conn.domid) + "/"
    return path, prefix


# -- node requests -------------------------------------------------------------------------------


def _read(store: Store, conn: Connection, msg: Message) -> bytes:
    view, _ = store.view(conn, msg.tx_id)
    return nodes.read(view, conn.domid, _one_path(conn, msg))


def _directory(store: Store, conn: Connection, msg: Message) -> bytes:
    view, _ = store.view(conn, msg.tx_id)
    return join_strings(*nodes.directory(view, conn.domid, _one_path(conn, msg)))


def _get_perms(store: Store, conn: Connection, msg: Message) -> bytes:
    view, _ = store.view(conn, msg.tx_id)
    found = nodes.get_perms(view, conn.domid, _one_path(conn, msg))
    return join_strings(*(p.encode() for p in found))


def _write(store: Store, conn: Connection, msg: Message) -> bytes:
    raw, sep, value = msg.payload.partition(b"\0")
    if not sep:
        raise XsError(XsErrno.EINVAL, "", "WRITE needs path\\0value")
    path = _path(conn, raw.decode("utf-8", "surrogateescape"))
    view, tx = store.view(conn, msg.tx_id)
    quota = store.domains.quota(conn.domid)
    store.changed(nodes.write(view, conn.domid, quota, path, value), tx)
    return OK_PAYLOAD


def _mkdir(store: Store, conn: Connection, msg: Message) -> bytes:
    path = _one_path(conn, msg)
    view, tx = store.view(conn, msg.tx_id)
    store.changed(nodes.mkdir(view, conn.domid, path), tx)
    return OK_PAYLOAD


def _rm(store: Store, conn: Connection, msg: Message) -> bytes:
    path = _one_path(conn, msg)
    view, tx = store.view(conn, msg.tx_id)
    store.changed(nodes.rm(view, conn.domid, path), tx)
    return OK_PAYLOAD


def _set_perms(store: Store, conn: Connection, msg: Message) -> bytes:
    raw, *texts = _args(msg, 2, 64)
    path = _path(conn, raw)
    try:
        new = tuple(Perm.parse(t) for t in texts)
    except ValueError as exc:
        raise XsError(XsErrno.EINVAL, path, str(exc)) from exc
    view, tx = store.view(conn, msg.tx_id)
    quota = store.domains.quota(conn.domid)
    store.changed(nodes.set_perms(view, conn.domid, quota, path, new), tx)
    return OK_PAYLOAD


# -- watches -------------------------------------------------------------------------------------


def _watch(store: Store, conn: Connection, msg: Message) -> bytes:
    raw, token, *rest = _args(msg, 2, 3)
    path, prefix = _watch_path(conn, raw)
    if not token or len(token.encode("utf-8", "surrogateescape")) > MAX_WATCH_TOKEN:
        raise XsError(XsErrno.EINVAL, path, f"watch token must be 1..{MAX_WATCH_TOKEN} bytes")
    depth = None
    if rest:
        if not rest[0].isascii() or not rest[0].isdecimal() or len(rest[0]) > 4:
            raise XsError(XsErrno.EINVAL, path, f"bad watch depth {rest[0][:16]!r}")
        depth = int(rest[0])
    store.add_watch(Watch(conn, path, token, prefix, depth))
    return OK_PAYLOAD


def _unwatch(store: Store, conn: Connection, msg: Message) -> bytes:
    raw, token = _args(msg, 2, 2)
    path, _ = _watch_path(conn, raw)
    if store.watches.remove(conn, path, token) is None:
        raise XsError(XsErrno.ENOENT, path, f"no watch with token {token[:64]!r}")
    return OK_PAYLOAD


def _reset_watches(store: Store, conn: Connection, msg: Message) -> bytes:
    store.watches.remove_conn(conn)
    store.end_transactions(conn)
    return OK_PAYLOAD


# -- transactions --------------------------------------------------------------------------------


def _transaction_start(store: Store, conn: Connection, msg: Message) -> bytes:
    if msg.tx_id != 0:
        raise XsError(XsErrno.EBUSY, "", "TRANSACTION_START inside a transaction")
    return join_strings(str(store.start_transaction(conn).tx_id))


def _transaction_end(store: Store, conn: Connection, msg: Message) -> bytes:
    (arg,) = _args(msg, 1, 1)
    if arg not in ("T", "F"):
        raise XsError(XsErrno.EINVAL, "", f"TRANSACTION_END takes T or F, not {arg[:16]!r}")
    _, tx = store.view(conn, msg.tx_id)
    if tx is None:
        raise XsError(XsErrno.ENOENT, "", "TRANSACTION_END without a transaction id")
    store.end_transaction(conn, tx, commit=arg == "T")
    return OK_PAYLOAD


# -- domains -------------------------------------------------------------------------------------


def _introduce(store: Store, conn: Connection, msg: Message) -> bytes:
    domid = _domid(_args(msg, 1, 3)[0])
    store.introduce_domain(domid)
    return OK_PAYLOAD


def _release(store: Store, conn: Connection, msg: Message) -> bytes:
    domid = _domid(_args(msg, 1, 1)[0])
    if is_privileged(domid):
        raise XsError(XsErrno.EINVAL, "", "dom0 cannot be released")
    if not store.domains.is_introduced(domid):
        raise XsError(XsErrno.ENOENT, "", f"domain {domid} is not introduced")
    store.release_domain(domid)
    return OK_PAYLOAD


def _is_domain_introduced(store: Store, conn: Connection, msg: Message) -> bytes:
    domid = _domid(_args(msg, 1, 1)[0])
    return join_strings("T" if store.domains.is_introduced(domid) else "F")


def _get_domain_path(store: Store, conn: Connection, msg: Message) -> bytes:
    return join_strings(domain_path(_domid(_args(msg, 1, 1)[0])))


def _server_only(store: Store, conn: Connection, msg: Message) -> bytes:
    raise XsError(XsErrno.EINVAL, "", f"{msg.type.name} is sent by the store, not to it")


HANDLERS: dict[XsType, Handler] = {
    XsType.DIRECTORY: Handler(_directory),
    XsType.READ: Handler(_read),
    XsType.GET_PERMS: Handler(_get_perms),
    XsType.WATCH: Handler(_watch),
    XsType.UNWATCH: Handler(_unwatch),
    XsType.TRANSACTION_START: Handler(_transaction_start),
    XsType.TRANSACTION_END: Handler(_transaction_end),
    XsType.INTRODUCE: Handler(_introduce, privileged=True),
    XsType.RELEASE: Handler(_release, privileged=True),
    XsType.GET_DOMAIN_PATH: Handler(_get_domain_path),
    XsType.WRITE: Handler(_write),
    XsType.MKDIR: Handler(_mkdir),
    XsType.RM: Handler(_rm),
    XsType.SET_PERMS: Handler(_set_perms),
    XsType.WATCH_EVENT: Handler(_server_only),
    XsType.ERROR: Handler(_server_only),
    XsType.IS_DOMAIN_INTRODUCED: Handler(_is_domain_introduced, privileged=True),
    XsType.RESET_WATCHES: Handler(_reset_watches),
}
