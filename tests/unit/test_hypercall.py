"""The hypercall ABI: hostile requests are refused, privileged ones only from dom0.

No root needed: the hypervisor's dispatcher and tables run with an in-memory stand-in for the
objects hyperd would create in /dev/shm (their names are all the tables keep).
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from channels import hypercall as hc
from channels.config import DomainConfig
from channels.paths import RunDir
from hyperd import evtchn as evtchn_module
from hyperd import hypervisor as hyperd
from hyperd.devlinks import DeviceLinks
from hyperd.domain import Domain, dom0_config
from hyperd.evtchn import EventChannels, EvtchnError
from hyperd.gnttab import (
    MAX_POOL_PAGES_PER_DOMAIN,
    MAX_POOLS_PER_DOMAIN,
    GnttabError,
    GrantTables,
    grant_budget,
)
from hyperd.hypercalls import Descriptors, HvError
from tests.unit.backend_hypercalls import PaperResources


def request(op: str, **args: object) -> bytes:
    return json.dumps({"id": 1, "op": op, "args": args}).encode()


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a request"),
        (json.dumps({"op": "evtchn_close"}).encode(), "not a request"),
        (request("domctl_frobnicate"), "unknown op"),
        (request("evtchn_close", port=1, extra=2), "extra"),
        (request("evtchn_close", port="one"), "port"),
        (request("evtchn_close", port=0), "port"),
        (request("gnttab_setup_pool", peer=0, device="vif/0", pages=10**9), "pages"),
        (request("gnttab_setup_pool", peer=0, pages=1), "device: Field required"),
        (request("gnttab_setup_pool", peer=0, device="../vif/0", pages=1), "device"),
        (request("gnttab_setup_pool", peer=0, device="vif/0/1", pages=1), "device"),
        (request("gnttab_map_pools", granter=5), "device: Field required"),
        (request("evtchn_alloc_unbound", remote_dom=0x7FF0), "remote_dom"),
    ],
)
def test_malformed_requests_are_refused_with_the_fault_named(data: bytes, fault: str) -> None:
    with pytest.raises(ValueError, match=fault):
        hc.parse_request(data)


def test_a_good_request_parses_to_its_typed_op() -> None:
    req_id, op = hc.parse_request(request("evtchn_alloc_unbound", remote_dom=0))
    assert req_id == 1
    assert op == hc.EvtchnAllocUnbound(remote_dom=0)


@pytest.fixture
def hypervisor(tmp_path: Path) -> hyperd.Hypervisor:
    return hyperd.Hypervisor(RunDir(tmp_path), None, hyperd.DmesgHandler())  # type: ignore[arg-type]


def test_every_hypercall_has_exactly_one_handler(hypervisor: hyperd.Hypervisor) -> None:
    plain, passing = hypervisor.hypercalls.table, hypervisor.hypercalls.passing
    assert not set(plain) & set(passing)
    assert set(plain) | set(passing) == set(hc.OPS.values())


PRIVILEGED = [
    hc.DomctlList(),
    hc.DomctlDestroy(domid=1),
    hc.DomctlPause(domid=1, pause=True),
    hc.DomctlCreate(config=DomainConfig(name="evil")),
    hc.DomctlExecTarget(domid=1),
    hc.DomctlSetSched(domid=1, cap=0),
    hc.DomctlSetMemory(domid=1, memory=64),
    hc.DomctlLinkDevice(frontend=1, backend=2, device="vif/0"),
    hc.SysctlDmesg(),
    hc.SysctlInfo(),
    hc.SysctlHalt(),
]


@pytest.mark.parametrize("op", PRIVILEGED, ids=lambda op: op.op)
def test_a_domu_is_refused_every_privileged_hypercall(
    hypervisor: hyperd.Hypervisor, op: hc.Op
) -> None:
    domu = Domain(3, "guest", DomainConfig(name="guest"), PaperResources(3))
    with pytest.raises(HvError) as refused:
        hypervisor.hypercalls.handle(domu, op)
    assert refused.value.errno_name == "EPERM"
    assert not hypervisor.halt_requested


def test_every_op_is_declared_privileged_or_handled(hypervisor: hyperd.Hypervisor) -> None:
    for name, cls in hc.OPS.items():
        assert hasattr(hypervisor.hypercalls, "do_" + name), f"{name} has no handler"
        assert cls.op == name
    assert {op.op for op in PRIVILEGED} == {n for n, c in hc.OPS.items() if c.privileged}


def test_event_channel_bind_only_for_the_named_peer() -> None:
    table = EventChannels()
    resources = PaperResources(5)
    unbound = table.alloc_unbound(5, 0, resources)
    with pytest.raises(EvtchnError) as wrong_peer:
        table.bind_interdomain(6, 5, unbound.port, PaperResources(6))
    assert wrong_peer.value.errno_name == "EINVAL"
    bound = table.bind_interdomain(0, 5, unbound.port, resources)
    assert table.peer_doorbell(bound) == unbound.doorbell
    assert table.peer_doorbell(unbound) == bound.doorbell
    with pytest.raises(EvtchnError):
        table.bind_interdomain(0, 5, unbound.port, resources)  # already bound


def test_closing_returns_the_peer_to_unbound_and_numbers_are_not_reused() -> None:
    table = EventChannels()
    resources = PaperResources(5)
    front = table.alloc_unbound(5, 0, resources)
    back = table.bind_interdomain(0, 5, front.port, resources)
    table.close(0, back.port)
    assert table.get(5, front.port).state == "unbound"
    again = table.bind_interdomain(0, 5, front.port, resources)
    assert again.port != back.port, "a closed port's number must not come back at once"


def test_a_dead_domain_takes_its_ports_and_its_peers_ports_with_it() -> None:
    table = EventChannels()
    resources = PaperResources(5)
    front = table.alloc_unbound(5, 0, resources)
    back = table.bind_interdomain(0, 5, front.port, resources)
    table.close_domain(5)
    assert table.ports_of(5) == [] and table.ports_of(0) == []
    assert resources.doorbells == set()
    with pytest.raises(EvtchnError):
        table.get(0, back.port)


def domains_on_paper(hv: hyperd.Hypervisor, *domids: int) -> list[Domain]:
    """dom0 and domUs ``domids`` in ``hv``'s table, their objects made on paper."""
    made = [Domain(d, f"dom{d}", DomainConfig(name=f"dom{d}"), PaperResources(d)) for d in domids]
    dom0 = Domain(0, "Domain-0", dom0_config(4096, 2), PaperResources(0))
    hv.domains = {d.domid: d for d in [dom0, *made]}
    return made


def refused(hv: hyperd.Hypervisor, caller: Domain, op: hc.Op) -> str:
    with pytest.raises(HvError) as error:
        hv.hypercalls.handle(caller, op)
    return error.value.errno_name


def test_two_domus_share_channels_and_pools_only_through_a_device_linked_between_them(
    hypervisor: hyperd.Hypervisor,
) -> None:
    guest, netvm, other = domains_on_paper(hypervisor, 5, 6, 7)
    handle = hypervisor.hypercalls.handle
    setup = hc.GnttabSetupPool(peer=6, device="vif/0", pages=4)
    assert refused(hypervisor, guest, hc.EvtchnAllocUnbound(remote_dom=6)) == "EPERM"
    assert refused(hypervisor, guest, setup) == "EPERM"
    dom0 = hypervisor.domains[0]
    link = hc.DomctlLinkDevice(frontend=5, backend=6, device="vif/0")
    handle(dom0, link)

    port = handle(guest, hc.EvtchnAllocUnbound(remote_dom=6))["port"]
    bound = handle(netvm, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port))
    assert bound["peer_doorbell"] == hypervisor.evtchn.get(5, port).doorbell
    pool = handle(guest, setup)
    assert handle(netvm, hc.GnttabMapPools(granter=5, device="vif/0"))["pools"] == [pool]
    # The guest holds every object of its device, its server's port's doorbell included (it
    # outlives the driver domain, for the next); the driver domain opens them through its view.
    assert guest.resources.peers == {
        hypervisor.evtchn.get(5, port).doorbell: 6,
        bound["doorbell"]: 6,
        pool["name"]: 6,
    }
    assert netvm.resources.peers == {}

    # Only that device, and only between those two.
    other_device = hc.GnttabSetupPool(peer=6, device="vbd/51712", pages=4)
    assert refused(hypervisor, guest, other_device) == "EPERM"
    assert refused(hypervisor, netvm, hc.GnttabMapPools(granter=5, device="vbd/51712")) == "EPERM"
    assert refused(hypervisor, other, hc.EvtchnAllocUnbound(remote_dom=6)) == "EPERM"
    assert refused(hypervisor, netvm, hc.EvtchnAllocUnbound(remote_dom=7)) == "EPERM"
    assert refused(hypervisor, other, hc.GnttabMapPools(granter=5, device="vif/0")) == "EPERM"

    # A released pool is no one's to open any more.
    handle(guest, hc.GnttabReleasePool(pool=pool["pool"]))
    assert pool["name"] not in guest.resources.peers

    handle(dom0, link.model_copy(update={"linked": False}))
    assert refused(hypervisor, netvm, hc.GnttabMapPools(granter=5, device="vif/0")) == "EPERM"
    assert refused(hypervisor, guest, hc.EvtchnAllocUnbound(remote_dom=6)) == "EPERM"


def test_a_dead_driver_domains_channels_and_pools_go_to_the_next_server_of_the_device(
    hypervisor: hyperd.Hypervisor,
) -> None:
    """The driver domain dies: the guest's channel stays bound to a stale port that keeps its
    doorbell, and its pools stay; the domain that serves the device next (a new domid) is
    handed both as it binds and maps, and the frontend replays on what it has. A domain that
    serves the guest nothing adopts nothing."""
    guest, netvm, successor, stranger = domains_on_paper(hypervisor, 5, 6, 8, 9)
    handle, dom0 = hypervisor.hypercalls.handle, hypervisor.domains[0]
    handle(dom0, hc.DomctlLinkDevice(frontend=5, backend=6, device="vif/0"))
    port = handle(guest, hc.EvtchnAllocUnbound(remote_dom=6))["port"]
    bound = handle(netvm, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port))
    pool = handle(guest, hc.GnttabSetupPool(peer=6, device="vif/0", pages=4))
    unbound = handle(guest, hc.EvtchnAllocUnbound(remote_dom=6))["port"]  # 6 never binds it

    hypervisor.evtchn.close_domain(6)  # as hyperd does when a domain dies
    hypervisor.gnttab.release_domain(6, netvm.resources)
    hypervisor.links.release_domain(6)
    netvm.resources.release()
    assert hypervisor.evtchn.get(5, port).state == "interdomain", "bound to the stale port"
    bind = hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port)
    assert refused(hypervisor, stranger, bind) == "EPERM"
    # Nor does the guest's other driver domain, which serves it another device.
    handle(dom0, hc.DomctlLinkDevice(frontend=5, backend=9, device="vbd/51712"))
    with pytest.raises(EvtchnError, match="not unbound for 9"):
        handle(stranger, bind)
    saved = DeviceLinks.from_dict(hypervisor.links.to_dict())  # across a hyperd restart
    assert saved.to_dict() == hypervisor.links.to_dict()
    hypervisor.links = saved

    handle(dom0, hc.DomctlLinkDevice(frontend=5, backend=8, device="vif/0"))
    handle(successor, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=unbound))
    assert hypervisor.evtchn.get(5, unbound).remote_dom == 8
    again = handle(successor, bind)
    assert again["doorbell"] == bound["doorbell"], "the doorbell the frontend rings"
    assert again["peer_doorbell"] == hypervisor.evtchn.get(5, port).doorbell
    assert hypervisor.evtchn.get(5, port).remote_dom == 8
    assert handle(successor, hc.GnttabMapPools(granter=5, device="vif/0"))["pools"] == [pool]
    # Every object of the device is shared with the successor now, and with nobody else.
    assert bound["doorbell"] in guest.resources.doorbells
    assert guest.resources.peers == dict.fromkeys(
        guest.resources.doorbells | guest.resources.segments, 8
    )

    handle(guest, hc.EvtchnClose(port=port))  # a live server's port waits for it to close
    assert hypervisor.evtchn.get(8, again["port"]).state == "unbound"


def test_what_a_dead_driver_domain_held_is_handed_to_nobody_once_its_device_is_detached(
    hypervisor: hyperd.Hypervisor,
) -> None:
    guest, netvm, other = domains_on_paper(hypervisor, 5, 6, 8)
    handle, dom0 = hypervisor.hypercalls.handle, hypervisor.domains[0]
    link = hc.DomctlLinkDevice(frontend=5, backend=6, device="vif/0")
    handle(dom0, link)
    port = handle(guest, hc.EvtchnAllocUnbound(remote_dom=6))["port"]
    handle(netvm, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port))
    hypervisor.evtchn.close_domain(6)
    hypervisor.links.release_domain(6)

    handle(dom0, link.model_copy(update={"linked": False}))  # network-detach
    handle(dom0, hc.DomctlLinkDevice(frontend=5, backend=8, device="vif/0"))  # a new vif 0
    with pytest.raises(EvtchnError, match="not unbound for 8"):
        handle(other, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port))


def test_a_successor_out_of_ports_leaves_the_stale_port_as_it_was(
    hypervisor: hyperd.Hypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest, netvm, successor = domains_on_paper(hypervisor, 5, 6, 8)
    handle, dom0 = hypervisor.hypercalls.handle, hypervisor.domains[0]
    handle(dom0, hc.DomctlLinkDevice(frontend=5, backend=6, device="vif/0"))
    port = handle(guest, hc.EvtchnAllocUnbound(remote_dom=6))["port"]
    bound = handle(netvm, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port))
    hypervisor.evtchn.close_domain(6)
    hypervisor.links.release_domain(6)
    handle(dom0, hc.DomctlLinkDevice(frontend=5, backend=8, device="vif/0"))
    handle(successor, hc.EvtchnAllocUnbound(remote_dom=0))
    monkeypatch.setattr(evtchn_module, "MAX_PORTS", 1)  # the successor's one port is its last

    with pytest.raises(EvtchnError, match="no free event-channel port"):
        handle(successor, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port))
    assert hypervisor.evtchn.peer_doorbell(hypervisor.evtchn.get(5, port)) == bound["doorbell"]


def test_a_frontends_own_pools_stay_its_own_when_its_peer_is_also_its_guest(
    hypervisor: hyperd.Hypervisor,
) -> None:
    """Domain 5 serves 6's disk and 6 serves 5's vif: each holds what it grants and what its
    own frontend ports are, whoever serves whom."""
    a, b = domains_on_paper(hypervisor, 5, 6)
    handle, dom0 = hypervisor.hypercalls.handle, hypervisor.domains[0]
    handle(dom0, hc.DomctlLinkDevice(frontend=6, backend=5, device="vbd/51712"))
    handle(dom0, hc.DomctlLinkDevice(frontend=5, backend=6, device="vif/0"))
    pool = handle(a, hc.GnttabSetupPool(peer=6, device="vif/0", pages=1))
    port = handle(a, hc.EvtchnAllocUnbound(remote_dom=6))
    assert pool["name"] in a.resources.segments and port["doorbell"] in a.resources.doorbells
    bound = handle(b, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port["port"]))
    assert bound["doorbell"] in a.resources.doorbells, "6 serves 5: its end is 5's to hold"


def served_then_dead(hypervisor: hyperd.Hypervisor) -> tuple[Domain, int, dict[str, Any]]:
    """Guest 5's vif/0 served by driver domain 6, which then dies as hyperd has it die: the
    guest, its port, and what 6's bind answered."""
    guest, netvm = domains_on_paper(hypervisor, 5, 6)
    handle = hypervisor.hypercalls.handle
    handle(hypervisor.domains[0], hc.DomctlLinkDevice(frontend=5, backend=6, device="vif/0"))
    port = handle(guest, hc.EvtchnAllocUnbound(remote_dom=6))["port"]
    bound = handle(netvm, hc.EvtchnBindInterdomain(remote_dom=5, remote_port=port))
    hypervisor.evtchn.close_domain(6)
    hypervisor.links.release_domain(6)
    return guest, port, bound


def test_a_dead_driver_domains_id_is_not_given_out_while_its_guests_wait_for_it(
    hypervisor: hyperd.Hypervisor,
) -> None:
    guest, port, _ = served_then_dead(hypervisor)
    handle = hypervisor.hypercalls.handle
    del hypervisor.domains[6]
    hypervisor.last_domid = 5

    assert hypervisor.next_domid() == 7, "6 stands for the stale port and the orphaned vif"
    handle(guest, hc.EvtchnClose(port=port))  # the stale port goes; the vif still waits
    hypervisor.last_domid = 5
    assert hypervisor.next_domid() == 7
    hypervisor.links.unlink(5, 6, "vif/0")  # detached: nothing waits for 6 any more
    hypervisor.last_domid = 5
    assert hypervisor.next_domid() == 6


def test_a_stale_port_nobody_adopts_goes_with_its_frontend_port(
    hypervisor: hyperd.Hypervisor,
) -> None:
    guest, port, bound = served_then_dead(hypervisor)
    handle = hypervisor.hypercalls.handle
    assert not hypervisor.links.share(5, 6)

    handle(guest, hc.EvtchnClose(port=port))
    assert hypervisor.evtchn.ports_of(6) == []
    assert guest.resources.doorbells == set(), bound["doorbell"]


def test_with_a_store_domain_it_serves_every_store_ring_and_alone_learns_them(
    hypervisor: hyperd.Hypervisor,
) -> None:
    guest, store, other = domains_on_paper(hypervisor, 5, 1, 7)
    dom0 = hypervisor.domains[0]
    hypervisor.store_domid = store.domid
    guest.store = hypervisor.ring(guest, "store", 4096)
    guest.console = hypervisor.ring(guest, "console", 4096)
    dom0.store = hypervisor.ring(dom0, "store", 4096)

    # The store ring's far end is the store domain's; the console's stays dom0's.
    assert hypervisor.evtchn.get(store.domid, guest.store.dom0_port).remote_dom == guest.domid
    assert hypervisor.evtchn.get(0, guest.console.dom0_port).remote_dom == guest.domid
    assert hypervisor.evtchn.get(store.domid, dom0.store.dom0_port).remote_dom == 0
    rings = hypervisor.hypercalls.handle(store, hc.StoreRings())["rings"]
    assert sorted(r["domid"] for r in rings) == [0, guest.domid]
    one = hypervisor.hypercalls.handle(store, hc.StoreRings(domid=guest.domid))["rings"]
    assert one == [
        {"domid": guest.domid, "segment": guest.store.segment, "port": guest.store.dom0_port}
    ]
    for caller in (dom0, guest, other):
        assert refused(hypervisor, caller, hc.StoreRings()) == "EPERM"
    assert refused(hypervisor, dom0, hc.DomctlDestroy(domid=store.domid)) == "EPERM"


def test_a_link_names_two_live_domus(hypervisor: hyperd.Hypervisor) -> None:
    domains_on_paper(hypervisor, 5)
    dom0 = hypervisor.domains[0]
    for frontend, backend, errno_name in ((5, 5, "EINVAL"), (5, 9, "ESRCH"), (9, 5, "ESRCH")):
        op = hc.DomctlLinkDevice(frontend=frontend, backend=backend, device="vif/0")
        assert refused(hypervisor, dom0, op) == errno_name
    assert hypervisor.links.to_dict() == []
    # Unlinking a device of a domain that is gone (a detach after its driver domain died) is
    # no error: its links went with it.
    gone = hc.DomctlLinkDevice(frontend=5, backend=9, device="vif/0", linked=False)
    assert hypervisor.hypercalls.handle(dom0, gone) == {}


def read_end_open(write_end: int) -> bool:
    """Whether anyone still holds the read end of the pipe ``write_end`` writes into."""
    try:
        os.write(write_end, b"x")
        return True
    except BrokenPipeError:
        return False


DISK = "vbd/51712"
T = TypeVar("T")


def test_the_descriptor_dom0_links_with_a_device_goes_to_its_backend_once(
    hypervisor: hyperd.Hypervisor,
) -> None:
    guest, blkvm, other = domains_on_paper(hypervisor, 5, 6, 7)
    handle = hypervisor.hypercalls.handle
    r, w = os.pipe()
    try:
        link = hc.DomctlLinkDevice(frontend=5, backend=6, device=DISK)
        handle(hypervisor.domains[0], link, Descriptors([r]))
        take = hc.DeviceTakeFd(frontend=5, device=DISK)
        assert refused(hypervisor, other, take) == "EPERM"
        assert refused(hypervisor, guest, take) == "EPERM", "not even the guest's own disk's"
        assert refused(hypervisor, blkvm, take.model_copy(update={"device": "vbd/2"})) == "EPERM"

        passed = Descriptors()
        assert handle(blkvm, take, passed) == {}
        fd = passed.take_reply()
        assert fd is not None
        os.write(w, b"y")
        assert os.read(fd, 1) == b"y", "the pipe dom0 gave"
        os.close(fd)
        assert not read_end_open(w), "hyperd kept no copy"
        assert refused(hypervisor, blkvm, take) == "ENOENT", "taken once"
    finally:
        os.close(w)


def test_a_descriptor_not_taken_is_closed_when_its_link_goes(
    hypervisor: hyperd.Hypervisor,
) -> None:
    domains_on_paper(hypervisor, 5, 6)
    handle, dom0 = hypervisor.hypercalls.handle, hypervisor.domains[0]
    link = hc.DomctlLinkDevice(frontend=5, backend=6, device=DISK)
    pipes = [os.pipe() for _ in range(3)]
    try:
        handle(dom0, link, Descriptors([pipes[0][0]]))
        handle(dom0, link, Descriptors([pipes[1][0]]))  # linked again: the first goes
        assert not read_end_open(pipes[0][1]) and read_end_open(pipes[1][1])
        handle(dom0, link.model_copy(update={"linked": False}))
        assert not read_end_open(pipes[1][1])

        handle(dom0, link, Descriptors([pipes[2][0]]))
        hypervisor.links.release_domain(5)  # the guest died
        assert not read_end_open(pipes[2][1])
        assert hypervisor.links.held() == 0
    finally:
        for _, w in pipes:
            os.close(w)


def test_hyperd_answers_each_queued_request_once_and_in_order(
    hypervisor: hyperd.Hypervisor,
) -> None:
    """It peeks at a request, and consumes it only once answered (crash safety): the peek
    must leave it queued, or the consume takes the next one unanswered (Python 3.11's
    socket.recv_fds drops MSG_PEEK: dom0's calls then timed out)."""
    for domain in [*domains_on_paper(hypervisor, 5), hypervisor.domains[0]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        theirs.settimeout(5)  # a reply that never comes fails the test
        domain.sock = ours
        try:
            for req_id in (1, 2, 3):
                theirs.send(hc.encode({"id": req_id, "op": "evtchn_status", "args": {"port": 9}}))
            for _ in range(3):
                hypervisor._on_hypercall(domain)
            replies = [json.loads(theirs.recv(hc.MAX_MESSAGE)) for _ in range(3)]
            assert [r["id"] for r in replies] == [1, 2, 3], domain.domid
        finally:
            theirs.close()
            ours.close()
            domain.sock = None


def test_descriptors_cross_the_hypercall_sockets_from_dom0_to_the_backend_only(
    hypervisor: hyperd.Hypervisor,
) -> None:
    """The real sockets: dom0's client sends the descriptor with its link, hyperd's loop holds
    it, the backend's client gets it with its reply; one a domU sends is never read."""
    guest, blkvm = domains_on_paper(hypervisor, 5, 6)
    clients = {}
    for domain in (hypervisor.domains[0], blkvm, guest):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        domain.sock = ours
        clients[domain.domid] = hc.HypercallClient(theirs, timeout=10)

    def answer(domain: Domain, call: Callable[..., T], *args: object) -> T:
        """Run ``call`` on a client while hyperd's loop answers it (one request)."""
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, *args)
            assert domain.sock is not None
            assert select.select([domain.sock], [], [], 10)[0], "the request arrives"
            hypervisor._on_hypercall(domain)
            return pending.result(10)

    r, w = os.pipe()
    try:
        link = hc.DomctlLinkDevice(frontend=5, backend=6, device=DISK)
        answer(hypervisor.domains[0], clients[0].call, link, r)
        os.close(r)  # hyperd holds its copy
        assert read_end_open(w)

        take = hc.DeviceTakeFd(frontend=5, device=DISK)
        result, fd = answer(blkvm, clients[6].take_fd, take)
        assert result == {}
        os.write(w, b"z")
        assert os.read(fd, 64).endswith(b"z"), "the pipe dom0 gave"
        os.close(fd)
        assert not read_end_open(w), "hyperd closed its copy once it was sent"

        stray_r, stray_w = os.pipe()  # a domU sends one with its call
        with pytest.raises(hc.HypercallError):  # it has no port 1; the descriptor is the point
            answer(guest, clients[5].call, hc.EvtchnStatus(port=1), stray_r)
        os.close(stray_r)
        assert not read_end_open(stray_w), "hyperd keeps no copy of a domU's descriptor"
        os.close(stray_w)
    finally:
        os.close(w)
        for client in clients.values():
            client.close()
        for domain in hypervisor.domains.values():
            if domain.sock is not None:
                domain.sock.close()


def test_grant_pools_take_fresh_refs_and_go_with_their_domain() -> None:
    tables = GrantTables()
    resources = PaperResources(5)
    pool = tables.setup_pool(5, 0, "vif/0", 16, resources)
    assert pool.gref_base >= 8, "grant refs 0..7 are reserved"
    tables.release_pool(5, pool.pool, resources)
    other = tables.setup_pool(5, 0, "vif/0", 4, resources)
    assert other.gref_base == pool.gref_base + 16, "a released pool's refs are never reused"
    tables.release_domain(5, resources)
    assert resources.segments == set()


def test_a_domain_may_hold_only_so_many_pools() -> None:
    tables = GrantTables()
    resources = PaperResources(5)
    for _ in range(MAX_POOLS_PER_DOMAIN):
        tables.setup_pool(5, 0, "vif/0", 1, resources)
    with pytest.raises(GnttabError) as refused:
        tables.setup_pool(5, 0, "vif/0", 1, resources)
    assert refused.value.errno_name == "ENOSPC"


def test_only_calls_that_query_are_read_only() -> None:
    """A call marked read-only is answered without saving hyperd's tables: one that changed
    them would be lost to a hyperd killed next."""
    read_only = {name for name, cls in hc.OPS.items() if cls.read_only}
    assert read_only == {
        "evtchn_status",
        "gnttab_map_pools",
        "domctl_list",
        "domctl_exec_target",
        "sysctl_dmesg",
        "sysctl_info",
        "store_rings",
    }


def test_a_backend_learns_the_pools_of_its_device_and_no_other() -> None:
    """A pool is set up for one device: only that device's backend hears of it, never the
    backend of the domain's other devices, nor of another domain's device of the same name."""
    tables = GrantTables()
    resources = PaperResources(5)
    vif = [tables.setup_pool(5, 0, "vif/0", 2, resources) for _ in range(2)]
    vbd = [tables.setup_pool(5, 0, "vbd/51712", 16, resources)]
    tables.setup_pool(6, 0, "vif/0", 4, PaperResources(6))
    assert tables.pools_for(0, 5, "vif/0") == vif
    assert tables.pools_for(0, 5, "vbd/51712") == vbd
    assert tables.pools_for(0, 5, "vif/1") == []
    assert tables.pools_for(5, 6, "vif/0") == [], "a pool granted to dom0 is not 5's to map"


def test_a_domain_grants_no_more_pages_than_its_memory(hypervisor: hyperd.Hypervisor) -> None:
    """In Xen a granted page is the guest's own: a 32 MiB domain has 8192 pages to grant, and
    a backend learns that budget with the pools. An honest frontend zeroes every page it
    grants, charged to its own memory: the budget refuses it nothing its memory allowed."""
    guest = Domain(3, "guest", DomainConfig(name="guest", memory=32), PaperResources(3))
    hypervisor.domains[3] = guest
    assert grant_budget(32) == 8192
    for device in ("vif/0", "vbd/51712"):
        hypervisor.hypercalls.handle(guest, hc.GnttabSetupPool(peer=0, device=device, pages=4096))
    with pytest.raises(GnttabError) as refused:
        hypervisor.hypercalls.handle(guest, hc.GnttabSetupPool(peer=0, device="vif/1", pages=1))
    assert refused.value.errno_name == "ENOSPC"
    dom0 = Domain(0, "Domain-0", dom0_config(4096, 2), PaperResources(0))
    answer = hypervisor.hypercalls.handle(dom0, hc.GnttabMapPools(granter=3, device="vbd/51712"))
    assert len(answer["pools"]) == 1, "the vbd's own pool, not the vif's"
    assert answer["max_pages"] == 8192
    gone = hc.GnttabMapPools(granter=9, device="vbd/51712")
    assert hypervisor.hypercalls.handle(dom0, gone)["max_pages"] == 0
    assert grant_budget(1 << 20) == MAX_POOL_PAGES_PER_DOMAIN, "and never more than the cap"
