"""Driver domains: a domU that runs netback for other domUs (issue 15), end to end.

A domain whose config says ``backends: [vif]`` serves the vifs of guests whose entries name it
(``backend: netvm``): their TAPs and bridge live in its network namespace, its data-path workers
map their pages, and nothing of dom0's does.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from channels import hypercall as hc
from hyperd.resources import view_dir
from tests.integration.conftest import (
    as_kernel,
    domain_info,
    hyperctl,
    in_domain,
    iperf3_report,
    start_iperf3_server,
    wait_for,
)
from tests.integration.test_block import attached_loops, disk, sha256_of, vbds
from tests.integration.test_faults import (
    check_dd_in_image,
    check_fio_and_dd,
    dom0_pid,
    kill_dom0,
    reap,
    start_fio_and_dd,
)
from tests.integration.test_grant_hostile import kernel_hypercall_socket

pytestmark = pytest.mark.root


def guest_vif(bridge: str, ip: str, backend: str) -> str:
    return f"vif:\n  - bridge: {bridge}\n    ip: {ip}/24\n    backend: {backend}\n"


def domid(name: str) -> int:
    info = domain_info(name)
    assert info is not None, f"no domain {name}"
    return int(info["domid"])


def mappers(segment_prefix: str) -> dict[int, str]:
    """Every process that maps a shared-memory object whose name starts with
    ``segment_prefix``: its pid, and the cgroup it is in (a domain's is ``dom<N>``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdecimal():
            continue
        try:
            maps = (proc / "maps").read_text()
            group = (proc / "cgroup").read_text()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if f"/dev/shm/{segment_prefix}" in maps:
            found[int(proc.name)] = group
    return found


def host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return [line.split(": ")[1].split("@")[0] for line in out.stdout.splitlines()]


def crash_and_wait_for_restart(name: str, first: dict[str, Any]) -> None:
    """SIGKILL the kernel of domain ``name`` (``first``: its listing); its ``on_crash:
    restart`` builds it again, under a new domid."""
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(
        lambda: (
            (info := domain_info(name)) is not None
            and info["domid"] != first["domid"]
            and info["status"] == "running"
        ),
        30,
        f"{name} to be running again",
    )


def test_two_guests_served_by_a_network_driver_domain_ping_and_pass_iperf3(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    bridge, net = lan
    netvm = make_domain("memory: 256\nbackends: [vif]\n")
    server = make_domain(guest_vif(bridge, f"{net}.2", netvm))
    client = make_domain(guest_vif(bridge, f"{net}.3", netvm))

    assert hyperctl("exec", client, "--", "ping", "-c", "2", "-W", "5", f"{net}.2").status == 0
    start_iperf3_server(server)
    report = iperf3_report(
        hyperctl("exec", client, "--", "iperf3", "-c", f"{net}.2", "-t", "2", "-J").out
    )
    assert report["end"]["sum_received"]["bytes"] > 0

    # network-list says which domain serves each vif (the BE column: its domid).
    [vif] = json.loads(hyperctl("network-list", "--json", client).out)
    assert vif["backend"] == f"/local/domain/{domid(netvm)}/backend/vif/{domid(client)}/0"
    row = hyperctl("network-list", client).out.splitlines()[1].split()
    assert row[:2] == ["0", str(domid(netvm))]

    # The guests' TAPs and their bridge are the driver domain's, not the host's.
    guests = [domid(server), domid(client)]
    assert not {f"vif{g}.0" for g in guests} & set(host_links())
    assert bridge not in host_links()
    inside = hyperctl("exec", netvm, "--", "ip", "-o", "link", "show").out
    assert all(f"vif{g}.0" in inside for g in guests) and bridge in inside

    # A driver domain cannot be given a vif of its own making.
    itself = hyperctl("network-attach", netvm, f"bridge={bridge},backend={netvm}", check=False)
    assert itself.status == 2
    assert itself.err.strip() == f"vifspec: backend: {netvm} cannot serve its own vif"

    # Only the guest itself and the driver domain map a guest's grant pools.
    for guest in guests:
        groups = mappers(f"hyper.d{guest}.gnt").values()
        assert any(f"dom{domid(netvm)}" in g for g in groups), "the driver domain maps them"
        strangers = [g for g in groups if f"dom{guest}" not in g and f"dom{domid(netvm)}" not in g]
        assert not strangers, f"processes outside the two domains map dom{guest}'s pools"


def refusal(sock: object, op: hc.Op, ids: itertools.count[int]) -> str:
    """The errno hyperd answers ``op`` with on a domain kernel's own socket ("" if it
    succeeds)."""
    req_id = next(ids)
    sock.send(hc.encode({"id": req_id, "op": op.op, "args": op.model_dump(mode="json")}))  # type: ignore[attr-defined]
    while True:
        reply = json.loads(sock.recv(hc.MAX_MESSAGE))  # type: ignore[attr-defined]
        if reply.get("id") == req_id:
            return "" if reply["ok"] else str(reply["error"])


def test_a_hostile_driver_domain_reaches_only_the_devices_it_serves(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    """Its kernel, played by the test on its own hypercall socket while it is paused, asks for
    what it does not serve: another guest's pools, another device's of its own guest, channels
    to a domain it serves nothing for; and it looks for a stranger's pools in /dev/shm."""
    bridge, net = lan
    netvm = make_domain("memory: 256\nbackends: [vif]\n")
    served = make_domain(guest_vif(bridge, f"{net}.2", netvm))
    stranger = make_domain(f"vif:\n  - bridge: {bridge}\n    ip: {net}.9/24\n")  # dom0's
    served_id, stranger_id = domid(served), domid(stranger)
    info = domain_info(netvm)
    assert info is not None
    stranger_pools = sorted(p.name for p in Path("/dev/shm").glob(f"hyper.d{stranger_id}.gnt*"))
    assert stranger_pools, "the stranger's vif has its pools"

    hyperctl("pause", netvm)
    try:
        sock, ids = kernel_hypercall_socket(info["pid"]), itertools.count(1 << 40)
        asks = {
            "the stranger's pools": hc.GnttabMapPools(granter=stranger_id, device="vif/0"),
            "another device's pools": hc.GnttabMapPools(granter=served_id, device="vif/1"),
            "a channel to the stranger": hc.EvtchnAllocUnbound(remote_dom=stranger_id),
            "the stranger's port": hc.EvtchnBindInterdomain(remote_dom=stranger_id, remote_port=1),
            "a link of its own": hc.DomctlLinkDevice(
                frontend=stranger_id, backend=info["domid"], device="vif/0"
            ),
        }
        answers = {what: refusal(sock, op, ids) for what, op in asks.items()}
        assert answers == dict.fromkeys(asks, "EPERM")
        # What it does serve, it still may.
        assert refusal(sock, hc.GnttabMapPools(granter=served_id, device="vif/0"), ids) == ""
        sock.close()
    finally:
        hyperctl("unpause", netvm)

    # Its kernel finds none of the stranger's objects in its view, nor may open them by path.
    view = view_dir(info["domid"])
    assert not [p for p in view.iterdir() if p.name.startswith(f"hyper.d{stranger_id}.")]
    probe = as_kernel(netvm, "cat", f"/dev/shm/{stranger_pools[0]}", stdout=subprocess.DEVNULL)
    _, err = probe.communicate(timeout=30)
    assert probe.returncode != 0 and "No such file" in err, err


def test_guests_served_by_a_driver_domain_keep_talking_while_dom0_dies_and_comes_back(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    """Nothing of their data path is dom0's: an iperf3 stream between the two guests moves
    data in every second of its run, dom0's death and restart included."""
    bridge, net = lan
    netvm = make_domain("memory: 256\nbackends: [vif]\n")
    server = make_domain(guest_vif(bridge, f"{net}.2", netvm))
    client = make_domain(guest_vif(bridge, f"{net}.3", netvm))
    start_iperf3_server(server)
    stream = in_domain(client, "iperf3", "-c", f"{net}.2", "-t", "8", "-i", "1", "-J")
    try:
        established = ["sh", "-c", "ss -tnH state established | grep -q :5201"]
        wait_for(
            lambda: hyperctl("exec", server, "--", *established, check=False).status == 0,
            30,
            "the stream to be established",
        )
        old, _ = kill_dom0()
        wait_for(lambda: dom0_pid() not in (None, old), 30, "dom0 to serve again")
        out, err = stream.communicate(timeout=60)
    finally:
        reap(stream)
    assert stream.returncode == 0, err
    per_second = [i["sum"]["bytes"] for i in iperf3_report(out)["intervals"]]
    assert len(per_second) >= 8 and min(per_second) > 0, per_second
    assert hyperctl("exec", client, "--", "ping", "-c", "1", "-W", "5", f"{net}.2").status == 0


def test_a_host_veth_given_to_the_driver_domain_carries_a_guest_to_a_peer_namespace(
    make_domain: Callable[..., str],
    lan: tuple[str, str],
    peer_namespace: str,
    tmp_path: Path,
) -> None:
    """``nics:`` moves a host interface into the driver domain, on its guests' bridge, while it
    runs, and gives it back when it stops; an interface the host does not have is refused."""
    bridge, net = lan
    ns = peer_namespace
    nic = f"{ns}n"
    subprocess.run(
        ["ip", "link", "add", nic, "type", "veth", "peer", "name", "eth0", "netns", ns], check=True
    )
    subprocess.run(["ip", "-n", ns, "addr", "add", f"{net}.100/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)

    missing = tmp_path / "missing.yaml"
    missing.write_text("name: nonic\nbackends: [vif]\nnics: [hynosuch0]\n")
    refused = hyperctl("create", str(missing), check=False)
    assert refused.status == 2
    assert refused.err.strip() == f"{missing}: nics.0.name: no interface 'hynosuch0' on the host"

    netvm = make_domain(
        f"memory: 256\nbackends: [vif]\nnics:\n  - {{name: {nic}, bridge: {bridge}}}\n"
    )
    assert nic not in host_links()
    assert nic in hyperctl("exec", netvm, "--", "ip", "-o", "link", "show", "master", bridge).out
    guest = make_domain(guest_vif(bridge, f"{net}.2", netvm))
    assert hyperctl("exec", guest, "--", "ping", "-c", "2", "-W", "5", f"{net}.100").status == 0
    pong = ["ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "5", f"{net}.2"]
    assert subprocess.run(pong, capture_output=True).returncode == 0

    hyperctl("destroy", guest)
    hyperctl("destroy", netvm)
    assert nic in host_links(), "given back to the host"


def test_a_destroyed_driver_domains_guests_wait_for_one_of_its_name(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    """Destroyed, it takes nothing of its guests with it: their vifs pause (eth0 stays),
    nothing of it is left on the host, and when a domain of its name is created again the vifs
    move there and carry traffic again."""
    bridge, net = lan
    netvm = make_domain("memory: 256\nbackends: [vif]\n")
    netvm_id = domid(netvm)
    other_net = net.replace("10.77.", "10.79.")  # eth1's, on dom0's bridge of that name
    both = (
        guest_vif(bridge, f"{net}.2", netvm) + f"  - bridge: {bridge}\n    ip: {other_net}.7/24\n"
    )
    guest = make_domain(both)  # eth0 through netvm, eth1 through dom0
    peer = make_domain(guest_vif(bridge, f"{net}.3", netvm))
    ping = ["ping", "-c", "1", "-W", "1", f"{net}.3"]
    assert hyperctl("exec", guest, "--", "ping", "-c", "2", "-W", "5", f"{net}.3").status == 0

    hyperctl("destroy", netvm)
    assert hyperctl("exec", guest, "--", *ping, check=False).status != 0
    assert "eth0" in hyperctl("exec", guest, "--", "ip", "-o", "link", "show").out
    assert not list(Path("/dev/shm").glob(f"hyper.d{netvm_id}.*"))
    assert not view_dir(netvm_id).exists()

    make_domain("memory: 256\nbackends: [vif]\n", name=netvm)
    wait_for(
        lambda: hyperctl("exec", guest, "--", *ping, check=False).status == 0,
        30,
        "the guests to talk again through the new driver domain",
    )
    assert hyperctl("exec", peer, "--", "ping", "-c", "1", "-W", "5", f"{net}.2").status == 0


def test_a_driver_domain_that_crashes_and_restarts_serves_its_guests_again(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    """``on_crash: restart`` builds it again under a new domid; the toolstack re-attaches the
    guests' vifs that name it to the new one, with the MACs they had, and they talk again."""
    bridge, net = lan
    two = "vcpus: 2\n"  # a vif of two queues: their keys are below queue-<n>/
    netvm = make_domain(f"memory: 256\n{two}backends: [vif]\non_crash: restart\n")
    a = make_domain(two + guest_vif(bridge, f"{net}.2", netvm))
    make_domain(guest_vif(bridge, f"{net}.3", netvm))
    [before] = json.loads(hyperctl("network-list", "--json", a).out)
    queues = f"/local/domain/{domid(a)}/device/vif/0/multi-queue-num-queues"
    assert hyperctl("store", "read", queues).out.strip() == "2"
    first = domain_info(netvm)
    assert first is not None
    assert hyperctl("exec", a, "--", "ping", "-c", "1", "-W", "5", f"{net}.3").status == 0

    crash_and_wait_for_restart(netvm, first)
    ping = ["ping", "-c", "1", "-W", "1", f"{net}.3"]
    wait_for(
        lambda: hyperctl("exec", a, "--", *ping, check=False).status == 0,
        30,
        "the guests to talk again through the new driver domain",
    )
    [after] = json.loads(hyperctl("network-list", "--json", a).out)
    assert after["mac"] == before["mac"]
    assert after["backend"].startswith(f"/local/domain/{domid(netvm)}/backend/vif/")


# -- block driver domains -------------------------------------------------------------------


def guest_disk(image: Path, backend: str, size: str = "64M") -> str:
    return "disk:\n" + disk(image, size=size) + f"    backend: {backend}\n"


def holders(device: str) -> dict[int, str]:
    """Every process with ``device`` open: its pid and its cgroup (a domain's is ``dom<N>``)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdecimal():
            continue
        try:
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            group = (proc / "cgroup").read_text()
        except OSError:
            continue
        if device in fds:
            found[int(proc.name)] = group
    return found


def test_a_disk_served_by_a_block_driver_domain_keeps_what_dd_wrote(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """dom0 attaches the image and hands the driver domain the loop device alone; only the
    driver domain holds it and maps the guest's pages; dd's fsynced data is in the image once
    the guest is destroyed."""
    blkvm = make_domain("memory: 256\nbackends: [vbd]\n")
    image = tmp_path / "guest.img"
    guest = make_domain(guest_disk(image, blkvm))
    guest_id, blkvm_id = domid(guest), domid(blkvm)

    [vbd] = vbds(guest)
    assert vbd["backend"] == f"/local/domain/{blkvm_id}/backend/vbd/{guest_id}/51712"
    row = hyperctl("block-list", guest).out.splitlines()[1].split()
    assert row[:2] == ["xvda", str(blkvm_id)]
    [loop] = attached_loops(image)
    groups = holders(f"/dev/{loop}").values()
    assert groups and all(f"dom{blkvm_id}" in g for g in groups), "the driver domain's alone"

    write = "head -c 16M /dev/urandom > /tmp/data && dd if=/tmp/data of=/dev/xvda bs=1M "
    write += "conv=fsync,notrunc 2>/dev/null && sha256sum /tmp/data"
    inside = hyperctl("exec", guest, "--", "sh", "-c", write).out.split()[0]

    pools = mappers(f"hyper.d{guest_id}.gnt").values()
    assert any(f"dom{blkvm_id}" in g for g in pools), "the driver domain maps the guest's pools"
    assert all(f"dom{guest_id}" in g or f"dom{blkvm_id}" in g for g in pools), pools

    hyperctl("destroy", guest)
    wait_for(lambda: not attached_loops(image), 10, "the driver domain to let the disk go")
    assert sha256_of(image, 16 << 20) == inside


def test_a_hostile_block_driver_domain_reaches_only_the_disks_it_serves(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """Its kernel, played by the test, takes the descriptor of a disk it does not serve, or of
    its own guest's disk a second time; and opens images and loop devices by path."""
    blkvm = make_domain("memory: 256\nbackends: [vbd]\n")
    served = make_domain(guest_disk(tmp_path / "served.img", blkvm))
    stranger_image = tmp_path / "stranger.img"
    stranger = make_domain("disk:\n" + disk(stranger_image, size="64M"))  # dom0 serves it
    info = domain_info(blkvm)
    assert info is not None
    [stranger_loop] = attached_loops(stranger_image)

    hyperctl("pause", blkvm)
    try:
        sock, ids = kernel_hypercall_socket(info["pid"]), itertools.count(1 << 40)
        take = hc.DeviceTakeFd(frontend=domid(stranger), device="vbd/51712")
        assert refusal(sock, take, ids) == "EPERM"
        again = hc.DeviceTakeFd(frontend=domid(served), device="vbd/51712")
        assert refusal(sock, again, ids) == "ENOENT", "its blkback took it, once"
        sock.close()
    finally:
        hyperctl("unpause", blkvm)

    for path in (stranger_image, f"/dev/{stranger_loop}", "/dev/loop-control"):
        probe = as_kernel(blkvm, "cat", str(path), stdout=subprocess.DEVNULL)
        _, err = probe.communicate(timeout=30)
        assert probe.returncode != 0 and "No such file" in err, (path, err)


def test_fio_verifies_across_a_sigkill_of_the_block_driver_domain(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """``on_crash: restart`` builds it again under a new domid; the toolstack attaches the image
    again, hands the new one the loop device, and moves the guest's disk there; the frontend
    replays what was in flight on the ring and pools it has. fio, verifying what it writes, and
    an fsynced dd carry on across it, and dd's data is in the image."""
    blkvm = make_domain("memory: 256\nbackends: [vbd]\non_crash: restart\n")
    image = tmp_path / "guest.img"
    guest = make_domain(guest_disk(image, blkvm, size="128M"))
    first = domain_info(blkvm)
    assert first is not None
    fio, dd = start_fio_and_dd(guest)
    try:
        written = 16 << 20  # fio and dd have written that much (the image is sparse)
        wait_for(lambda: image.stat().st_blocks * 512 >= written, 60, "fio and dd to write")
        crash_and_wait_for_restart(blkvm, first)
        check_fio_and_dd(fio, dd)
    finally:
        reap(fio, dd)
    [vbd] = vbds(guest)
    assert str(vbd["backend"]).startswith(f"/local/domain/{domid(blkvm)}/backend/vbd/")
    check_dd_in_image(guest, image)


def test_a_disk_served_by_a_driver_domain_carries_on_while_dom0_dies_and_comes_back(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """Nothing of its data path is dom0's: fio, verifying what it writes, and an fsynced dd run
    through dom0's death and restart, and the restarted dom0 leaves the disk where it is."""
    blkvm = make_domain("memory: 256\nbackends: [vbd]\n")
    image = tmp_path / "guest.img"
    guest = make_domain(guest_disk(image, blkvm, size="128M"))
    [before] = vbds(guest)
    fio, dd = start_fio_and_dd(guest)
    try:
        written = 16 << 20
        wait_for(lambda: image.stat().st_blocks * 512 >= written, 60, "fio and dd to write")
        old, _ = kill_dom0()
        wait_for(lambda: dom0_pid() not in (None, old), 30, "dom0 to serve again")
        check_fio_and_dd(fio, dd)
    finally:
        reap(fio, dd)
    [after] = vbds(guest)
    assert after["backend"] == before["backend"], "still served by the same driver domain"
    check_dd_in_image(guest, image)
