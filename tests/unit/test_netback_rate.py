"""netback's credit scheduler: over many windows the rate is the configured one."""

from __future__ import annotations

import pytest

from backends.netback import datapath
from backends.netback.datapath import RateLimit
from tests.unit.pumps import both_pumps  # noqa: F401  (runs each test with both)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize("packet", [1514, 65226])
def test_long_run_rate_is_credit_per_window(monkeypatch: pytest.MonkeyPatch, packet: int) -> None:
    clock = Clock()
    monkeypatch.setattr(datapath.time, "monotonic", clock.monotonic)
    rate = RateLimit(credit=62_500, window_us=50_000)  # 10 Mbit/s
    sent = 0
    while clock.now < 1010.0:  # ten simulated seconds
        delay = rate.wait_time(packet)
        if delay:
            clock.now += delay
        else:
            sent += packet
    assert sent * 8 / 10 == pytest.approx(10e6, rel=0.08)


def test_a_packet_larger_than_the_credit_still_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(datapath.time, "monotonic", clock.monotonic)
    rate = RateLimit(credit=1000, window_us=50_000)
    assert rate.wait_time(65_000) == 0.0
    assert rate.wait_time(100) > 0, "its overdraft is paid before anything else goes"
