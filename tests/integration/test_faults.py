"""Faults in the middle of I/O: a domain killed, a backend killed.

A domU is only processes, so SIGKILL is its crash: hyperd reaps it and applies ``on_crash``;
dom0 ends the domain's device connections and releases everything that served them. Other
domains must not notice.

A backend's data path is a process of its own; killed, it is restarted, and the frontend
replays what it had not answered: the programs in the domain see a pause, not an error, and
every write they were told is done is in the image.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.blkhost import vbd_stats
from tests.integration.conftest import (
    BOTH_PUMPS,
    domain_info,
    hyperctl,
    in_domain,
    iperf3_report,
    start_iperf3_server,
    wait_for,
)
from tests.integration.test_block import (
    STRANGER,
    attached_loops,
    destroy,
    disk,
    fio_verify,
    sha256_of,
    vbds,
    verifying_fio,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("data_path_pumps")]
PUMPS = BOTH_PUMPS  # every test on the native pumps, then on the Python reference

CLEANUP_SECONDS = 2.0  # the bound, from the kill to nothing of the domain left


def shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if "hyper." in p.name}


def taps_of(domid: int) -> list[str]:
    return [p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(f"vif{domid}.")]


def store_nodes_of(domid: int) -> list[str]:
    """Store paths that belong to domain ``domid``: its own tree and its backend directories."""
    own = re.compile(rf"^/local/domain/{domid}(/|$)|/backend/[^/]+/{domid}(/|$)")
    listing = hyperctl("store", "ls", "/").out.splitlines()
    return [line.split(" = ")[0] for line in listing if own.search(line.split(" = ")[0])]


def test_a_domain_killed_mid_io_leaves_nothing_and_its_neighbour_verifies(
    make_domain: Callable[..., str], tmp_path: Path, lan: tuple[str, str]
) -> None:
    bridge, prefix = lan
    neighbour = make_domain("disk:\n" + disk(tmp_path / "neighbour.img", size="64M"))
    before = shm_names()  # the neighbour's are in, the victim's not yet
    image = tmp_path / "victim.img"
    victim = make_domain(
        f"vif:\n  - bridge: {bridge}\n    ip: {prefix}.2/24\ndisk:\n" + disk(image, size="64M")
    )
    info = domain_info(victim)
    assert info is not None
    domid, pid = info["domid"], info["pid"]
    assert attached_loops(image) and taps_of(domid) and store_nodes_of(domid)
    assert shm_names() - before, "the victim's rings, pools and doorbells"

    checked = verifying_fio(neighbour)
    writer = verifying_fio(victim, runtime=60)
    try:
        wait_for(lambda: vbd_stats(neighbour, "xvda")["wr_req"], 30, "the neighbour to write")
        wait_for(lambda: vbd_stats(victim, "xvda")["wr_req"], 30, "the victim to write")

        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        def gone() -> bool:
            return not (
                attached_loops(image)
                or taps_of(domid)
                or store_nodes_of(domid)
                or shm_names() != before
                or domain_info(victim) is not None
            )

        wait_for(gone, CLEANUP_SECONDS, f"dom{domid}'s loop, TAP, store nodes and shm to go")
        elapsed = time.monotonic() - killed
        print(f"dom{domid} cleaned up {elapsed:.2f} s after SIGKILL")
        writer.communicate(timeout=30)  # its hyperctl exec ends with the domain
        assert writer.returncode != 0

        out, err = checked.communicate(timeout=120)
        assert checked.returncode == 0, err
        job = json.loads(out[out.index("{") :])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0
    finally:
        for proc in (checked, writer):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_a_killed_blkback_is_a_pause_fio_verifies_and_fsynced_data_is_in_the_image(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    name = make_domain("disk:\n" + disk(image, size="128M"))
    [vbd] = vbds(name)
    first = vbd["worker_pid"]
    fio, dd = start_fio_and_dd(name)
    try:
        wait_for(lambda: vbds(name)[0]["wr_req"] > 2000, 60, "fio and dd to be writing")
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()

        def restarted() -> bool:
            now = vbds(name)[0]
            return bool(now["connected"]) and now["worker_pid"] not in (None, first)

        wait_for(restarted, 10, "blkback to restart the vbd's data path")
        counted = served(vbds(name)[0])
        wait_for(lambda: served(vbds(name)[0]) > counted, 10, "requests after the restart")
        print(f"I/O completing again {time.monotonic() - killed:.2f} s after the kill")
        check_fio_and_dd(fio, dd)
    finally:
        reap(fio, dd)
    assert vbds(name)[0]["errors"] == 0
    check_dd_in_image(name, image)


def start_fio_and_dd(name: str) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """fio writing and verifying the disk's first 48 MiB; dd writing 32 MiB at MiB 64, beside
    fio's region, with conv=fsync (it is told all is on disk before it exits)."""
    fio = in_domain(name, *fio_verify("randwrite", "48M"))
    dd = in_domain(
        name,
        "dd",
        "if=/dev/urandom",
        "of=/dev/xvda",
        "bs=1M",
        "count=32",
        "seek=64",
        "oflag=direct",
        "conv=fsync,notrunc",
    )
    return fio, dd


def check_fio_and_dd(fio: subprocess.Popen[str], dd: subprocess.Popen[str]) -> None:
    """Both ran to the end without an error; fio verified every block it wrote."""
    out, err = fio.communicate(timeout=300)
    assert fio.returncode == 0, err
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 48 << 20
    _, err = dd.communicate(timeout=120)
    assert dd.returncode == 0 and "33554432 bytes" in err, err


def check_dd_in_image(name: str, image: Path) -> None:
    """What dd wrote, as the domain reads it, is in the image once the domain is destroyed."""
    inside = hyperctl(
        "exec", name, "--", "sh", "-c", "dd if=/dev/xvda bs=1M skip=64 count=32 | sha256sum"
    ).out.split()[0]
    destroy(name, image)
    assert sha256_of(image, 32 << 20, offset=64 << 20) == inside


def reap(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("vcpus", [1, 2], ids=["one queue", "two queues"])
def test_an_iperf3_stream_between_two_domains_survives_a_killed_netback(
    make_domain: Callable[..., str], lan: tuple[str, str], vcpus: int
) -> None:
    """The worker serves every queue of the vif: killed, it comes back for all of them (the
    client's vif has a queue per vcpu), and the streams go on."""
    if vcpus > (os.cpu_count() or 1):
        pytest.skip("netback offers a queue per host CPU")
    client, net = two_domains_with_a_server(make_domain, lan, vcpus)
    [vif] = json.loads(hyperctl("network-list", "--json", client).out)
    assert len(vif["queues"]) == vcpus
    first = vif["worker_pid"]
    streams = ("-P", "4") if vcpus > 1 else ()
    stream = in_domain(client, "iperf3", "-c", f"{net}.2", "-t", "8", "-i", "1", "-J", *streams)
    try:

        def now() -> dict[str, Any]:
            return dict(json.loads(hyperctl("network-list", "--json", client).out)[0])

        wait_for(lambda: now()["tx_bytes"] > 50 << 20, 30, "the stream to be flowing")
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: now()["connected"] and now()["worker_pid"] not in (None, first),
            10,
            "netback to restart the vif's data path",
        )
        counted = now()["tx_bytes"]
        wait_for(lambda: now()["tx_bytes"] > counted, 10, "frames to cross again")
        print(f"frames crossing again {time.monotonic() - killed:.2f} s after the kill")
        check_stream(stream, timeout=60)
    finally:
        reap(stream)


def two_domains_with_a_server(
    make_domain: Callable[..., str], lan: tuple[str, str], vcpus: int = 1
) -> tuple[str, str]:
    """Two domUs on ``lan``, an iperf3 server listening in the first (.2); the second (.3),
    the client (with ``vcpus``), and the /24 prefix."""
    bridge, net = lan
    server = make_domain(f"vif:\n  - bridge: {bridge}\n    ip: {net}.2/24\n")
    client = make_domain(f"vcpus: {vcpus}\nvif:\n  - bridge: {bridge}\n    ip: {net}.3/24\n")
    start_iperf3_server(server)
    return client, net


def check_stream(stream: subprocess.Popen[str], timeout: float) -> None:
    """The same iperf3 run went on to its end and moved data."""
    out, err = stream.communicate(timeout=timeout)
    assert stream.returncode == 0, err
    report = iperf3_report(out)
    per_second = [round(i["sum"]["bits_per_second"] / 1e9, 2) for i in report["intervals"]]
    print(f"Gbit/s each second: {per_second}")
    assert report["end"]["sum_received"]["bytes"] > 0


def dom0_pid() -> int | None:
    listing = hyperctl("list", "--json", check=False)
    if listing.status != 0:
        return None  # dom0 serves hyperctl: it is between lives
    return next(int(d["pid"]) for d in json.loads(listing.out) if d["domid"] == 0)


def test_a_dom0_that_keeps_dying_is_restarted_ever_more_slowly(own_hypervisor: None) -> None:
    for _ in range(3):
        dead = wait_for(dom0_pid, 30, "dom0 to serve")
        os.kill(dead, signal.SIGKILL)

        def restarted(old: int = dead) -> bool:
            return dom0_pid() not in (None, old)

        wait_for(restarted, 30, "dom0 to be restarted")
    restarts = re.findall(r"dom0 died \(signal 9\) .* restarting it in ([0-9.]+) s", dmesg())
    assert restarts == ["0.25", "0.50", "1.00"]


def dmesg() -> str:
    return hyperctl("dmesg").out


def served(vbd: dict[str, Any]) -> int:
    """Requests a vbd's data path has done: reads or writes (fio may be verifying by now)."""
    return int(vbd["wr_req"]) + int(vbd["rd_req"])


def kill_dom0() -> tuple[int, float]:
    """SIGKILL dom0 (once it serves); its pid and when it died."""
    pid = wait_for(dom0_pid, 30, "dom0 to serve")
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_fio_and_an_fsynced_dd_carry_on_across_a_killed_dom0(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    name = make_domain("disk:\n" + disk(image, size="128M"))
    fio, dd = start_fio_and_dd(name)
    try:
        wait_for(lambda: vbds(name)[0]["wr_req"] > 2000, 60, "fio and dd to be writing")
        old, killed = kill_dom0()

        def serving_again() -> bool:
            if dom0_pid() in (None, old):
                return False
            now = vbds(name)
            return bool(now and now[0]["connected"] and served(now[0]) > 0)

        wait_for(serving_again, 30, "a new dom0 to serve the disk again")
        print(f"requests completing again {time.monotonic() - killed:.2f} s after the kill")
        # fio and dd ran through `hyperctl exec`: those sessions outlived dom0 as well.
        check_fio_and_dd(fio, dd)
    finally:
        reap(fio, dd)
    check_dd_in_image(name, image)


def exited(pidfd: int) -> bool:
    """The process the pidfd names has exited (a pidfd polls readable from then on)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def test_nothing_of_a_killed_dom0_runs_when_the_next_one_serves_its_disks(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """A worker of the dead dom0 still alive (here: stopped in the middle of writing) could
    land a write on the old loop device after the next dom0 acknowledged a newer one over a
    new loop device. hyperd kills what the dead dom0 left, and waits for it to be gone, before
    it starts the next dom0."""
    image = tmp_path / "disk.img"
    name = make_domain("disk:\n" + disk(image, size="128M"))
    old_worker = vbds(name)[0]["worker_pid"]
    assert isinstance(old_worker, int)
    pidfd = os.pidfd_open(old_worker)
    fio, dd = start_fio_and_dd(name)
    try:
        wait_for(lambda: vbds(name)[0]["wr_req"] > 2000, 60, "fio and dd to be writing")
        os.kill(old_worker, signal.SIGSTOP)
        old_dom0, _ = kill_dom0()

        def serving_again() -> bool:
            if dom0_pid() in (None, old_dom0):
                return False
            now = vbds(name)
            return bool(now and now[0]["connected"] and now[0]["worker_pid"] != old_worker)

        wait_for(serving_again, 30, "the next dom0 to serve the disk")
        assert exited(pidfd), "the old worker must be gone before the next dom0 serves the disk"
        wait_for(lambda: len(attached_loops(image)) == 1, 5, "one loop device over the image")
        check_fio_and_dd(fio, dd)
    finally:
        if not exited(pidfd):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # the old code leaves it, stopped
        os.close(pidfd)
        reap(fio, dd)
    check_dd_in_image(name, image)


def test_a_restarted_dom0_checks_each_image_again_as_it_opens_it(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """What was validated at create may have changed by the time blkback opens the image
    again (here, after a dom0 restart, the image has become another user's): blkback checks
    what it opens, and fails that vbd alone rather than serve another user's file."""
    image = tmp_path / "disk.img"
    name = make_domain("disk:\n" + disk(image, size="16M"))
    domid = domain_info(name)["domid"]  # type: ignore[index]
    os.chown(image, STRANGER, -1)
    old, _ = kill_dom0()
    backend = f"/local/domain/0/backend/vbd/{domid}/51712"

    def error() -> str:
        if dom0_pid() in (None, old):
            return ""
        return hyperctl("store", "read", f"{backend}/error", check=False).out

    reason = wait_for(error, 30, "the next dom0 to fail the vbd")
    assert f"{image} belongs to uid {STRANGER}; only root" in reason
    assert not attached_loops(image)
    assert domain_info(name) is not None, "the domain itself carries on"


def test_an_iperf3_stream_between_two_domains_survives_a_killed_dom0(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    client, net = two_domains_with_a_server(make_domain, lan)
    stream = in_domain(client, "iperf3", "-c", f"{net}.2", "-t", "10", "-i", "1", "-J")
    try:

        def tx_bytes() -> int:
            listing = hyperctl("network-list", "--json", client, check=False)
            if listing.status != 0:
                return 0
            vifs = json.loads(listing.out)
            return int(vifs[0]["tx_bytes"]) if vifs and vifs[0]["connected"] else 0

        wait_for(lambda: tx_bytes() > 50 << 20, 30, "the stream to be flowing")
        old, killed = kill_dom0()
        wait_for(lambda: dom0_pid() not in (None, old) and tx_bytes(), 30, "frames again")
        print(f"frames crossing again {time.monotonic() - killed:.2f} s after the kill")
        check_stream(stream, timeout=90)
    finally:
        reap(stream)
