"""The store as `hyperctl store` browses it (xenstore-ls, -read, -write, -rm, -watch), as dom0.

Every request is allowed, with dom0's rights over the whole tree. A store request that fails
is raised in the error vocabulary of channels/errors.py (ENOENT is NotFound, ...), naming the
path.
"""

from __future__ import annotations

from channels import xenbus
from channels.errors import ERRNO_KINDS, HyperError
from channels.xs import Watch, XsClient, XsError


class StoreView:
    def __init__(self, xs: XsClient) -> None:
        self.xs = xs

    def ls(self, path: str) -> list[list[str]]:
        """Always allowed (as dom0): the subtree under ``path`` as (path, value) pairs."""
        return self._walk(path)

    def read(self, path: str) -> str:
        try:
            return self.xs.read(path)
        except Exception as exc:
            raise _store_failed(path, exc) from exc

    def write(self, path: str, value: str) -> dict[str, object]:
        try:
            self.xs.write(path, value)
        except Exception as exc:
            raise _store_failed(path, exc) from exc
        return {}

    def rm(self, path: str) -> dict[str, object]:
        try:
            self.xs.rm(path)
        except Exception as exc:
            raise _store_failed(path, exc) from exc
        return {}

    def watch(self, path: str) -> Watch:
        """Always allowed (as dom0): a watch on ``path``, for the control socket to stream."""
        try:
            return self.xs.watch(path)
        except Exception as exc:
            raise _store_failed(path, exc) from exc

    def _walk(self, path: str) -> list[list[str]]:
        out = [[path, self.read(path)]]
        for child in self._directory(path):
            out.extend(self._walk(xenbus.join_path(path, child) if path != "/" else "/" + child))
        return out

    def _directory(self, path: str) -> list[str]:
        try:
            return self.xs.directory(path)
        except Exception as exc:
            raise _store_failed(path, exc) from exc


def _store_failed(path: str, exc: Exception) -> HyperError:
    """A store request that failed, in the error vocabulary (ENOENT is NotFound, ...)."""
    kind = ERRNO_KINDS.get(exc.errno_name, HyperError) if isinstance(exc, XsError) else HyperError
    return kind(f"{path}: {exc}")
