"""Driver domains: a domU that runs netback for other domUs (issue 15), end to end.

A domain whose config says ``backends: [vif]`` serves the vifs of guests whose entries name it
(``backend: netvm``): their TAPs and bridge live in its network namespace, its data-path workers
map their pages, and nothing of dom0's does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import (
    domain_info,
    hyperctl,
    iperf3_report,
    start_iperf3_server,
)

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

    # The guests' TAPs and their bridge are the driver domain's, not the host's.
    guests = [domid(server), domid(client)]
    assert not {f"vif{g}.0" for g in guests} & set(host_links())
    assert bridge not in host_links()
    inside = hyperctl("exec", netvm, "--", "ip", "-o", "link", "show").out
    assert all(f"vif{g}.0" in inside for g in guests) and bridge in inside

    # Only the guest itself and the driver domain map a guest's grant pools.
    for guest in guests:
        groups = mappers(f"hyper.d{guest}.gnt").values()
        assert any(f"dom{domid(netvm)}" in g for g in groups), "the driver domain maps them"
        strangers = [g for g in groups if f"dom{guest}" not in g and f"dom{domid(netvm)}" not in g]
        assert not strangers, f"processes outside the two domains map dom{guest}'s pools"
