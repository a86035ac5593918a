"""In-process transport: an XsClient wired straight into a Store connection.

Requests run on the calling thread (the client's send feeds the connection, whose replies feed
the client back before send returns), so it needs no threads. dom0 code living in the store's own
process can use it, and tests use it as the reference transport.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from channels.xs import DEFAULT_TIMEOUT, XsClient, XsConnectionLost
from xenstored.core import Store


class LocalTransport:
    """``client`` talks to ``store`` as ``domid``; ``close()`` disconnects both ends."""

    def __init__(self, store: Store, domid: int, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.client = XsClient(self._to_store, timeout=timeout)
        self.conn = store.connect(domid, self._to_client, self._closed_by_store)

    def _to_store(self, data: bytes) -> None:
        if self.conn.closed:
            raise XsConnectionLost(
                f"in-process store connection of domain {self.conn.domid} is closed"
            )
        self.conn.feed(data)

    def _to_client(self, data: bytes) -> None:
        self.client.feed(data)

    def _closed_by_store(self) -> None:
        self.client.connection_lost(XsConnectionLost("the store dropped the connection"))

    def close(self) -> None:
        self.client.connection_lost(XsConnectionLost("in-process store connection closed"))
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect_local(store: Store, domid: int, *, timeout: float = DEFAULT_TIMEOUT) -> LocalTransport:
    """An in-process client of ``store`` acting as ``domid``."""
    return LocalTransport(store, domid, timeout=timeout)
