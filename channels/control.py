"""The toolstack control protocol between `hyperctl` and dom0, over a root-only Unix socket.

Each request is a model below, whose docstring says when dom0 allows it (as each hypercall's
does in channels/hypercall.py). One request per connection, as a JSON line; one reply line:

    -> {"method": "destroy", "params": {"domain": "web"}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "kind": "not_found", "error": "no domain named 'web'", "lines": [...]}

``kind`` is the error's meaning in channels/errors.py, raised again as that class on the
client's side; ``lines`` carries one line per problem (a config error names the file and the
field). Streaming requests (``Console``, ``StoreWatch``) keep the connection open after an
``ok`` reply: the console carries raw terminal bytes both ways, a store watch sends one JSON
line per event.

Requests are frozen dataclasses, not pydantic models, on purpose: ``hyperctl`` builds and sends
them without importing pydantic (about 100 ms of a command's start-up, half of what `hyperctl
create` may take). dom0 validates each one it receives with pydantic (``decode_request``),
constraints included, and dom0's control server (dom0/control.py) dispatches each typed, checked
request through a table to the toolstack. ``Create`` and ``DeviceAttach`` carry the user's
config document or spec as written: the toolstack parses it once, with the host checks, into the
typed config (channels/config.py) that goes on to hyperd.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from annotated_types import Ge, Gt, Le

from channels.errors import BadInput, Closed, HyperError, error_of_kind
from channels.kinds import BY_TYPE

if TYPE_CHECKING:
    from pydantic import TypeAdapter

MAX_LINE = 1 << 20
UID_MAX = (1 << 32) - 2

#: A domain as the user names it: its name, or its domid written out.
DomainArg = str
Uid = Annotated[int, Ge(0), Le(UID_MAX)]


# Every request spells its decorator out: a type checker knows a class is a dataclass (its
# fields, its __init__) only from ``dataclass`` itself, not from a name bound to its result.
@dataclass(frozen=True, kw_only=True)
class Request:
    """Base of every toolstack request; ``method`` is its name on the wire."""

    method: ClassVar[str]
    #: The reply opens a stream instead of carrying a result.
    streaming: ClassVar[bool] = False
    #: dom0 refuses a request with a key its model does not have.
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}


# -- domains ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Create(Request):
    """Always allowed. Builds the domain the config document ``text`` describes (relative
    image paths against ``base_dir``; ``source`` names the file in error lines) and returns once
    its workload runs and its devices are connected (or at once, without ``wait``). Its disk
    images are checked for ``owner``, the uid of the user who asked: their images are accepted
    besides root's. A failure after hyperd built the domain rolls it back."""

    method = "create"
    text: str
    source: str = "<config>"
    base_dir: str = "."
    owner: Uid = 0
    wait: bool = True


@dataclass(frozen=True, kw_only=True)
class List(Request):
    """Always allowed: every domain, dom0 included."""

    method = "list"


@dataclass(frozen=True, kw_only=True)
class Destroy(Request):
    """Allowed on any domU: kills it now and releases everything it holds; answered once
    dom0's backends have released its devices (or dom0's DEVICE_TIMEOUT has passed)."""

    method = "destroy"
    domain: DomainArg


@dataclass(frozen=True, kw_only=True)
class Shutdown(Request):
    """Allowed on a running domU: asks it to power off; destroyed after ``grace`` seconds if
    it has not. ``wait`` returns only once it is gone."""

    method = "shutdown"
    domain: DomainArg
    wait: bool = False
    grace: Annotated[float, Gt(0)] = 30.0


@dataclass(frozen=True, kw_only=True)
class Reboot(Request):
    """Allowed on a running domU: asks it to reboot; its ``on_reboot`` decides what follows."""

    method = "reboot"
    domain: DomainArg


@dataclass(frozen=True, kw_only=True)
class Pause(Request):
    """Allowed on a running domU: freezes it."""

    method = "pause"
    domain: DomainArg


@dataclass(frozen=True, kw_only=True)
class Unpause(Request):
    """Allowed on a paused domU: thaws it."""

    method = "unpause"
    domain: DomainArg


@dataclass(frozen=True, kw_only=True)
class ExecTarget(Request):
    """Allowed on a running domU: the process whose namespaces and cgroup `hyperctl exec`
    enters."""

    method = "exec_target"
    domain: DomainArg


@dataclass(frozen=True, kw_only=True)
class SchedCredit(Request):
    """Allowed on any domU: shows its weight and cap, and sets those given."""

    method = "sched_credit"
    domain: DomainArg
    cpu_weight: Annotated[int, Ge(1), Le(65535)] | None = None
    cap: Annotated[int, Ge(0)] | None = None


@dataclass(frozen=True, kw_only=True)
class MemSet(Request):
    """Allowed on any domU: a new memory limit (a bare number is MiB, or a size such as
    ``256M``); refused when the domain already uses more."""

    method = "mem_set"
    domain: DomainArg
    memory: str


@dataclass(frozen=True, kw_only=True)
class Info(Request):
    """Always allowed: host and hypervisor facts."""

    method = "info"


@dataclass(frozen=True, kw_only=True)
class Dmesg(Request):
    """Always allowed: the hypervisor's log, cleared afterwards with ``clear``."""

    method = "dmesg"
    clear: bool = False


@dataclass(frozen=True, kw_only=True)
class Halt(Request):
    """Always allowed: destroys every domU, then stops dom0 and hyperd."""

    method = "halt"


@dataclass(frozen=True, kw_only=True)
class Console(Request):
    """Allowed on any domU: streams its console both ways, starting with recent output."""

    method = "console"
    streaming = True
    domain: DomainArg


# -- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StoreLs(Request):
    """Always allowed: every node under ``path`` with its value."""

    method = "store_ls"
    path: str


@dataclass(frozen=True, kw_only=True)
class StoreRead(Request):
    """Always allowed: one node's value."""

    method = "store_read"
    path: str


@dataclass(frozen=True, kw_only=True)
class StoreWrite(Request):
    """Always allowed, with dom0's privileges: writes one node."""

    method = "store_write"
    path: str
    value: str


@dataclass(frozen=True, kw_only=True)
class StoreRm(Request):
    """Always allowed, with dom0's privileges: removes a node and everything under it."""

    method = "store_rm"
    path: str


@dataclass(frozen=True, kw_only=True)
class StoreWatch(Request):
    """Always allowed: streams one JSON line per change under ``path`` until the client hangs
    up."""

    method = "store_watch"
    streaming = True
    path: str


# -- devices ------------------------------------------------------------------------------------


#: A device kind by its XenBus type, one of channels/kinds.py's.
DeviceKindName = str


@dataclass(frozen=True, kw_only=True)
class DeviceRequest(Request):
    """A request about one kind of device."""

    kind: DeviceKindName

    def __post_init__(self) -> None:
        if self.kind not in BY_TYPE:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(BY_TYPE)}")


@dataclass(frozen=True, kw_only=True)
class DeviceAttach(DeviceRequest):
    """Allowed on a running domU: adds one device of ``kind`` from an xl-style ``spec``
    (relative image paths against ``base_dir``, images checked for ``owner`` as in Create) and
    returns once it is connected."""

    method = "device_attach"
    domain: DomainArg
    spec: str
    base_dir: str = "."
    owner: Uid = 0


@dataclass(frozen=True, kw_only=True)
class DeviceDetach(DeviceRequest):
    """Allowed on any domU: closes the device through XenBus and removes it and what backs it.
    ``device`` is a vif's devid or a disk's vdev."""

    method = "device_detach"
    domain: DomainArg
    device: str


@dataclass(frozen=True, kw_only=True)
class DeviceList(DeviceRequest):
    """Allowed on any domU: its devices of ``kind`` with their state and counters."""

    method = "device_list"
    domain: DomainArg


@dataclass(frozen=True, kw_only=True)
class DeviceStats(DeviceRequest):
    """Always allowed: every device of ``kind``'s counters, by domid (for `hyperctl top`)."""

    method = "device_stats"


@dataclass(frozen=True, kw_only=True)
class FaultSet(Request):
    """Allowed on a running domU: inject the faults of ``spec`` (channels/faults.py) into the
    frames of its vif ``device`` (``vif<N>``) or the requests of its disk ``device`` (a vdev)
    from the next on; an empty ``spec`` clears them."""

    method = "fault_set"
    domain: DomainArg
    device: str
    spec: str


@dataclass(frozen=True, kw_only=True)
class FaultList(Request):
    """Allowed on any domU: each of its vifs' and disks' faults, and how many each injected."""

    method = "fault_list"
    domain: DomainArg


@dataclass(frozen=True, kw_only=True)
class Capture(Request):
    """Allowed on a running domU: streams the frames crossing its vif ``device`` (``vif<N>``),
    both ways, as a pcap file (dom0/capture.py), after the reply line; it ends after ``count``
    frames or ``duration`` seconds (0: no limit), or when the client hangs up."""

    method = "capture"
    streaming = True
    domain: DomainArg
    device: str
    count: Annotated[int, Ge(0)] = 0
    duration: Annotated[float, Ge(0)] = 0.0


@dataclass(frozen=True, kw_only=True)
class Trace(Request):
    """Allowed on a running domU whose disk ``device`` (a vdev) dom0 serves: streams one JSON
    line per blkif request and response as blkback handles them (dom0/control.py), after the
    reply line; it ends after ``count`` responses or ``duration`` seconds (0: no limit), or when
    the client hangs up."""

    method = "trace"
    streaming = True
    domain: DomainArg
    device: str
    count: Annotated[int, Ge(0)] = 0
    duration: Annotated[float, Ge(0)] = 0.0


#: Every request, by its name on the wire.
REQUESTS: dict[str, type[Request]] = {
    cls.method: cls
    for cls in (
        Create,
        List,
        Destroy,
        Shutdown,
        Reboot,
        Pause,
        Unpause,
        ExecTarget,
        SchedCredit,
        MemSet,
        Info,
        Dmesg,
        Halt,
        Console,
        StoreLs,
        StoreRead,
        StoreWrite,
        StoreRm,
        StoreWatch,
        DeviceAttach,
        DeviceDetach,
        DeviceList,
        DeviceStats,
        FaultSet,
        FaultList,
        Capture,
        Trace,
    )
}


def decode_request(line: bytes) -> Request:
    """One request line, validated into its model; BadInput naming each problem."""
    from pydantic import ValidationError  # dom0's side only: hyperctl never pays for pydantic

    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadInput("bad request: not JSON") from exc
    if not isinstance(message, dict) or not isinstance(message.get("params", {}), dict):
        raise BadInput("bad request: not a request object")
    cls = REQUESTS.get(str(message.get("method")))
    if cls is None:
        raise BadInput(f"unknown method {str(message.get('method'))[:40]!r}")
    try:
        decoded = _adapter(cls).validate_python(message.get("params") or {})
    except ValidationError as exc:
        lines = [
            f"{cls.method}: {'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
            for e in exc.errors()
        ]
        raise BadInput(f"bad {cls.method} request", lines) from exc
    return decoded


#: Each request class's pydantic adapter, made the first time dom0 decodes one.
_ADAPTERS: dict[type[Request], TypeAdapter[Request]] = {}


def _adapter(cls: type[Request]) -> TypeAdapter[Request]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        from pydantic import TypeAdapter

        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def encode_request(request: Request) -> bytes:
    params = dataclasses.asdict(request)
    return json.dumps({"method": request.method, "params": params}).encode() + b"\n"


def error_reply(exc: HyperError) -> dict[str, Any]:
    return {"ok": False, "kind": exc.kind, "error": exc.summary, "lines": exc.lines}


class NotRunning(Closed):
    """No toolstack answers on the socket: the hypervisor is not running."""


def read_line(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """One line from ``sock`` (without the newline); None at end of stream."""
    while b"\n" not in buffer:
        if len(buffer) > MAX_LINE:
            raise BadInput("message too large")
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


class Connection:
    """The client side: one request, then the reply or a stream."""

    def __init__(self, path: Path, timeout: float | None = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = bytearray()
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NotRunning("the hypervisor is not running (no toolstack socket)") from exc

    def request(self, request: Request) -> Any:
        """Send ``request``; its result, or the error it met raised as its kind."""
        self.sock.sendall(encode_request(request))
        line = read_line(self.sock, self.buffer)
        if line is None:
            raise Closed(f"{request.method}: the toolstack closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise error_of_kind(
                str(reply.get("kind", "failed")),
                str(reply.get("error", "failed")),
                reply.get("lines"),
            )
        return reply.get("result")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(socket_path: Path, request: Request, timeout: float | None = 120.0) -> Any:
    with Connection(socket_path, timeout) as conn:
        return conn.request(request)
