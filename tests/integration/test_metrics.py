"""`hyperctl metrics` (issue 17, item 4): the Prometheus text format, which prometheus_client's
own parser reads, holding the counters of a domain that just moved traffic; and the same
served over HTTP with ``--listen``."""

from __future__ import annotations

import select
import socket
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import hyperctl, hyperctl_started
from tests.integration.test_network import vif

pytestmark = pytest.mark.root


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def of(found: Samples, name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    (value,) = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    return value


@pytest.fixture
def talked(make_domain: Callable[..., str], lan: tuple[str, str]) -> str:
    """A domain that has just pinged its neighbour ten times."""
    bridge, net = lan
    a = make_domain(vif(bridge, f"{net}.2"))
    make_domain(vif(bridge, f"{net}.3"))
    hyperctl("exec", a, "--", "ping", "-c", "10", "-i", "0.2", "-W", "5", f"{net}.3")
    return a


def test_the_exposition_parses_and_holds_a_busy_domains_counters(talked: str) -> None:
    found = samples(hyperctl("metrics").out)

    assert of(found, "hyper_domain_info", domain=talked, status="running") == 1
    assert of(found, "hyper_domain_cpu_seconds_total", domain=talked) > 0
    assert of(found, "hyper_domain_memory_bytes", domain=talked) > 0
    assert of(found, "hyper_vif_tx_packets_total", domain=talked, device="vif0") >= 10
    assert of(found, "hyper_vif_rx_bytes_total", domain=talked, device="vif0") >= 10 * 98
    # The rings' own figures: ten echo requests out on the tx ring, ten replies on the rx.
    for ring in ("q0-tx", "q0-rx"):
        where = {"domain": talked, "kind": "vif", "device": "vif0", "ring": ring}
        assert of(found, "hyper_ring_requests_total", **where) >= 10
        assert of(found, "hyper_ring_responses_total", **where) >= 10
        sent = of(found, "hyper_ring_notifications_total", outcome="sent", **where)
        suppressed = of(found, "hyper_ring_notifications_total", outcome="suppressed", **where)
        assert sent >= 1 and sent + suppressed >= 10
    tx = {"domain": talked, "device": "vif0", "ring": "q0-tx"}
    assert of(found, "hyper_ring_wakeups_total", **tx) >= 1  # the domain rang for each echo
    # Exported (``of`` finds exactly one), and each back-off followed a spurious wakeup.
    backoffs = of(found, "hyper_ring_late_eoi_backoffs_total", **tx)
    assert backoffs <= of(found, "hyper_ring_spurious_wakeups_total", **tx)


def test_rings_lists_each_ring_its_backends_serve(talked: str) -> None:
    lines = hyperctl("rings", talked).out.splitlines()

    assert lines[0].split() == [
        "Domain", "Device", "Ring", "Requests", "Responses", "Notified", "Suppressed",
        "Wakeups", "Spurious", "Backoffs",
    ]  # fmt: skip
    rows = {tuple(line.split()[1:3]): line.split()[3:] for line in lines[1:]}
    assert set(rows) == {("vif0", "q0-tx"), ("vif0", "q0-rx")}
    assert all(int(rows[ring][0]) >= 10 for ring in rows)  # requests


def test_listen_serves_the_same_over_http(talked: str) -> None:
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = hyperctl_started("metrics", "--listen", f"127.0.0.1:{port}")
    try:
        assert server.stderr is not None
        assert select.select([server.stderr], [], [], 15)[0], "metrics --listen never started"
        assert "serving" in server.stderr.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            found = samples(reply.read().decode())
    finally:
        server.kill()
        server.wait()

    assert of(found, "hyper_vif_tx_packets_total", domain=talked, device="vif0") >= 10


def test_a_bad_listen_address_is_refused_with_one_line(hypervisor: None) -> None:
    refused = hyperctl("metrics", "--listen", "localhost", check=False)
    assert refused.status == 2
    assert refused.err.strip().splitlines() == [
        "metrics: --listen: 'localhost' is not ADDR:PORT, such as 127.0.0.1:9100"
    ]
