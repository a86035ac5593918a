"""Event-channel port tables: hyperd's half of channels/evtchn.py.

Each domain has its own port space (ports from 1). A port is *unbound* (allocated for a named
remote domain) or *interdomain* (connected to a port of that domain). Each port owns one doorbell
semaphore, the one its domain waits on; binding hands each side the name of the other's doorbell
so notifications go straight from domain to domain. Closing a port returns its peer to unbound,
which is what lets a backend or a frontend reconnect.

A restarted dom0 keeps its ports: when dom0 dies, its ports become *stale* (still bound, the
frontends' doorbells untouched), and a new backend that binds to a frontend port held by a
stale dom0 port gets that very port back, so the frontend sees its channel carry on.

A driver domain's ports to the guests it serves are held by those guests (their doorbells are
the guests' objects, hyperd/hypercalls.py), so they too become stale when it dies, instead of
closing; a domain that serves the guest next (the driver domain restarted under a new domid,
or created again) and binds to such a frontend port is handed the stale port, renumbered in
its own port space, with the doorbell it had: the frontend replays on the channel it has. A
stale port goes when its frontend port closes or its guest dies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hyperd.resources import Resources

MAX_PORTS = 4096  # ports a domain may hold at once: the 2-level ABI's limit on 64-bit guests
#: Port numbers are handed out in increasing order and wrap here. Never reusing a number soon
#: matters: dom0 closes its end of a dead domain's channel some time after hyperd has already
#: released it, and must not close a newer channel that happened to get the same number.
PORT_NUMBERS = 1 << 20


class EvtchnError(Exception):
    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


@dataclass
class Port:
    domid: int
    port: int
    remote_dom: int
    doorbell: str
    owner: Resources  # the domU whose death frees this port's doorbell
    remote_port: int | None = None  # None while unbound
    stale: bool = False  # held by a dead incarnation of its domain, for the next to adopt

    @property
    def state(self) -> str:
        return "unbound" if self.remote_port is None else "interdomain"

    def to_dict(self) -> dict[str, Any]:
        return {
            "domid": self.domid,
            "port": self.port,
            "remote_dom": self.remote_dom,
            "doorbell": self.doorbell,
            "owner": self.owner.domid,
            "remote_port": self.remote_port,
            "stale": self.stale,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], owners: Mapping[int, Resources]) -> Port:
        remote_port = data["remote_port"]
        return cls(
            int(data["domid"]),
            int(data["port"]),
            int(data["remote_dom"]),
            str(data["doorbell"]),
            owners[int(data["owner"])],
            None if remote_port is None else int(remote_port),
            bool(data["stale"]),
        )


class EventChannels:
    def __init__(self) -> None:
        self._ports: dict[tuple[int, int], Port] = {}
        self._last: dict[int, int] = {}

    def _number(self, domid: int) -> int:
        """The next free port number of ``domid``."""
        used = {p for (d, p) in self._ports if d == domid}
        if len(used) >= MAX_PORTS:
            raise EvtchnError("ENOSPC", f"domain {domid}: no free event-channel port")
        port = self._last.get(domid, 0)
        while True:
            port = port % (PORT_NUMBERS - 1) + 1
            if port not in used:
                break
        self._last[domid] = port
        return port

    def _new_port(self, domid: int, remote_dom: int, resources: Resources) -> Port:
        port = self._number(domid)
        doorbell = resources.new_doorbell(f"evtchn{port}", resources.counterpart(domid, remote_dom))
        entry = Port(domid, port, remote_dom, doorbell, resources)
        self._ports[domid, port] = entry
        return entry

    def get(self, domid: int, port: int) -> Port:
        entry = self._ports.get((domid, port))
        if entry is None:
            raise EvtchnError("EINVAL", f"domain {domid} has no port {port}")
        return entry

    def peer_doorbell(self, entry: Port) -> str | None:
        if entry.remote_port is None:
            return None
        return self._ports[entry.remote_dom, entry.remote_port].doorbell

    def alloc_unbound(self, domid: int, remote_dom: int, resources: Resources) -> Port:
        return self._new_port(domid, remote_dom, resources)

    def bind_interdomain(
        self,
        domid: int,
        remote_dom: int,
        remote_port: int,
        resources: Resources,
        succeeds: Callable[[int], bool] = lambda dead: False,
    ) -> Port:
        """Bind a new port of ``domid`` to ``remote_port`` of ``remote_dom``, unbound for it;
        or hand it the stale port held for it (dom0 restarted), or the stale port of a dead
        domain that ``succeeds(dead)`` says ``domid`` takes over from (see the module's
        doc)."""
        remote = self._ports.get((remote_dom, remote_port))
        if remote is not None and remote.remote_dom == domid and remote.remote_port is not None:
            held = self._ports.get((domid, remote.remote_port))
            if held is not None and held.stale:
                held.stale = False
                return held
        if remote is not None and remote.remote_port is not None and remote.remote_dom != 0:
            held = self._ports.get((remote.remote_dom, remote.remote_port))
            if held is not None and held.stale and held.domid != domid and succeeds(held.domid):
                return self._hand_over(held, remote, domid)
        if (
            remote is not None
            and remote.remote_port is None
            and remote.remote_dom not in (0, domid)
            and succeeds(remote.remote_dom)
        ):  # a port the frontend made for the dead domain, which never bound it: ours now
            remote.remote_dom = domid
            remote.owner.reshare(remote.doorbell, domid)
        if remote is None or remote.remote_port is not None or remote.remote_dom != domid:
            raise EvtchnError(
                "EINVAL", f"domain {remote_dom} port {remote_port} is not unbound for {domid}"
            )
        local = self._new_port(domid, remote_dom, resources)
        local.remote_port = remote.port
        remote.remote_port = local.port
        return local

    def _hand_over(self, stale: Port, frontend: Port, domid: int) -> Port:
        """A dead driver domain's ``stale`` port, bound to ``frontend``, becomes ``domid``'s
        (see the module's doc); both doorbells are shared with ``domid`` instead."""
        number = self._number(domid)  # first: ENOSPC leaves everything as it was
        del self._ports[stale.domid, stale.port]
        stale.domid, stale.port, stale.stale = domid, number, False
        self._ports[domid, stale.port] = stale
        frontend.remote_dom, frontend.remote_port = domid, stale.port
        stale.owner.reshare(stale.doorbell, domid)
        frontend.owner.reshare(frontend.doorbell, domid)
        return stale

    def close(self, domid: int, port: int) -> None:
        entry = self._ports.pop((domid, port), None)
        if entry is None:
            raise EvtchnError("EINVAL", f"domain {domid} has no port {port}")
        if entry.remote_port is not None:
            peer = self._ports.get((entry.remote_dom, entry.remote_port))
            if peer is not None and peer.stale and peer.domid != 0:
                self.close(peer.domid, peer.port)  # a dead driver domain's: nobody adopts it now
            elif peer is not None:
                peer.remote_port = None
        entry.owner.drop_doorbell(entry.doorbell)

    def orphan(self, domid: int) -> None:
        """``domid`` died and will be restarted (dom0): its ports wait to be adopted."""
        for port in self.ports_of(domid):
            port.stale = True

    def close_domain(self, domid: int) -> None:
        """A domain died: close its ports, and the ports for it that it held (dom0's: their
        doorbells belong to the dead domain's resources). Its ports held by a guest it served
        become stale, bound still, for the guest's next server (see the module's doc); another
        domU's own port for it stays that domU's, for its driver to close or a new server to
        bind."""
        doomed = []
        for key, p in self._ports.items():
            if key[0] == domid and p.owner.domid not in (0, domid) and p.remote_port is not None:
                p.stale = True
            elif key[0] == domid or (p.remote_dom == domid and p.owner.domid == domid):
                doomed.append(key)
        for d, port in doomed:
            if (d, port) in self._ports:
                self.close(d, port)
        self._last.pop(domid, None)

    def ports_of(self, domid: int) -> list[Port]:
        return [p for (d, _), p in self._ports.items() if d == domid]

    def to_dict(self) -> dict[str, Any]:
        """Every port and each domain's last port number, for hyperd's state file."""
        return {
            "ports": [p.to_dict() for _, p in sorted(self._ports.items())],
            "last": {str(domid): port for domid, port in sorted(self._last.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], owners: Mapping[int, Resources]) -> EventChannels:
        """The tables ``to_dict`` wrote; ``owners`` maps a domid to that domain's Resources (a
        port's doorbell is one of its owner's objects)."""
        tables = cls()
        for entry in data["ports"]:
            port = Port.from_dict(entry, owners)
            tables._ports[port.domid, port.port] = port
        tables._last = {int(domid): int(port) for domid, port in data["last"].items()}
        return tables
