"""Which domains the store knows (INTRODUCE/RELEASE) and the quota each one runs under."""

from __future__ import annotations

from channels.xs_wire import check_domid
from xenstored.perms import is_privileged
from xenstored.quota import Quota


class Domains:
    """Introduced domains and per-domain quota overrides. Callers hold the store lock."""

    def __init__(self, default_quota: Quota) -> None:
        self.default_quota = default_quota
        self._overrides: dict[int, Quota] = {}
        self._introduced: set[int] = set()

    def limits(self, domid: int) -> Quota:
        """The quota values that apply to ``domid`` (dom0 gets them too, for output bounds)."""
        return self._overrides.get(domid, self.default_quota)

    def quota(self, domid: int) -> Quota | None:
        """The quota to enforce on ``domid``'s requests; None for dom0, which is exempt."""
        return None if is_privileged(domid) else self.limits(domid)

    def set_quota(self, domid: int, quota: Quota) -> None:
        self._overrides[check_domid(domid)] = quota

    def introduce(self, domid: int) -> bool:
        """Mark ``domid`` introduced; False if it already was."""
        if domid in self._introduced or is_privileged(domid):
            return False
        self._introduced.add(check_domid(domid))
        return True

    def release(self, domid: int) -> bool:
        """Forget ``domid``; False if it was not introduced."""
        self._overrides.pop(domid, None)
        if domid in self._introduced:
            self._introduced.discard(domid)
            return True
        return False

    def is_introduced(self, domid: int) -> bool:
        return is_privileged(domid) or domid in self._introduced
