"""A credit: a token bucket refilled at ``rate`` a second, at most ``burst`` saved up.

What a peer's requests may cost whoever serves them: hyperd charges a domU's hypercalls and
its log output to one (hyperd/budget.py), a backend's grant mapper its refreshes
(channels/grants.py), and dom0 the refreshes each data-path worker asks it for
(backends/datapath_worker.py). A charge that overdraws it says how long to wait before serving
again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Credit:
    """A token bucket: ``rate`` a second, at most ``burst`` saved up."""

    rate: float
    burst: float
    clock: Callable[[], float] | None = None  # seconds; None: time.monotonic (tests drive one)
    balance: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.balance = self.burst
        self.stamp = self._now()

    def charge(self, cost: float) -> float:
        """Take ``cost``; the seconds to wait before the next charge (0: go on now)."""
        now = self._now()
        self.balance = min(self.burst, self.balance + (now - self.stamp) * self.rate)
        self.stamp = now
        self.balance -= cost
        return 0.0 if self.balance >= 0 else -self.balance / self.rate

    def _now(self) -> float:
        return self.clock() if self.clock is not None else time.monotonic()
