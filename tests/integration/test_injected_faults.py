"""Faults injected at the channel (issue 16): netback drops, duplicates, corrupts or delays the
frames a vif's fault spec names, and blkback fails, delays or refuses the requests a disk's
names, whatever program runs inside, set in the config or with `hyperctl fault` while the
domain runs, and cleared again."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hyper import api
from tests.integration.conftest import hyperctl, iperf3_report, join_lan, wait_for
from tests.integration.test_block import disk
from tests.integration.test_network import vif

pytestmark = pytest.mark.root

# MiB 1 of the disk: sectors 2048-4095.
SECOND_MIB = "eio=100,sectors=2048-4095"


def read_mib(mib: int) -> list[str]:
    return ["dd", "if=/dev/xvda", "of=/dev/null", "bs=1M", f"skip={mib}", "count=1"]


def test_eio_fails_the_reads_of_its_sectors_and_no_others_until_cleared(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    assert hyperctl("exec", name, "--", *read_mib(1)).status == 0

    hyperctl("fault", "set", name, "xvda", SECOND_MIB)

    failed = hyperctl("exec", name, "--", *read_mib(1), check=False)
    assert failed.status != 0 and "Input/output error" in failed.err, failed
    assert hyperctl("exec", name, "--", *read_mib(4)).status == 0
    (listing,) = json.loads(hyperctl("fault", "list", name, "--json").out)
    assert listing["device"] == "xvda" and listing["faults"] == SECOND_MIB
    assert listing["injected"] > 0

    hyperctl("fault", "clear", name, "xvda")
    assert hyperctl("exec", name, "--", *read_mib(1)).status == 0
    (listing,) = json.loads(hyperctl("fault", "list", name, "--json").out)
    assert listing["faults"] == ""


def test_a_failed_flush_makes_fsync_fail_inside(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    target = tmp_path / "d.img"
    name = make_domain("disk:\n" + disk(target, size="16M") + "    faults: flush=fail\n")
    write = ["dd", "if=/dev/zero", "of=/dev/xvda", "bs=4k", "count=1", "conv=fsync"]

    failed = hyperctl("exec", name, "--", *write, check=False)

    assert failed.status != 0 and "Input/output error" in failed.err, failed
    hyperctl("fault", "clear", name, "xvda")
    assert hyperctl("exec", name, "--", *write).status == 0


def test_a_bad_spec_is_refused_with_one_line_and_changes_nothing(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    refused = hyperctl("fault", "set", name, "xvda", "eio=lots", check=False)
    assert refused.status == 2
    assert refused.err.strip().splitlines() == [
        "fault: eio: 'lots' is not a percentage from 0 to 100"
    ]
    (listing,) = json.loads(hyperctl("fault", "list", name, "--json").out)
    assert listing["faults"] == ""
    not_net = hyperctl("fault", "set", name, "xvda", "drop=10", check=False)
    assert not_net.status == 2
    assert not_net.err.strip().splitlines() == [
        "fault: drop: not a block fault (eio, sectors, latency, jitter, flush, seed)"
    ]


def test_the_api_drives_a_fault(make_domain: Callable[..., str], tmp_path: Path) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    domain = api.connect().domain(name)
    domain.set_faults("xvda", SECOND_MIB)
    assert domain.exec(read_mib(1)).status != 0
    assert domain.faults()["xvda"][0] == SECOND_MIB
    domain.clear_faults("xvda")
    assert domain.exec(read_mib(1)).status == 0
    assert domain.faults()["xvda"][0] == ""


# -- net ---------------------------------------------------------------------------------------


def ping_from(ns: str, address: str, count: int, interval: str = "0.2") -> dict[str, float]:
    """ping ``address`` from namespace ``ns`` (root: any interval): the share of replies lost
    (percent) and the RTT's min and avg (ms; absent when nothing came back)."""
    ping = ["ping", "-n", "-q", "-c", str(count), "-i", interval, "-W", "1", address]
    run = subprocess.run(
        ["ip", "netns", "exec", ns, *ping],
        capture_output=True,
        text=True,
    )
    lost = re.search(r"([\d.]+)% packet loss", run.stdout)
    assert lost is not None, run
    out = {"lost": float(lost[1])}
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/", run.stdout)
    if rtt is not None:
        out.update(min=float(rtt[1]), avg=float(rtt[2]))
    return out


def vif_counters(name: str) -> dict[str, int]:
    (entry,) = json.loads(hyperctl("network-list", "--json", name).out)
    return entry


@pytest.fixture
def guest_and_peer(
    make_domain: Callable[..., str], lan: tuple[str, str], peer_namespace: str
) -> tuple[str, str, str]:
    """A domain at .2 of the test's bridge, and a namespace at .100 that has reached it once
    (so that ARP is settled before any fault): (domain, its address, the namespace)."""
    bridge, net = lan
    name = make_domain(vif(bridge, f"{net}.2"))
    join_lan(peer_namespace, lan)
    assert ping_from(peer_namespace, f"{net}.2", 2)["lost"] == 0
    return name, f"{net}.2", peer_namespace


def test_drop_100_loses_every_frame_counted_until_cleared(
    guest_and_peer: tuple[str, str, str],
) -> None:
    name, address, ns = guest_and_peer

    hyperctl("fault", "set", name, "vif0", "drop=100")

    assert ping_from(ns, address, 3)["lost"] == 100
    assert vif_counters(name)["fault_dropped"] >= 3
    (listing,) = json.loads(hyperctl("fault", "list", name, "--json").out)
    assert listing["device"] == "vif0" and listing["faults"] == "drop=100"
    assert listing["injected"] >= 3
    hyperctl("fault", "clear", name, "vif0")
    assert ping_from(ns, address, 3)["lost"] == 0


def test_drop_30_with_a_seed_loses_about_30_percent(
    guest_and_peer: tuple[str, str, str],
) -> None:
    name, address, ns = guest_and_peer
    # The requests only: with both directions, a ping would meet the dice twice.
    hyperctl("fault", "set", name, "vif0", "drop=30,dir=rx,seed=7")

    lost = ping_from(ns, address, 200, interval="0.01")["lost"]

    assert 15 <= lost <= 45, lost
    assert vif_counters(name)["fault_dropped"] >= 30


def test_delay_raises_the_rtt_by_its_time(guest_and_peer: tuple[str, str, str]) -> None:
    name, address, ns = guest_and_peer
    before = ping_from(ns, address, 5)

    hyperctl("fault", "set", name, "vif0", "delay=50ms,dir=tx")
    after = ping_from(ns, address, 5)

    assert after["lost"] == 0
    assert after["min"] >= 50 and after["avg"] - before["avg"] >= 49, (before, after)
    assert vif_counters(name)["fault_delayed"] >= 5


def test_corrupted_frames_are_counted_and_tcp_recovers_them(
    guest_and_peer: tuple[str, str, str],
) -> None:
    name, address, ns = guest_and_peer
    peer = address.rsplit(".", 1)[0] + ".100"
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, "iperf3", "-s", "-1", "-B", peer],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(ns, 5201), 10, "iperf3 to listen in the peer namespace")
        hyperctl("fault", "set", name, "vif0", "corrupt=5,dir=tx,seed=3")

        run = hyperctl("exec", name, "--", "iperf3", "-c", peer, "-t", "3", "-J")
    finally:
        server.kill()
        server.wait()

    assert iperf3_report(run.out)["end"]["sum_sent"]["retransmits"] > 0
    assert vif_counters(name)["fault_corrupted"] > 0


def _listening(ns: str, port: int) -> bool:
    ss = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"],
        capture_output=True,
        text=True,
    )
    return bool(ss.stdout.strip())
