"""The XenBus buses drive a device through the handshake, in Xen's order, and tear it down.

A toy device type stands in for vif and vbd: the backend publishes a feature and waits
(InitWait); the frontend reads it, publishes its transport (ring-ref, event-channel) and says
Initialised; the backend reads those and connects; the frontend connects. Hot-unplug goes
through Closing to Closed, and the directories' removal reaches both drivers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from channels import xenbus
from channels.xenbus import XenbusState
from channels.xenbus_bus import Bus, XenbusDevice
from dom0.devices import add_device, backend_state, remove_device
from dom0.store.core import Store
from dom0.store.local import connect_local

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


@pytest.fixture
def buses(store: Store) -> Iterator[tuple[ToyFrontend, ToyBackend, object]]:
    toolstack = connect_local(store, 0)
    dom0 = connect_local(store, 0)
    guest = connect_local(store, DOMU)
    home = xenbus.domain_path(DOMU)
    toolstack.client.write(home, "")
    toolstack.client.set_perms(home, [xenbus.Perm(0, "n"), xenbus.Perm(DOMU, "r")])
    toolstack.client.write(xenbus.join_path(home, "device"), "")
    toolstack.client.write(xenbus.backend_root_path(0), "")
    front, back = ToyFrontend(), ToyBackend()
    front_bus = Bus(
        guest.client, xenbus.join_path(home, "device"), "frontend", {"toy": front}
    ).start()
    back_bus = Bus(dom0.client, xenbus.backend_root_path(0), "backend", {"toy": back}).start()
    yield front, back, toolstack.client
    front_bus.stop()
    back_bus.stop()
    for transport in (toolstack, dom0, guest):
        transport.close()


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
