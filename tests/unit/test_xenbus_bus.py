"""The XenBus buses drive a device through the handshake, in Xen's order, and tear it down.

A toy device type stands in for vif and vbd: the backend publishes a feature and waits
(InitWait); the frontend reads it, publishes its transport (ring-ref, event-channel) and says
Initialised; the backend reads those and connects; the frontend connects. Hot-unplug goes
through Closing to Closed, and the directories' removal reaches both drivers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from channels import xenbus
from channels.xenbus import XenbusState
from channels.xenbus_bus import Bus, Driver, XenbusDevice
from dom0.devices import add_device, backend_state, device_paths, move_device, remove_device
from xenstored.core import Store
from xenstored.local import connect_local

S = XenbusState
DOMU = 7


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, str]] = []
        self.changed = threading.Condition()

    def note(self, dev: XenbusDevice, what: str) -> None:
        with self.changed:
            self.log.append((what, dev.devid, dev.state.name))
            self.changed.notify_all()

    def wait_for(self, entry: tuple[str, int, str], timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: entry in self.log, timeout), (entry, self.log)


class ToyBackend(Recorder):
    def probe(self, dev: XenbusDevice) -> None:
        dev.write("feature-toy", "1")
        dev.switch_state(S.InitWait)
        self.note(dev, "probe")

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        if state == S.Initialised and dev.state == S.InitWait:
            if dev.read_otherend("ring-ref") != "42":
                dev.fatal("frontend ring-ref missing")
                return
            dev.switch_state(S.Connected)
        elif dev.state == S.Closing and state in (S.Closing, S.Closed, S.Unknown):
            dev.switch_state(S.Closed)
        self.note(dev, f"front {state.name}")

    def remove(self, dev: XenbusDevice) -> None:
        self.note(dev, "remove")


class ToyFrontend(Recorder):
    def probe(self, dev: XenbusDevice) -> None:
        self.note(dev, "probe")

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        if state == S.InitWait and dev.read_otherend("feature-toy") == "1":
            dev.write("ring-ref", "42")
            dev.write("event-channel", "3")
            dev.switch_state(S.Initialised)
        elif state == S.Connected:
            dev.switch_state(S.Connected)
        elif state == S.Closing:
            dev.switch_state(S.Closed)
        self.note(dev, f"back {state.name}")

    def remove(self, dev: XenbusDevice) -> None:
        self.note(dev, "remove")


@pytest.fixture
def store() -> Store:
    store = Store()
    store.introduce_domain(DOMU)
    return store


@dataclass
class Clients:
    toolstack: Any
    dom0: Any
    guest: Any


@pytest.fixture
def clients(store: Store) -> Iterator[Clients]:
    """Store clients of the toolstack, dom0 and the guest, the guest's home and ``device``
    directory made."""
    transports = [connect_local(store, 0), connect_local(store, 0), connect_local(store, DOMU)]
    made = Clients(*(transport.client for transport in transports))
    home = xenbus.domain_path(DOMU)
    made.toolstack.write(home, "")
    made.toolstack.set_perms(home, [xenbus.Perm(0, "n"), xenbus.Perm(DOMU, "r")])
    made.toolstack.write(xenbus.join_path(home, "device"), "")
    yield made
    for transport in transports:
        transport.close()


def front_bus(clients: Clients, driver: Driver) -> Bus:
    device_dir = xenbus.join_path(xenbus.domain_path(DOMU), "device")
    return Bus(clients.guest, device_dir, "frontend", {"toy": driver}).start()


@pytest.fixture
def buses(clients: Clients) -> Iterator[tuple[ToyFrontend, ToyBackend, object]]:
    clients.toolstack.write(xenbus.backend_root_path(0), "")
    front, back = ToyFrontend(), ToyBackend()
    running = [
        front_bus(clients, front),
        Bus(clients.dom0, xenbus.backend_root_path(0), "backend", {"toy": back}).start(),
    ]
    yield front, back, clients.toolstack
    for bus in running:
        bus.stop()


def test_handshake_in_xens_order_then_unplug(
    buses: tuple[ToyFrontend, ToyBackend, object],
) -> None:
    front, back, xs = buses
    paths = add_device(xs, DOMU, 0, "toy", 0)  # type: ignore[arg-type]
    front.wait_for(("back Connected", 0, "Connected"))
    back.wait_for(("front Connected", 0, "Connected"))
    order = [e for e in back.log + front.log if "Connected" in e[2] or "probe" in e[0]]
    assert ("probe", 0, "InitWait") in back.log
    assert ("back InitWait", 0, "Initialised") in front.log
    assert ("front Initialised", 0, "Connected") in back.log
    assert order

    assert remove_device(xs, paths)  # type: ignore[arg-type]
    front.wait_for(("remove", 0, "Closed"))
    back.wait_for(("remove", 0, "Closed"))
    assert xs.read_optional(paths.frontend) is None  # type: ignore[attr-defined]


def test_a_bad_frontend_fails_only_its_device(
    buses: tuple[ToyFrontend, ToyBackend, object],
    store: Store,
) -> None:
    _front, back, xs = buses
    good = add_device(xs, DOMU, 0, "toy", 1)  # type: ignore[arg-type]
    back.wait_for(("front Connected", 1, "Connected"))
    bad = add_device(xs, DOMU, 0, "toy", 2)  # type: ignore[arg-type]
    evil = connect_local(store, DOMU).client
    # A frontend that claims Initialised without publishing its ring.
    evil.write(xenbus.join_path(bad.frontend, "state"), str(int(S.Initialised)))
    # The backend reports the error and closes; the (honest) frontend driver follows.
    back.wait_for(("front Closed", 2, "Closed"))
    error = xs.read(xenbus.join_path(bad.backend, "error"))  # type: ignore[attr-defined]
    assert error == "frontend ring-ref missing"
    assert backend_state(xs, good) == S.Connected  # type: ignore[arg-type]


def test_the_frontend_cannot_write_the_backend_directory(
    buses: tuple[ToyFrontend, ToyBackend, object],
    store: Store,
) -> None:
    _, back, xs = buses
    paths = add_device(xs, DOMU, 0, "toy", 3)  # type: ignore[arg-type]
    back.wait_for(("front Connected", 3, "Connected"))
    guest = connect_local(store, DOMU).client
    with pytest.raises(Exception, match="EACCES"):
        guest.write(xenbus.join_path(paths.backend, "state"), "6")
    assert guest.read(xenbus.join_path(paths.backend, "feature-toy")) == "1"


class RestartingFrontend(Recorder):
    """netfront's rules: straight to Connected on InitWait; InitWait while Connected is a
    backend that restarted (start the rings over, say Initialised); Connected again after.
    Handling an event of device 1 waits for ``gate``, which holds the bus's one thread."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def probe(self, dev: XenbusDevice) -> None:
        self.note(dev, "probe")

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        if dev.devid == 1:
            assert self.gate.wait(5.0)
        if state == S.InitWait and dev.state in (S.Unknown, S.Initialising):
            dev.switch_state(S.Connected)
        elif state == S.InitWait and dev.state == S.Connected:
            self.note(dev, "restart")
            dev.switch_state(S.Initialised)
        elif state == S.Connected and dev.state == S.Initialised:
            dev.switch_state(S.Connected)
        # Unknown: the backend is gone (its driver domain died); the frontend waits.
        self.note(dev, f"back {state.name}")

    def remove(self, dev: XenbusDevice) -> None:
        self.note(dev, "remove")


@pytest.fixture
def front_only(clients: Clients) -> Iterator[tuple[RestartingFrontend, object, object]]:
    """A frontend bus with RestartingFrontend for "toy"; the toolstack's client and dom0's, for
    the test to play the backend by hand."""
    front = RestartingFrontend()
    bus = front_bus(clients, front)
    yield front, clients.toolstack, clients.dom0
    front.gate.set()
    bus.stop()


def two_connected(
    front: RestartingFrontend, xs: object, dom0: object
) -> tuple[XenbusDevice, XenbusDevice]:
    """Devices 0 and 1 added, their backends (driven by the test) in InitWait, and the
    frontend Connected to both: the two backends."""
    backs = []
    for devid in (0, 1):
        paths = add_device(xs, DOMU, 0, "toy", devid)  # type: ignore[arg-type]
        back = XenbusDevice(dom0, "toy", devid, paths.backend, paths.frontend, DOMU, DOMU)  # type: ignore[arg-type]
        back.switch_state(S.InitWait)
        front.wait_for(("back InitWait", devid, "Connected"))
        backs.append(back)
    return backs[0], backs[1]


def test_the_initwait_a_frontend_answered_read_again_is_not_a_restart(
    front_only: tuple[RestartingFrontend, object, object],
) -> None:
    front, xs, dom0 = front_only
    back, marker = two_connected(front, xs, dom0)
    # The frontend's watch fires again and is handled while the backend is still in InitWait
    # (as when the watch's first firing and the backend's write are both handled after the
    # frontend connected); device 1's event, handled after it, says when.
    dom0.write(back.path("state"), str(int(S.InitWait)))  # type: ignore[attr-defined]
    marker.switch_state(S.Connected)
    front.wait_for(("back Connected", 1, "Connected"))
    back.switch_state(S.Connected)
    front.wait_for(("back Connected", 0, "Connected"))
    assert ("restart", 0, "Connected") not in front.log

    back.switch_state(S.Initialising)  # a backend that really starts again...
    back.switch_state(S.InitWait)
    front.wait_for(("restart", 0, "Connected"))  # ...is one
    back.switch_state(S.Connected)
    front.wait_for(("back Connected", 0, "Connected"))


def test_a_restart_is_seen_even_when_the_frontend_never_read_the_backends_connected(
    front_only: tuple[RestartingFrontend, object, object],
) -> None:
    front, xs, dom0 = front_only
    back, other = two_connected(front, xs, dom0)
    front.gate.clear()
    other.switch_state(S.Connected)  # holds the bus thread in device 1's driver
    back.switch_state(S.Connected)  # both events of device 0 are read after it: InitWait twice
    back.switch_state(S.Initialising)
    back.switch_state(S.InitWait)
    front.gate.set()
    front.wait_for(("restart", 0, "Connected"))
    back.switch_state(S.Connected)
    front.wait_for(("back Connected", 0, "Connected"))
    assert [e for e in front.log if e[0] == "restart"] == [("restart", 0, "Connected")]


def test_a_frontend_directory_written_again_for_another_backend_is_a_new_device(
    front_only: tuple[RestartingFrontend, object, object],
) -> None:
    """The toolstack re-attaches a device to a driver domain that came back: it removes the
    frontend directory and writes it again, naming the new backend, while the bus thread is
    busy. The bus lets go of the old device and probes the new one; the old one's last word
    (Closed, its backend gone) never lands in the new directory."""
    front, xs, dom0 = front_only
    _, other = two_connected(front, xs, dom0)
    front.gate.clear()
    other.switch_state(S.Connected)  # holds the bus thread in device 1's driver
    old = device_paths(DOMU, 0, "toy", 0)
    remove_device(xs, old, timeout=0.01)  # type: ignore[arg-type]  # no backend driver to close
    paths = add_device(xs, DOMU, 5, "toy", 0)  # type: ignore[arg-type]
    front.gate.set()
    front.wait_for(("remove", 0, "Connected"))
    front.wait_for(("probe", 0, "Unknown"))
    assert xs.read(xenbus.join_path(paths.frontend, "state")) == str(int(S.Initialising))  # type: ignore[attr-defined]

    new_back = XenbusDevice(dom0, "toy", 0, paths.backend, paths.frontend, DOMU, DOMU)  # type: ignore[arg-type]
    new_back.switch_state(S.InitWait)
    front.wait_for(("back InitWait", 0, "Connected"))


def test_a_device_the_toolstack_moves_to_another_backend_is_followed_and_replays(
    front_only: tuple[RestartingFrontend, object, object],
) -> None:
    """The driver domain serving device 0 died (its backend directory went with it) and came
    back under a new domid: the toolstack moves the device, keeping the frontend's directory.
    The bus follows the new backend, whose InitWait the driver takes for a restart's; the
    device is neither removed nor probed again, and the new backend may read the frontend."""
    front, xs, dom0 = front_only
    back, _ = two_connected(front, xs, dom0)
    xs.rm(back.nodename)  # type: ignore[attr-defined]
    front.wait_for(("back Unknown", 0, "Connected"))
    nested = "/queue-0/tx-ring-ref"  # as a vif of several queues writes its keys
    xs.write(back.otherend + nested, "8")  # type: ignore[attr-defined]

    paths = move_device(xs, DOMU, 5, "toy", 0)  # type: ignore[arg-type]
    front.wait_for(("back Initialising", 0, "Connected"))
    for node in ("", "/backend", "/state", nested):
        perms = xs.get_perms(paths.frontend + node)  # type: ignore[attr-defined]
        assert [(p.domid, p.perm) for p in perms] == [(DOMU, "n"), (5, "r")], node
    new_back = XenbusDevice(dom0, "toy", 0, paths.backend, paths.frontend, DOMU, DOMU)  # type: ignore[arg-type]
    new_back.switch_state(S.InitWait)
    front.wait_for(("restart", 0, "Connected"))
    new_back.switch_state(S.Connected)
    front.wait_for(("back Connected", 0, "Connected"))
    assert not [
        e for e in front.log if e[0] in ("remove", "probe") and e[1] == 0 and e[2] != "Unknown"
    ]
