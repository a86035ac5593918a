"""The data path end to end on the Python reference pumps.

Most integration tests run the native pumps (channels/native/); the hostile-peer and fault
modules run on both (``PUMPS = BOTH_PUMPS``). The Python classes the native pumps mirror stay
the reference and run wherever the extension is not built (channels/pumps.py);
tests/unit/test_native_pumps.py feeds both the same hostile rings, and the hostile-peer unit
tests run with both. Here real domains run on the reference: this module's own hypervisor has
``HYPER_PUMPS=python`` in its environment (conftest's ``data_path_pumps``), which dom0, every
domain kernel and every data-path worker inherit. iperf3 crosses two netif queues between two
domains, dd through /dev/xvda lands in the image, and a killed netback worker comes back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import (
    hyperctl,
    iperf3_report,
    start_iperf3_server,
    wait_for,
)
from tests.integration.test_block import MiB, destroy, disk, sha256_of
from tests.integration.test_network import counters, vif

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("data_path_pumps")]
PUMPS = ("python",)  # the session's hypervisor makes way for one on the Python pumps


def test_hyperctl_info_says_the_python_pumps_run() -> None:
    assert "python (HYPER_PUMPS=python)" in hyperctl("info").out


def test_iperf3_between_two_domains_crosses_both_queues(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    """16 streams from a two-vcpu domain: both queues carry them, each way (16 streams all on
    one queue would be one chance in 2^15)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one host CPU: netback offers one queue")
    bridge, net = lan
    server = make_domain(vif(bridge, f"{net}.2"))
    client = make_domain("vcpus: 2\n" + vif(bridge, f"{net}.3"))
    start_iperf3_server(server)
    argv = ["iperf3", "-c", f"{net}.2", "-t", "2", "-P", "16", "-J"]
    report = iperf3_report(hyperctl("exec", client, "--", *argv).out)
    assert report["end"]["sum_received"]["bytes"] > 0
    queues = counters(client)[0]["queues"]
    assert len(queues) == 2
    assert all(q["tx_packets"] > 0 and q["rx_packets"] > 0 for q in queues), queues


def test_dd_through_xvda_lands_in_the_image(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    image = tmp_path / "dd.img"
    name = make_domain("disk:\n" + disk(image))
    dd = ["dd", "if=/dev/urandom", "of=/dev/xvda", "bs=1M", "count=16", "oflag=direct"]
    assert "16777216 bytes" in hyperctl("exec", name, "--", *dd, "conv=fsync,notrunc").err
    read_back = ["sh", "-c", "head -c 16777216 /dev/xvda | sha256sum"]
    inside = hyperctl("exec", name, "--", *read_back).out.split()[0]
    destroy(name, image)
    assert sha256_of(image, 16 * MiB) == inside


def test_a_killed_netback_worker_comes_back(
    make_domain: Callable[..., str], lan: tuple[str, str]
) -> None:
    bridge, net = lan
    a = make_domain(vif(bridge, f"{net}.2"))
    make_domain(vif(bridge, f"{net}.3"))
    ping = ["ping", "-c", "1", "-W", "5", f"{net}.3"]
    assert hyperctl("exec", a, "--", *ping).status == 0
    first = counters(a)[0]["worker_pid"]
    os.kill(first, signal.SIGKILL)

    def restarted() -> bool:
        [now] = counters(a)
        return bool(now["connected"]) and now["worker_pid"] not in (None, first)

    wait_for(restarted, 15, "netback to restart the vif's data path")
    assert hyperctl("exec", a, "--", *ping).status == 0
