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

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hyperd import cgroup
from tests import hostile_guest
from tests.integration.conftest import (
    RUN,
    domain_info,
    hyperctl,
    in_domain,
    iperf3_report,
    start_iperf3_server,
)
from tests.integration.test_block import disk, sha256_of
from xenstored import Quota

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

    def __init__(
        self, domid: int, kernel_pid: int, *options: str, seconds: float = STORM_SECONDS
    ) -> None:
        self.proc = hostile_guest.start(domid, kernel_pid, seconds, *options)

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
def hostile() -> Iterator[Callable[..., HostileGuest]]:
    """``hostile(name, *options, seconds=S)``: tests/hostile_guest.py in place of ``name``'s
    kernel."""
    started: list[HostileGuest] = []

    def start(name: str, *options: str, seconds: float = STORM_SECONDS) -> HostileGuest:
        info = domain_info(name)
        assert info is not None
        guest = HostileGuest(info["domid"], info["pid"], *options, seconds=seconds)
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
    report = iperf3_report(out)
    rate = report["end"]["sum_received"]["bits_per_second"] / 1e9
    print(f"the neighbours' iperf3 under the storm: {rate:.2f} Gbit/s")
    assert report["end"]["sum_received"]["bytes"] > 0
    assert guest.proc.poll() is None, "the attacker storms on throughout"

    hyperctl("destroy", client)
    assert sha256_of(image, 16 * MiB) == written


class LargestSizes:
    """The largest size each of ``paths`` reaches, sampled by a thread every few ms until
    ``stop()`` (a file compacted in between is missed, never overstated)."""

    def __init__(self, *paths: Path) -> None:
        self.largest = dict.fromkeys(paths, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            for path in self.largest:
                try:
                    self.largest[path] = max(self.largest[path], path.stat().st_size)
                except FileNotFoundError:
                    pass  # not made yet

    def stop(self) -> dict[Path, int]:
        self._stop.set()
        self._thread.join(10)
        return self.largest


# Each store file stays under max(1 MiB, the live tree), plus what the store records while a new
# snapshot is being written (a few KB here; never more than as much again): here the live tree is
# mostly the guest's memory quota of 2 MiB (2.1 MiB each when measured), whatever it writes.
# Before issue 12 the same guest grew the journal to 1.4 GiB (114 MiB after its first 300 writes).
STORE_FILES_BOUND = 4 * MiB
JOURNAL_SECONDS = 15.0  # of rewriting values at the quota (about 1 MB/s through the ring)


def test_a_guest_rewriting_its_store_nodes_leaves_the_journal_bounded(
    make_domain: Callable[..., str], hostile: Callable[..., HostileGuest]
) -> None:
    attacker = make_domain("")
    dom0_pid = domain_info("Domain-0")["pid"]  # type: ignore[index]
    files = RUN.root / "store.journal", RUN.root / "store.snapshot"
    sizes = LargestSizes(*files)

    guest = hostile(attacker, "--journal", seconds=JOURNAL_SECONDS)
    guest.next_line("children=200")
    guest.next_line("rewrote data=100")
    issue_case = dict(sizes.largest)  # the issue's case: 117 MB of journal here before the fix
    quota = guest.next_line("quota")
    rewrote = guest.next_line("rewrote values")
    largest = sizes.stop()

    written = int(rewrote.split("bytes=")[1])
    journal, snapshot = (largest[f] for f in files)
    print(f"{quota.strip()}; {rewrote.strip()}: the journal reached {journal / MiB:.2f} MiB "
          f"({issue_case[files[0]] / MiB:.2f} MiB after the first 300 writes), the snapshot "
          f"{snapshot / MiB:.2f} MiB")  # fmt: skip
    assert written > 2 * STORE_FILES_BOUND, "the guest must write more than the bound"
    assert journal < STORE_FILES_BOUND, f"the journal reached {journal} bytes"
    assert snapshot < STORE_FILES_BOUND, f"the snapshot reached {snapshot} bytes"
    nodes = int(quota.split()[1].removeprefix("nodes="))
    assert nodes < Quota().nodes, "the memory quota, not the node count, must refuse it"

    assert domain_info("Domain-0")["pid"] == dom0_pid  # type: ignore[index]
    neighbour = make_domain("")
    assert hyperctl("exec", neighbour, "--", "echo", "alive").out == "alive\n"
