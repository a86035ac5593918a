"""Watch registrations and which changes fire them.

A watch on ``P`` fires for a change at ``P`` or below it, reporting the changed path. When a
change removes an ancestor of ``P`` (or ``P`` itself), the watch fires with ``P``. An optional depth
limits how far below ``P`` changes count. A watch registered with a relative path reports relative
paths. Special paths (``@introduceDomain``, ``@releaseDomain``) fire only through
``WatchTable.special``. Who may receive an event is the store's decision (see core.Store._fire).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from channels.xenbus import is_subpath

if TYPE_CHECKING:
    from xenstored.connection import Connection


@dataclass(eq=False)
class Watch:
    conn: Connection
    path: str  # absolute, or a special "@" path
    token: str
    prefix: str  # stripped from reported paths: "<home>/" for a relative watch, else ""
    depth: int | None = None

    def event_path(self, changed: str, removal: bool) -> str | None:
        """The path to report for a change at ``changed``, or None if this watch does not fire."""
        if is_subpath(changed, self.path):
            if self.depth is not None and _depth_below(changed, self.path) > self.depth:
                return None
            return changed
        if removal and is_subpath(self.path, changed):
            return self.path
        return None

    def reported(self, path: str) -> str:
        if self.prefix and path.startswith(self.prefix):
            return path[len(self.prefix) :]
        return path


def _depth_below(path: str, base: str) -> int:
    if path == base:
        return 0
    rest = path[len(base) :] if base != "/" else path
    return rest.strip("/").count("/") + 1


class WatchTable:
    """Every registered watch, by connection. Callers hold the store lock."""

    def __init__(self) -> None:
        self._by_conn: dict[Connection, dict[tuple[str, str], Watch]] = {}

    def add(self, watch: Watch) -> bool:
        """Register ``watch``; False if its connection already has this (path, token)."""
        table = self._by_conn.setdefault(watch.conn, {})
        key = (watch.path, watch.token)
        if key in table:
            return False
        table[key] = watch
        return True

    def remove(self, conn: Connection, path: str, token: str) -> Watch | None:
        return self._by_conn.get(conn, {}).pop((path, token), None)

    def remove_conn(self, conn: Connection) -> list[Watch]:
        return list(self._by_conn.pop(conn, {}).values())

    def count(self, conn: Connection) -> int:
        return len(self._by_conn.get(conn, {}))

    def is_registered(self, watch: Watch) -> bool:
        return self._by_conn.get(watch.conn, {}).get((watch.path, watch.token)) is watch

    def all(self) -> list[Watch]:
        return [w for table in self._by_conn.values() for w in table.values()]

    def nodes(self) -> list[Watch]:
        return [w for w in self.all() if not w.path.startswith("@")]

    def special(self, path: str) -> list[Watch]:
        return [w for w in self.all() if w.path == path]
