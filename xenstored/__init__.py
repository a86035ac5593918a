"""The store (xenstored): XenStore, run by dom0 or by a stub domain, one module per concept.

Code map::

    core.py          Store: the lock, tree, connections, domains; atomic requests, watch firing,
                     quota checks, transaction expiry; introduce/release
    requests.py      one handler per message type (xenstored's wire_funcs[]), payload parsing
    nodes.py         read/write/mkdir/rm/directory/perms with permission and quota checks
    tree.py          Node, the live Tree (generations, undo log, owned nodes and bytes), View
    journal.py       the tree on disk (snapshot + one line per request) for a restarted dom0
    perms.py         permission rules: owner first, inheritance, who may change what
    watches.py       watch records and which change fires which watch
    transactions.py  private overlay per transaction, EAGAIN on conflicting commit or expiry
    domains.py       introduced domains, per-domain quota overrides
    quota.py         Quota and xenstored's default limits
    connection.py    Connection: framing, dispatch, bounded output and backpressure
    local.py         in-process transport (client and store in one process)
    stream.py        stream-socket transport and the dom0-local Unix socket server

Typical use::

    store = Store()
    with connect_local(store, 0) as dom0:            # or UnixSocketServer(store, path)
        dom0.client.write("/local/domain/3/name", "web")
    conn = store.connect(domid, send)                # a transport of its own
    conn.feed(data)                                  # from the transport's reader
"""

from channels.errors import ProtocolViolation
from channels.xs_wire import Perm, XsError
from xenstored.connection import Connection
from xenstored.core import Store
from xenstored.local import LocalTransport, connect_local
from xenstored.quota import Quota
from xenstored.stream import StreamConnection, UnixSocketServer

__all__ = [
    "Connection",
    "LocalTransport",
    "Perm",
    "ProtocolViolation",
    "Quota",
    "Store",
    "StreamConnection",
    "UnixSocketServer",
    "XsError",
    "connect_local",
]
