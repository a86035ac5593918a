"""A domain that storms its doorbells and floods its store costs dom0 little, its neighbours
nothing.

The attacker is a real domain whose kernel is stopped and replaced by tests/hostile_guest.py,
running in the domain's cgroup (so under its CPU cap) with the domain's own store page and
doorbells: it fills its store quota, stops reading replies, then posts every doorbell it has in
a tight loop. dom0 must stay nearly idle meanwhile (backends and relays slow a peer that rings
for nothing down, as Linux's late EOI does) and its memory must not grow with the flood; a
neighbour created during the storm must connect and move data. The neighbour's throughput as a
fraction of its undisturbed rate is bench/storm.py's figure: tests assert no timings.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hyper import cgroup
from tests import hostile_guest
from tests.integration.conftest import (
    domain_info,
    hyperctl,
    in_domain,
    start_iperf3_server,
)
from tests.integration.test_block import disk, sha256_of

pytestmark = pytest.mark.root

MiB = 1 << 20
STORM_SECONDS = 4.0
# What the storm may cost dom0. With the late-EOI slowdown it is a few wakeups a second (0.002 s
# of CPU in 4 s when measured); without it in the relay alone, 0.8 s, though the attacker's
# own loop runs under a 20 % cap.
DOM0_CPU_SHARE = 0.05
DOM0_MEMORY_GROWTH = 32 * MiB  # the quota is 1000 nodes of 2 KiB, and replies are bounded


class HostileGuest:
    """tests/hostile_guest.py in place of a domain's stopped kernel."""

    def __init__(self, domid: int, kernel_pid: int) -> None:
        self.proc = hostile_guest.start(domid, kernel_pid, STORM_SECONDS)

    def next_line(self, starts: str) -> str:
        """The guest's next line, which must start with ``starts`` (its phases, in order)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the guest's own timeouts bound this
        assert line.startswith(starts), f"hostile guest: {line!r} (exit {self.proc.poll()})"
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def hostile() -> Iterator[Callable[[str], HostileGuest]]:
    started: list[HostileGuest] = []

    def start(name: str) -> HostileGuest:
        info = domain_info(name)
        assert info is not None
        guest = HostileGuest(info["domid"], info["pid"])
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.close()


def test_a_storming_flooding_domain_costs_dom0_little_and_its_neighbours_nothing(
    make_domain: Callable[..., str],
    hostile: Callable[[str], HostileGuest],
    tmp_path: Path,
    lan: tuple[str, str],
) -> None:
    bridge, net = lan
    attacker = make_domain(
        f"cap: 20\nvif:\n  - bridge: {bridge}\n    ip: {net}.9/24\ndisk:\n"
        + disk(tmp_path / "attacker.img", size="16M")
    )
    dom0 = cgroup.open_hierarchy().open("dom0")
    memory_before = dom0.memory_bytes()

    guest = hostile(attacker)
    filled = guest.next_line("filled")
    assert re.fullmatch(r"filled nodes=\d+ watches=\d+\n", filled), filled
    unread = guest.next_line("unread")
    assert int(unread.split("=")[1]) > 0, "the store must have stopped taking requests"
    guest.next_line("storming")
    cpu_before, started = dom0.cpu_time_ns(), time.monotonic()
    stormed = guest.next_line("stormed")
    dom0_cpu = (dom0.cpu_time_ns() - cpu_before) / 1e9
    elapsed = time.monotonic() - started
    memory_growth = dom0.memory_bytes() - memory_before
    print(
        f"{filled.strip()}; {unread.strip()}; {stormed.strip()}: dom0 used {dom0_cpu:.3f} s "
        f"of CPU in {elapsed:.1f} s, its memory grew {memory_growth / MiB:.1f} MiB"
    )
    assert int(stormed.split("rings=")[1]) > 100_000
    assert dom0_cpu < DOM0_CPU_SHARE * elapsed, f"dom0 used {dom0_cpu:.2f} s in {elapsed:.1f} s"
    assert memory_growth < DOM0_MEMORY_GROWTH, f"dom0 grew {memory_growth / MiB:.1f} MiB"

    # The storm goes on: neighbours built now connect through the same store and backends.
    image = tmp_path / "neighbour.img"
    server = make_domain(f"vif:\n  - bridge: {bridge}\n    ip: {net}.2/24\n")
    client = make_domain(
        f"vif:\n  - bridge: {bridge}\n    ip: {net}.3/24\ndisk:\n" + disk(image, size="64M")
    )
    start_iperf3_server(server)
    stream = in_domain(client, "iperf3", "-c", f"{net}.2", "-t", "3", "-J")
    written = hyperctl(
        "exec", client, "--", "sh", "-c",
        "head -c 16M /dev/urandom | tee /tmp/data | sha256sum && "
        "dd if=/tmp/data of=/dev/xvda bs=1M oflag=direct conv=fsync,notrunc 2>/dev/null",
    ).out.split()[0]  # fmt: skip
    out, err = stream.communicate(timeout=60)
    assert stream.returncode == 0, err
    report = json.loads(out)
    rate = report["end"]["sum_received"]["bits_per_second"] / 1e9
    print(f"the neighbours' iperf3 under the storm: {rate:.2f} Gbit/s")
    assert report["end"]["sum_received"]["bytes"] > 0
    assert guest.proc.poll() is None, "the attacker storms on throughout"

    hyperctl("destroy", client)
    assert sha256_of(image, 16 * MiB) == written
