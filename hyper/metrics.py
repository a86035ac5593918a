"""`hyperctl metrics`: the hypervisor's figures in Prometheus' text exposition format, through
prometheus_client, printed once or served over HTTP (``--listen``) for a Prometheus to scrape.

A custom collector asks the toolstack at each collection (one ``list``, one ``device_stats`` per
device kind: what ``hyperctl top`` asks), so a scrape always sees the figures of that moment and
nothing runs between scrapes. Names follow Prometheus' conventions: the ``hyper_`` prefix, the
unit in the name, ``_total`` for counters.

- ``hyper_domain_info{domain,domid,state,status}``: 1 for each domain (xl's state letters).
- ``hyper_domain_cpu_seconds_total``, ``hyper_domain_memory_bytes`` (in use, from its cgroup),
  ``hyper_domain_memory_max_bytes``, ``hyper_domain_vcpus``.
- Each device counter a kind's backend keeps (channels/kinds.py), one counter family per
  counter: ``hyper_<kind>_<counter>_total{domain,domid,device}``, such as
  ``hyper_vif_tx_bytes_total`` and ``hyper_vbd_wr_req_total``. A device a driver domain serves
  has no counters here (they are that domain's): it has none of these series.
- Each ring a backend serves (``hyperctl rings``), labelled ``{domain,domid,kind,device,ring}``:
  ``hyper_ring_requests_total`` and ``hyper_ring_responses_total`` (taken and pushed),
  ``hyper_ring_notifications_total{...,outcome="sent"|"suppressed"}`` (pushes that rang the
  frontend, and those its event index let pass), ``hyper_ring_wakeups_total`` (rung wakeups of
  the backend), ``hyper_ring_spurious_wakeups_total`` (those that found no work) and
  ``hyper_ring_late_eoi_backoffs_total`` (the waits late EOI put after them). A new data-path
  worker starts its rings, and their figures, over.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from channels import control
from channels.kinds import BY_TYPE, KINDS
from hyper import api

MIB = 1 << 20


def registry(hv: api.Hypervisor) -> CollectorRegistry:
    """A registry holding hyper's collector alone (not the client library's own process
    figures: those would be hyperctl's)."""
    held = CollectorRegistry(auto_describe=False)
    held.register(HyperCollector(hv))
    return held


def exposition(hv: api.Hypervisor) -> bytes:
    """The figures of this moment in the text exposition format."""
    return generate_latest(registry(hv))


def serve(hv: api.Hypervisor, address: str, port: int) -> None:
    """Serve ``/metrics`` (and ``/``) on ``address``:``port`` from a thread of the client
    library's; collected at each scrape. The caller keeps the process alive."""
    start_http_server(port, addr=address, registry=registry(hv))


class HyperCollector(Collector):
    """Collects from the hypervisor of ``hv`` at each scrape."""

    def __init__(self, hv: api.Hypervisor) -> None:
        self.hv = hv

    def collect(self) -> Iterator[Metric]:
        domains = self.hv.call(control.List())
        names = {int(d["domid"]): str(d["name"]) for d in domains}
        yield from _domain_metrics(domains)
        stats = self.hv.device_stats()
        for kind in KINDS:
            yield from _device_metrics(
                kind.xenbus_type, kind.counters, stats[kind.xenbus_type], names
            )
        yield from _ring_metrics(api.ring_rows(names, stats))  # the same moment's


def _domain_metrics(domains: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["domain", "domid"]
    info = GaugeMetricFamily(
        "hyper_domain_info",
        "Each domain, with its state (xl's letters) and status",
        labels=[*labels, "state", "status"],
    )
    cpu = CounterMetricFamily(
        "hyper_domain_cpu_seconds", "CPU time the domain has used", labels=labels
    )
    memory = GaugeMetricFamily(
        "hyper_domain_memory_bytes", "Memory the domain uses now (its cgroup's)", labels=labels
    )
    ceiling = GaugeMetricFamily(
        "hyper_domain_memory_max_bytes", "The domain's memory limit", labels=labels
    )
    vcpus = GaugeMetricFamily("hyper_domain_vcpus", "The domain's vcpus", labels=labels)
    for d in domains:
        who = [str(d["name"]), str(d["domid"])]
        info.add_metric([*who, str(d["state"]), str(d["status"])], 1)
        cpu.add_metric(who, float(d["cpu_time"]))
        memory.add_metric(who, float(d.get("mem_usage", 0)))
        ceiling.add_metric(who, float(d["memory"]) * MIB)
        vcpus.add_metric(who, float(d["vcpus"]))
    yield from (info, cpu, memory, ceiling, vcpus)


def _device_metrics(
    kind: str, counters: tuple[str, ...], stats: list[dict[str, Any]], names: dict[int, str]
) -> Iterator[Metric]:
    labels = ["domain", "domid", "device"]
    for counter in counters:
        family = CounterMetricFamily(
            f"hyper_{kind}_{counter}",
            f"The {counter.replace('_', ' ')} counter of each {kind} its backend keeps"
            + (" (tx: what the domain sent)" if kind == "vif" else ""),
            labels=labels,
        )
        for device in stats:
            if counter in device:
                domid = int(device["domid"])
                who = [names.get(domid, str(domid)), str(domid), BY_TYPE[kind].label(device)]
                family.add_metric(who, float(device[counter]))
        yield family


def _ring_metrics(rings: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["domain", "domid", "kind", "device", "ring"]
    families = {
        name: CounterMetricFamily(f"hyper_ring_{name}", text, labels=labels)
        for name, text in (
            ("requests", "Requests the backend took off the ring"),
            ("responses", "Responses the backend pushed onto the ring"),
            ("wakeups", "Times the backend was woken by the ring's event channel"),
            ("spurious_wakeups", "Wakeups of the backend that found no work"),
            ("late_eoi_backoffs", "Waits late EOI put after spurious wakeups in a row"),
        )
    }
    notifications = CounterMetricFamily(
        "hyper_ring_notifications",
        "The backend's pushes: sent rang the frontend, suppressed did not need to",
        labels=[*labels, "outcome"],
    )
    for ring in rings:
        who = [str(ring[k]) for k in labels]
        for name, family in families.items():
            family.add_metric(who, float(ring[name]))
        notifications.add_metric([*who, "sent"], float(ring["notify_sent"]))
        notifications.add_metric([*who, "suppressed"], float(ring["notify_suppressed"]))
    yield from (*families.values(), notifications)
