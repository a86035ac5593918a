"""The hypercall ABI: what a domain may ask of hyperd, and how.

Every domain gets one end of a SOCK_SEQPACKET socket pair when hyperd spawns it. The socket *is*
the caller's identity: hyperd knows which domain holds which end, so no message carries a trusted
domid. A message is one JSON object:

    request   {"id": 7, "op": "evtchn_alloc_unbound", "args": {"remote_dom": 0}}
    reply     {"id": 7, "ok": true, "result": {...}}
              {"id": 7, "ok": false, "error": "EPERM", "message": "..."}
    event     {"event": "domain_state", "data": {...}}        (hyperd -> dom0 only)

A message may carry one file descriptor (SCM_RIGHTS) where its op says so: dom0's
``domctl_link_device`` gives one, the reply to ``device_take_fd`` hands it on. hyperd reads
descriptors from dom0's socket alone; any other domain's go unread, and the kernel closes them.

Each operation is a pydantic model below. Its docstring says who may call it; operations marked
``privileged`` are refused with EPERM to every domain but dom0. Arguments are validated on the
hyperd side against these models (unknown keys forbidden), because a domU may send anything.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from channels import linux
from channels.config import RECEIVED, DomainConfig
from channels.errors import Closed, HyperError

log = logging.getLogger(__name__)

DOMID_MAX = 0x7FEF  # ids from 0x7FF0 up are reserved, as in Xen
UID_MAX = 0xFFFFFFFE  # (uid_t)-1 is "no uid"
MAX_MESSAGE = 256 * 1024

DomId = int


class HypercallError(HyperError):
    """hyperd refused or failed a hypercall; ``errno_name`` is e.g. "EPERM" or "EINVAL"."""

    def __init__(self, op: str, errno_name: str, message: str) -> None:
        super().__init__(f"{op}: {errno_name}: {message}")
        self.op = op
        self.errno_name = errno_name
        self.message = message


class HypervisorGone(HypercallError, Closed):
    """The hypercall socket closed: hyperd exited or was killed."""

    def __init__(self, op: str) -> None:
        super().__init__(op, "ENOTCONN", "hypervisor connection closed")


class Op(BaseModel):
    """Base of every hypercall; subclasses set ``op``, ``privileged`` for dom0-only calls, and
    ``read_only`` for calls that change nothing hyperd keeps (it saves no state after them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    op: ClassVar[str]
    privileged: ClassVar[bool] = False
    read_only: ClassVar[bool] = False


# -- event channels --------------------------------------------------------------------------


class EvtchnAllocUnbound(Op):
    """Any domain: allocate a local port that only ``remote_dom`` may bind to.

    Result: {"port", "doorbell"} where doorbell names the semaphore this port waits on."""

    op = "evtchn_alloc_unbound"
    remote_dom: int = Field(ge=0, le=DOMID_MAX)


class EvtchnBindInterdomain(Op):
    """Any domain: bind a new local port to ``remote_port`` of ``remote_dom``, which must have been
    allocated unbound for the caller. Result: {"port", "doorbell", "peer_doorbell"}."""

    op = "evtchn_bind_interdomain"
    remote_dom: int = Field(ge=0, le=DOMID_MAX)
    remote_port: int = Field(ge=1)


class EvtchnStatus(Op):
    """Any domain, own ports only. Result: {"state": "unbound"|"interdomain", "remote_dom",
    "remote_port", "doorbell", "peer_doorbell" (None while unbound)}."""

    op = "evtchn_status"
    read_only = True
    port: int = Field(ge=1)


class EvtchnClose(Op):
    """Any domain, own ports only: free the port; the peer's port returns to unbound."""

    op = "evtchn_close"
    port: int = Field(ge=1)


# -- grant tables ----------------------------------------------------------------------------


#: A device, as both ends of its XenBus connection name it beyond the store: ``<type>/<devid>``
#: (``vif/0``, ``vbd/51712``), its frontend dir's path below ``device/`` (channels/xenbus.py).
DEVICE_PATTERN = r"^[A-Za-z0-9_-]{1,32}/[0-9]{1,10}$"


class GnttabSetupPool(Op):
    """Any domain: a pool of ``pages`` 4 KiB pages that the caller may grant to ``peer`` only,
    for its ``device`` only: only that device's backend maps it (GnttabMapPools).

    Result: {"pool", "name", "gref_base", "pages"}: grant refs gref_base..gref_base+pages-1 name
    the pool's pages; the pool's own grant entries say which of them are currently granted.

    ABI: ``device`` is required since issue 12; before, pools named no device and every backend
    of the peer mapped every pool. A frontend that names another of its devices has that
    device's backend map the pool, and count it against what that device may map: it harms
    only its own devices."""

    op = "gnttab_setup_pool"
    peer: int = Field(ge=0, le=DOMID_MAX)
    device: str = Field(pattern=DEVICE_PATTERN)
    pages: int = Field(ge=1, le=4096)


class GnttabMapPools(Op):
    """Any domain: the pools of ``granter`` set up for the caller and for ``device``, live now,
    so that the device's backend maps them all as it connects (its data path never waits on
    hyperd), and maps again, keeping only these, when a request names a ref it does not know.
    Result: {"pools": [{"pool", "name", "gref_base", "pages"}...], "max_pages": the granter's
    grant budget, the pages it may have in pools at once, for all its devices (0 for no such
    domain); the backend maps no more than that, nor than its device's protocol can use.

    ABI: ``device`` is required since issue 12; before, the answer was every pool of
    ``granter`` set up for the caller, whatever its device."""

    op = "gnttab_map_pools"
    read_only = True
    granter: int = Field(ge=0, le=DOMID_MAX)
    device: str = Field(pattern=DEVICE_PATTERN)


class GnttabReleasePool(Op):
    """The granting domain: destroy one of its pools (the peer's mapping stays valid until the
    peer unmaps it, as a revoked grant does not yank a live mapping)."""

    op = "gnttab_release_pool"
    pool: int = Field(ge=0)


# -- scheduling ------------------------------------------------------------------------------


class SchedBooted(Op):
    """A domU kernel: boot finished, the workload runs. The domain's state becomes running."""

    op = "sched_booted"


#: Why a domain shuts down (Xen's SHUTDOWN_poweroff, _reboot, _crash).
ShutdownReason = Literal["poweroff", "reboot", "crash"]


class SchedShutdown(Op):
    """Any domain, about itself: it is shutting down for ``reason`` (SCHEDOP_shutdown).
    ``code`` is the workload's exit status, for the log."""

    op = "sched_shutdown"
    reason: ShutdownReason
    code: int = Field(default=0, ge=-255, le=255)  # an exit status, or minus a signal number


# -- domain control (dom0 only) --------------------------------------------------------------


class DomctlCreate(Op):
    """dom0: build a domain from a validated config (its shape is checked again here, the host
    is not: dom0 did) for ``owner``, the uid of the user who asked (their disk images are
    accepted besides root's; kept with the domain for its restarts). Result: DomainInfo of the
    new domain."""

    op = "domctl_create"
    privileged = True
    config: DomainConfig
    owner: int = Field(default=0, ge=0, le=UID_MAX)


class DomctlDestroy(Op):
    """dom0: kill a domain now and release everything it holds."""

    op = "domctl_destroy"
    privileged = True
    domid: int = Field(ge=1, le=DOMID_MAX)


class DomctlLinkDevice(Op):
    """dom0: domain ``backend`` (a driver domain) serves ``device`` of domain ``frontend``
    (``linked``), or no longer does. Only domUs linked so share event channels, and a guest
    grants pools for a device only to the domain that serves it, which maps no other device's;
    dom0 serves every device and needs no link (hyperd/devlinks.py).

    With ``linked``, dom0 may send one descriptor with the call (SCM_RIGHTS): the device's
    native resource, opened by dom0 (a vbd's loop device), as Xen assigns a device to a driver
    domain. hyperd holds it for the backend, which takes it once (DeviceTakeFd), and closes it
    if the link goes first (unlinked, linked again, either domain dead, hyperd restarted)."""

    op = "domctl_link_device"
    privileged = True
    frontend: int = Field(ge=1, le=DOMID_MAX)
    backend: int = Field(ge=1, le=DOMID_MAX)
    device: str = Field(pattern=DEVICE_PATTERN)
    linked: bool = True


class DeviceTakeFd(Op):
    """Any domain: the descriptor dom0 linked with ``device`` of domain ``frontend`` for the
    caller to serve (DomctlLinkDevice), sent with the reply (SCM_RIGHTS) and no longer held by
    hyperd: taken once. EPERM when the caller does not serve that device; ENOENT when no
    descriptor waits (taken already, or none was given). Result: {}."""

    op = "device_take_fd"
    frontend: int = Field(ge=1, le=DOMID_MAX)
    device: str = Field(pattern=DEVICE_PATTERN)


class DomctlPause(Op):
    """dom0: freeze (pause=True) or thaw (pause=False) every process of a domain."""

    op = "domctl_pause"
    privileged = True
    domid: int = Field(ge=1, le=DOMID_MAX)
    pause: bool


class DomctlList(Op):
    """dom0: every domain, dom0 included. Result: {"domains": [DomainInfo...]}."""

    op = "domctl_list"
    read_only = True
    privileged = True


class DomctlExecTarget(Op):
    """dom0: where a process must go to run inside a domain's sandbox.
    Result: {"pid": host pid of the domain's workload init, "cgroup_procs": [paths]}."""

    op = "domctl_exec_target"
    read_only = True
    privileged = True
    domid: int = Field(ge=1, le=DOMID_MAX)


class DomctlSetSched(Op):
    """dom0: change a domain's cpu_weight and/or cap (xl sched-credit)."""

    op = "domctl_set_sched"
    privileged = True
    domid: int = Field(ge=1, le=DOMID_MAX)
    cpu_weight: int | None = Field(default=None, ge=1, le=65535)
    cap: int | None = Field(default=None, ge=0)


class DomctlSetMemory(Op):
    """dom0: change a domain's memory limit, in MiB (xl mem-set). Refused (EBUSY) when the
    domain already uses more than the new limit allows it to reclaim."""

    op = "domctl_set_memory"
    privileged = True
    domid: int = Field(ge=1, le=DOMID_MAX)
    memory: int = Field(ge=32, le=1 << 22)


class SysctlDmesg(Op):
    """dom0: the hypervisor's log. Result: {"lines": [...]}."""

    op = "sysctl_dmesg"
    read_only = True
    privileged = True
    clear: bool = False


class SysctlInfo(Op):
    """dom0: host and hypervisor facts for `hyperctl info`."""

    op = "sysctl_info"
    read_only = True
    privileged = True


class StoreRings(Op):
    """The store's stub domain alone (``hyperd --store-domain``): the store rings it serves,
    those of dom0 and of every domain being built or running, or of ``domid`` alone (after the
    toolstack's INTRODUCE), each {"domid", "segment", "port"} with ``port`` the caller's own end
    of the ring's event channel; and how many times dom0 has restarted (hyperd's
    ``dom0_restarted`` event says it again at each restart). EPERM for any other caller.
    Result: {"rings": [...], "dom0_restarts": N}."""

    op = "store_rings"
    read_only = True
    domid: int | None = Field(default=None, ge=0, le=DOMID_MAX)


class SysctlHalt(Op):
    """dom0: destroy every domU, then stop dom0 and hyperd."""

    op = "sysctl_halt"
    privileged = True


OPS: dict[str, type[Op]] = {
    cls.op: cls
    for cls in (
        EvtchnAllocUnbound,
        EvtchnBindInterdomain,
        EvtchnStatus,
        EvtchnClose,
        GnttabSetupPool,
        GnttabMapPools,
        GnttabReleasePool,
        SchedBooted,
        SchedShutdown,
        DomctlCreate,
        DomctlDestroy,
        DomctlLinkDevice,
        DeviceTakeFd,
        DomctlPause,
        DomctlList,
        DomctlExecTarget,
        DomctlSetSched,
        DomctlSetMemory,
        SysctlDmesg,
        SysctlInfo,
        SysctlHalt,
        StoreRings,
    )
}


def parse_request(data: bytes) -> tuple[int, Op]:
    """Decode one request from a (possibly hostile) domain; raises ValueError naming the fault."""
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError("not JSON") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("id"), int):
        raise ValueError("not a request object")
    cls = OPS.get(str(msg.get("op")))
    if cls is None:
        raise ValueError(f"unknown op {str(msg.get('op'))[:40]!r}")
    try:
        return msg["id"], cls.model_validate(msg.get("args") or {}, context=RECEIVED)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{cls.op}: {problems}") from exc


def receive(sock: socket.socket, most_fds: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carried, up to ``most_fds`` (channels/linux.py)."""
    return linux.recv_fds(sock, MAX_MESSAGE, most_fds, flags)


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Hypercalls(Protocol):
    """Whatever a domain's code makes its hypercalls through: a HypercallClient, or a data-path
    worker's link to dom0 (backends/datapath_worker.py's Dom0Link), whose calls dom0 makes."""

    def call(self, op: Op) -> dict[str, Any]: ...


class _Slot:
    """A call waiting for its reply, and the descriptor the reply carried."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.fd: int | None = None

    def drop_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class HypercallClient:
    """The domain side of the hypercall socket: blocking calls, plus events for dom0.

    A reader thread matches replies to callers by id and hands events to ``on_event`` (run on
    the reader thread: keep it short, or queue the work)."""

    def __init__(
        self,
        sock: socket.socket,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._sock = sock
        self._on_event = on_event
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, _Slot] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="hypercall", daemon=True)
        self._reader.start()

    def call(self, op: Op, fd: int | None = None) -> dict[str, Any]:
        """Make the call (with ``fd`` sent along, where the op takes one); its result."""
        result, received = self._call(op, fd)
        if received is not None:
            os.close(received)  # not asked for
        return result

    def take_fd(self, op: Op) -> tuple[dict[str, Any], int]:
        """Make a call whose reply hands a descriptor on (DeviceTakeFd): the result and the
        descriptor, which the caller now owns."""
        result, received = self._call(op, None)
        if received is None:
            raise HypercallError(op.op, "EPROTO", "the reply carried no descriptor")
        return result, received

    def _call(self, op: Op, fd: int | None) -> tuple[dict[str, Any], int | None]:
        req_id = next(self._ids)
        slot = _Slot()
        with self._lock:
            if self._closed:
                raise HypervisorGone(op.op)
            self._waiting[req_id] = slot
        message = encode({"id": req_id, "op": op.op, "args": op.model_dump(mode="json")})
        try:
            if fd is None:
                self._sock.send(message)
            else:
                socket.send_fds(self._sock, [message], [fd])
        except OSError as exc:
            raise HypervisorGone(op.op) from exc
        if not slot.done.wait(self._timeout):
            with self._lock:  # the reader fills a slot under the lock
                self._waiting.pop(req_id, None)
                slot.drop_fd()  # a reply that came as we gave up
            raise HypercallError(op.op, "ETIMEDOUT", f"no reply in {self._timeout:.0f} s")
        reply = slot.reply
        if reply is None:
            raise HypervisorGone(op.op)
        if not reply.get("ok"):
            slot.drop_fd()
            raise HypercallError(op.op, reply.get("error", "EIO"), reply.get("message", ""))
        return reply.get("result") or {}, slot.fd

    def _read_loop(self) -> None:
        while True:
            try:
                data, fds = receive(self._sock, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                linux.close_fds(fds)
                break
            try:
                msg = json.loads(data)
            except ValueError:
                log.warning("hypercall: undecodable message from hyperd dropped")
                linux.close_fds(fds)
                continue
            if "event" in msg:
                linux.close_fds(fds)  # events carry none
                if self._on_event is not None:
                    try:
                        self._on_event(msg["event"], msg.get("data") or {})
                    except Exception:
                        log.exception("hypercall event handler failed on %s", msg["event"])
                continue
            with self._lock:
                slot = self._waiting.pop(msg.get("id"), None)
                if slot is not None:
                    slot.reply = msg
                    slot.fd, fds = (fds[0], fds[1:]) if fds else (None, [])
            linux.close_fds(fds)  # none asked for (the caller gave up waiting), or one too many
            if slot is not None:
                slot.done.set()
        with self._lock:
            self._closed = True
            pending, self._waiting = self._waiting, {}
        for slot in pending.values():
            slot.done.set()
        if self._on_event is not None:
            try:
                self._on_event("hypervisor_gone", {})
            except Exception:
                log.exception("hypercall event handler failed on hypervisor_gone")

    @property
    def connected(self) -> bool:
        return not self._closed

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
