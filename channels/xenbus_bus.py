"""The XenBus bus: finds devices in the store and drives each through its driver.

Both sides run one: the domU's frontend bus watches its ``device`` directory, dom0's backend bus
watches ``/local/domain/0/backend``. For each device directory that appears, the bus reads the
path and domain of the other end (``backend``/``backend-id`` on the front, ``frontend``/
``frontend-id`` on the back), hands the device to the driver registered for its type
(``probe``), and from then on tells the driver whenever the other end's ``state`` node changes
(``otherend_changed``) and when the device directory goes away (``remove``).

Everything happens on the bus's one thread, in the order the store reported it, so a driver
never races itself. A driver that raises fails only its own device: the bus writes the device's
``error`` node and moves it to Closing, as Linux's ``xenbus_dev_fatal`` does, and carries on.
Watches may fire spuriously and coalesce: drivers read the state they are given, never count.

One state means something only once: a backend's InitWait. A frontend that sees it while
Connected takes it for a backend that restarted and starts its rings over (hyper's transparent
restart). But the bus reads the state when it handles an event, not when the event fired, so the
InitWait the frontend has just answered can come again: its watch fires once when set and once
for the backend's write, and the second may be handled after the frontend connected, while the
backend has yet to see that. Taken for a restart, it made the frontend reset its rings under a
backend that was connecting to the old ones, and the device never carried a frame. So each time
a backend enters InitWait it writes a fresh ``instance`` token with it (one transaction), and the
frontend's bus hands the driver each backend instance's InitWait once.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from channels import xenbus
from channels.xenbus import XenbusState
from channels.xs import Watch, XsClient, XsConnectionLost, XsError, XsTimeoutError

log = logging.getLogger(__name__)

Side = Literal["frontend", "backend"]

#: The backend's key that changes each time it enters InitWait (see the module's doc).
INSTANCE = xenbus.Key.INSTANCE


@dataclass
class XenbusDevice:
    """One device as one side sees it."""

    xs: XsClient
    devtype: str
    devid: int
    nodename: str  # our directory
    otherend: str  # the other side's directory
    otherend_id: int
    frontend_id: int  # the domU this device belongs to (ours on the front)
    state: XenbusState = XenbusState.Unknown
    driver_data: object = None
    #: A backend went to InitWait while the frontend was (still) Connected to a previous
    #: backend: that Connected is stale until the frontend has moved (see otherend_ready).
    stale_otherend: bool = False
    #: On the front: the ``instance`` token of the backend's InitWait last handed to the driver.
    otherend_instance: str | None = None
    _watch: Watch | None = field(default=None, repr=False)

    @property
    def device_name(self) -> str:
        """``<type>/<devid>``, as both ends name this device beyond the store."""
        return xenbus.device_name(self.devtype, self.devid)

    def path(self, key: str) -> str:
        return xenbus.join_path(self.nodename, key)

    def read(self, key: str) -> str | None:
        return self.xs.read_optional(self.path(key))

    def write(self, key: str, value: str) -> bool:
        """Write one of our keys, unless our directory is gone or is another device's now (as
        ``write_all``). False if so."""
        return self.write_all({key: value})

    def write_all(self, entries: Mapping[str, str]) -> bool:
        """Write several of our keys in one transaction, unless our directory is gone (the
        device is being removed: a write would bring the directory back) or was written again
        for another other end (the toolstack re-attached the device to a driver domain that
        came back: that is a new device's directory). False if so."""

        def write(tx: Any) -> bool:
            if tx.read_optional(self.path(self._otherend_key)) != self.otherend:
                return False
            for key, value in entries.items():
                tx.write(self.path(key), value)
            return True

        return bool(self.xs.transaction(write))

    @property
    def _otherend_key(self) -> str:
        """Where our directory names the other end's: ``backend`` on the front (whose
        ``frontend_id`` is -1), ``frontend`` on the back."""
        return "backend" if self.frontend_id < 0 else "frontend"

    def replaced(self) -> bool:
        """Our directory names another other end than the one we follow: on the back, it
        was removed and written again for another frontend between two looks (a new device's,
        which this one must let go of first); on the front, the toolstack moved the device to
        another backend (a driver domain that came back), which the bus then follows."""
        named = self.read(self._otherend_key)
        return named is not None and named != self.otherend

    def moved(self) -> bool:
        """On the front, our directory names another backend (``replaced``) yet holds the state
        we are in (one that connects: Initialised or Connected): the toolstack moved the
        device, rather than removing its directory and writing it anew (which starts it over at
        Initialising)."""
        S = XenbusState
        if self.state in (S.Unknown, S.Initialising, S.Closing, S.Closed):
            return False  # nothing to carry over: the device starts again (remove, probe)
        return self.read("state") == str(int(self.state))

    def read_otherend(self, key: str) -> str | None:
        return self.xs.read_optional(xenbus.join_path(self.otherend, key))

    def otherend_int(self, key: str) -> int:
        """A number the other end must have published: KeyError if missing, ValueError if it
        is not a number."""
        value = self.read_otherend(key)
        if value is None:
            raise KeyError(f"{key} missing at {self.otherend}")
        return int(value)

    def otherend_state(self) -> XenbusState:
        """The other side's state; a node that is missing, garbled or unreadable reads as
        Unknown, as in Linux (``xenbus_read_driver_state``): a driver domain's backend
        directory goes with its home, which the guest may then no longer read (EACCES)."""
        try:
            value = self.read_otherend("state")
        except XsError as exc:
            if exc.errno_name != "EACCES":
                raise
            return XenbusState.Unknown
        try:
            return XenbusState(int(value or 0))
        except ValueError:
            return XenbusState.Unknown

    def switch_state(self, state: XenbusState) -> None:
        if state == self.state:
            return
        entries = {"state": str(int(state))}
        if state == XenbusState.InitWait:
            self.stale_otherend = self.otherend_state() == XenbusState.Connected
            entries[INSTANCE] = secrets.token_hex(8)  # this InitWait's (see the module's doc)
        self.write_all(entries)
        self.state = state  # even if the directory is gone: that is where we stand

    def otherend_initwait_is_new(self) -> bool:
        """On the front, the backend in InitWait: is this InitWait one the driver has not been
        given (a new backend instance), rather than the same one read again? Notes it."""
        instance = self.read_otherend(INSTANCE)
        if instance is not None and instance == self.otherend_instance:
            return False
        self.otherend_instance = instance
        return True

    def otherend_ready(self, state: XenbusState) -> bool:
        """A backend in InitWait: may it connect to a frontend in ``state``? Initialised, or
        Connected (Linux accepts both), but not the Connected a restarted backend finds: that
        frontend has yet to see our InitWait, reset its rings and say Initialised."""
        if state == XenbusState.Connected:
            return not self.stale_otherend
        self.stale_otherend = False
        return state == XenbusState.Initialised

    def backend_closing(self, state: XenbusState, disconnect: Callable[[], None]) -> bool:
        """A backend's rule for the frontend's new ``state``: if the frontend is closing or
        gone, or the toolstack asked us to close (by writing our state), ``disconnect`` and
        follow the frontend down to Closed, and say True; else False (nothing done)."""
        S = XenbusState
        if state not in (S.Closing, S.Closed, S.Unknown) and self.state not in (
            S.Closing,
            S.Closed,
        ):
            return False
        disconnect()
        if state in (S.Closed, S.Unknown):
            self.switch_state(S.Closed)
        elif state == S.Closing:
            self.switch_state(S.Closing)
        return True

    def fatal(self, message: str) -> None:
        """Report a device error in the store and start closing this device only."""
        log.warning("%s: %s", self.nodename, message)
        try:
            self.write("error", message[:1000])
            self.switch_state(XenbusState.Closing)
        except XsError as exc:
            log.warning("%s: could not report the error: %s", self.nodename, exc)


class Driver(Protocol):
    """What a device type implements on one side. Each call runs on the bus thread."""

    def probe(self, dev: XenbusDevice) -> None: ...

    def otherend_changed(self, dev: XenbusDevice, state: XenbusState) -> None: ...

    def remove(self, dev: XenbusDevice) -> None: ...


class SettingsDriver(Driver, Protocol):
    """A driver that also takes settings the toolstack changes in its own directory while the
    device runs (blkback's ``faults``): ``settings_changed`` runs on each scan."""

    def settings_changed(self, dev: XenbusDevice) -> None: ...


class Bus:
    def __init__(self, xs: XsClient, root: str, side: Side, drivers: dict[str, Driver]):
        self.xs = xs
        self.root = root
        self.side = side
        self.drivers = drivers
        self.devices: dict[str, XenbusDevice] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"xenbus-{side}", daemon=True)
        self._root_watch: Watch | None = None

    def start(self) -> Bus:
        self._root_watch = self.xs.watch(self.root, f"xenbus-{self.side}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._root_watch is not None:
            self._root_watch.queue.close(XsConnectionLost("the bus was stopped"))
        self._thread.join(timeout=5.0)

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._root_watch is not None
        queue = self._root_watch.queue
        while not self._stop.is_set():
            try:
                event = queue.get()
            except XsConnectionLost:
                return  # the store connection is gone, or we were stopped
            try:
                self._dispatch(event.token)
            except (XsError, XsTimeoutError) as exc:
                log.warning("xenbus %s: %s", self.side, exc)
            except XsConnectionLost:
                return

    def _dispatch(self, token: str) -> None:
        if token.startswith("otherend:"):
            nodename = token.removeprefix("otherend:")
            dev = self.devices.get(nodename)
            if dev is None:
                return
            if dev.replaced():  # a stale event of the device it replaced, or of its old backend
                self._scan()
                return
            state = dev.otherend_state()
            if (
                self.side == "frontend"
                and state == XenbusState.InitWait
                and not dev.otherend_initwait_is_new()
            ):
                return  # the InitWait the driver was given, read again
            self._call(dev, "otherend_changed", state)
            return
        self._scan()

    def _scan(self) -> None:
        present = set(self._device_dirs())
        replaced = {n for n in present & set(self.devices) if self.devices[n].replaced()}
        moved = {n for n in replaced if self.side == "frontend" and self.devices[n].moved()}
        for nodename in sorted((set(self.devices) - present) | (replaced - moved)):
            self._remove(self.devices.pop(nodename))
        for nodename in sorted(moved):
            self._follow(self.devices[nodename])
        for nodename in sorted(present - set(self.devices)):
            self._probe(nodename)
        for dev in list(self.devices.values()):
            self._check_own_state(dev)
            if hasattr(self.drivers[dev.devtype], "settings_changed"):
                self._call(dev, "settings_changed")

    def _check_own_state(self, dev: XenbusDevice) -> None:
        """The toolstack closes a device by writing *our* state (libxl writes Closing into the
        backend directory on hot-unplug): tell the driver, which then sees ``dev.state``."""
        value = dev.read("state")
        try:
            state = XenbusState(int(value or 0))
        except ValueError:
            return
        if state != dev.state and dev.state is not XenbusState.Unknown:
            dev.state = state
            self._call(dev, "otherend_changed", dev.otherend_state())

    def _device_dirs(self) -> list[str]:
        """Frontends live at root/<type>/<devid>; backends at root/<type>/<frontid>/<devid>."""
        levels = 2 if self.side == "frontend" else 3
        found = [self.root]
        for _ in range(levels):
            found = [xenbus.join_path(p, child) for p in found for child in self._children(p)]
        return found

    def _children(self, path: str) -> list[str]:
        try:
            return self.xs.directory(path)
        except XsError:
            return []

    def _probe(self, nodename: str) -> None:
        parts = nodename.removeprefix(self.root + "/").split("/")
        devtype = parts[0]
        driver = self.drivers.get(devtype)
        if driver is None:
            return
        other_key = "backend" if self.side == "frontend" else "frontend"
        otherend = self.xs.read_optional(xenbus.join_path(nodename, other_key))
        other_id = self.xs.read_optional(xenbus.join_path(nodename, f"{other_key}-id"))
        try:
            devid = int(parts[-1])
            frontend_id = int(parts[1]) if self.side == "backend" else -1
            if otherend is None or other_id is None:
                raise ValueError(f"{other_key} or {other_key}-id missing")
            dev = XenbusDevice(
                self.xs,
                devtype,
                devid,
                nodename,
                xenbus.validate_path(otherend),
                int(other_id),
                frontend_id,
            )
        except ValueError as exc:
            log.warning("xenbus %s: ignoring %s: %s", self.side, nodename, exc)
            return
        self.devices[nodename] = dev
        self._watch_otherend(dev)
        self._call(dev, "probe")

    def _follow(self, dev: XenbusDevice) -> None:
        """The toolstack moved a frontend's device to another backend, keeping the frontend's
        directory (the driver domain serving it came back, under a new domid): the device and
        its driver stay; the bus watches the new backend instead, whose InitWait, a new
        instance's, the driver takes for a restart's, and replays."""
        otherend = self.xs.read_optional(dev.path("backend"))
        other_id = self.xs.read_optional(dev.path("backend-id"))
        try:
            path = xenbus.validate_path(otherend or "")
            domid = int(other_id or "")
        except ValueError as exc:  # XsPathError is one
            log.warning("xenbus %s: %s moved to a bad backend: %s", self.side, dev.nodename, exc)
            return
        self._unwatch(dev)
        dev.otherend, dev.otherend_id, dev.otherend_instance = path, domid, None
        log.info("xenbus %s: %s is served by %s now", self.side, dev.nodename, path)
        self._watch_otherend(dev)

    def _watch_otherend(self, dev: XenbusDevice) -> None:
        assert self._root_watch is not None
        dev._watch = self.xs.watch(
            xenbus.join_path(dev.otherend, "state"),
            f"otherend:{dev.nodename}",
            queue=self._root_watch.queue,
        )

    def _unwatch(self, dev: XenbusDevice) -> None:
        if dev._watch is not None:
            try:
                dev._watch.unwatch()
            except (XsError, XsTimeoutError, XsConnectionLost):
                pass
            dev._watch = None

    def _remove(self, dev: XenbusDevice) -> None:
        self._unwatch(dev)
        self._call(dev, "remove")

    def _call(self, dev: XenbusDevice, method: str, *args: object) -> None:
        driver = self.drivers[dev.devtype]
        try:
            getattr(driver, method)(dev, *args)
        except Exception as exc:
            log.exception("xenbus %s: %s.%s failed", self.side, dev.nodename, method)
            if method != "remove":
                dev.fatal(f"{method} failed: {exc}")
