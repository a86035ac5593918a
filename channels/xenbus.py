"""XenBus: the device state machine and every store path hyper uses, built here and nowhere else.

States (xenbus.h), written by each side to its own ``state`` node only::

    Unknown 0 | Initialising 1 | InitWait 2 | Initialised 3 | Connected 4 | Closing 5 | Closed 6
    Reconfiguring 7 | Reconfigured 8

A missing or unparsable ``state`` reads as Unknown, which therefore also means "the other side's
directory is gone". Errors are reported by writing ``<device dir>/error`` and moving to Closing.

Path syntax (xenstore.txt). Absolute paths start with ``/``; relative paths are relative to the
caller's home ``/local/domain/<domid>``. Allowed characters are ``[A-Za-z0-9-/_@]``; no ``//``, no
trailing ``/``; absolute paths up to 3072 bytes, relative ones up to 2048. Paths starting with
``@`` are special watch paths (``@introduceDomain``, ``@releaseDomain``), never nodes.
``validate_path`` is the one check, used by the client before sending and by the store.

Layout (xenstore-paths, §6.6 of the reference), with who owns what (owner first, then others)::

    /local/domain/<D>                              home: name, domid, vm        0 n, D r
      memory/target, memory/static-max             KiB                           read-only to D
      cpu/<n>/availability                         online | offline              read-only to D
      control/shutdown                             poweroff|halt|reboot|suspend  D n   (D rw)
      control/feature-{poweroff,reboot,suspend}    guest's "1" | "0"             D n   (D rw)
      control/sysrq, data, drivers, feature, attr, error                         D n   (D rw)
      console/{ring-ref,port,type,tty,limit}       primary console frontend
      device/<type>/<devid>/...                    frontend dir                  D n, B r
    /local/domain/<B>/backend/<type>/<D>/<devid>/  backend dir                   B n, D r
    /vm/<uuid>/{uuid,name,start_time}              toolstack only                0 n
    /tool/hyper/<D>/device/<type>/<devid>/...      the toolstack's trusted copy  0 n

The frontend dir holds ``backend`` (the backend dir's path) and ``backend-id``; the backend dir
holds ``frontend`` and ``frontend-id``; both hold their own ``state``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Container
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Literal, NamedTuple

from channels.errors import BadInput
from channels.xs_wire import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_REL_PATH_MAX,
    Perm,
    check_domid,
)

if TYPE_CHECKING:
    from channels.xs import Transaction, XsClient


class XenbusState(IntEnum):
    """enum xenbus_state, Xen's names and values."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


class Key(StrEnum):
    """Store keys shared by every device kind (protocol-specific keys live with the protocol)."""

    STATE = "state"
    BACKEND = "backend"
    BACKEND_ID = "backend-id"
    FRONTEND = "frontend"
    FRONTEND_ID = "frontend-id"
    ONLINE = "online"
    HANDLE = "handle"
    ERROR = "error"
    RING_REF = "ring-ref"
    EVENT_CHANNEL = "event-channel"
    NAME = "name"
    DOMID = "domid"
    VM = "vm"
    PORT = "port"
    TYPE = "type"
    TTY = "tty"
    LIMIT = "limit"
    HOTPLUG_STATUS = "hotplug-status"
    #: hyper's: a token a backend writes with each InitWait (channels/xenbus_bus.py)
    INSTANCE = "instance"


INTRODUCE_DOMAIN_WATCH = "@introduceDomain"
RELEASE_DOMAIN_WATCH = "@releaseDomain"
SPECIAL_WATCH_PATHS: frozenset[str] = frozenset({INTRODUCE_DOMAIN_WATCH, RELEASE_DOMAIN_WATCH})

LOCAL_PATH = "/local"
LOCAL_DOMAIN_PATH = "/local/domain"
VM_ROOT_PATH = "/vm"
TOOL_ROOT_PATH = "/tool"
TOOL_HYPER_PATH = "/tool/hyper"
# Created by the store at start-up, owned by dom0 with no access for anyone else.
STORE_SKELETON: tuple[str, ...] = ("/", LOCAL_PATH, LOCAL_DOMAIN_PATH, VM_ROOT_PATH, TOOL_ROOT_PATH)

ControlFeature = Literal["poweroff", "reboot", "suspend"]


class XsPathError(BadInput, ValueError):
    """A store path or path component breaks the syntax rules."""


# ---------------------------------------------------------------------------------------------
# Path syntax

_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")
_COMPONENT = re.compile(r"[A-Za-z0-9\-_@]+")


def validate_path(path: str) -> str:
    """Return ``path`` if it is a valid absolute or relative node path, else raise XsPathError."""
    if not isinstance(path, str) or not path:
        raise XsPathError(f"store path {path!r} is empty or not a string")
    absolute = path.startswith("/")
    limit = XENSTORE_ABS_PATH_MAX if absolute else XENSTORE_REL_PATH_MAX
    if len(path) > limit:
        raise XsPathError(f"store path {path[:64]!r}... is {len(path)} bytes, over {limit}")
    if path == "/":
        return path
    if _PATH_CHARS.fullmatch(path) is None:
        raise XsPathError(f"store path {path!r} has characters outside [A-Za-z0-9-/_@]")
    if "//" in path or path.endswith("/"):
        raise XsPathError(f"store path {path!r} has an empty component")
    if path.startswith("@"):
        raise XsPathError(f"store path {path!r} is a special watch path, not a node")
    return path


def validate_watch_path(path: str) -> str:
    """Return ``path`` if it can be watched: a node path or one of SPECIAL_WATCH_PATHS."""
    if isinstance(path, str) and path in SPECIAL_WATCH_PATHS:
        return path
    return validate_path(path)


def is_special_path(path: str) -> bool:
    return path.startswith("@")


def resolve_path(path: str, domid: int) -> str:
    """Validate ``path`` and make it absolute, relative paths being under ``domid``'s home."""
    validate_path(path)
    if path.startswith("/"):
        return path
    return f"{domain_path(domid)}/{path}"


def check_component(name: str) -> str:
    """Return ``name`` if it is one valid path component (no ``/``), else raise XsPathError."""
    if not isinstance(name, str) or _COMPONENT.fullmatch(name) is None:
        raise XsPathError(f"store path component {name!r} is not [A-Za-z0-9-_@]+")
    return name


def join_path(base: str, *parts: str) -> str:
    """``base`` joined with relative ``parts`` (each may hold several components), validated."""
    for part in parts:
        if part.startswith("/"):
            raise XsPathError(f"cannot join absolute {part!r} under {base!r}")
    path = "/".join((base.rstrip("/"), *parts)) if parts else base
    return validate_path(path if path else "/")


def parent_path(path: str) -> str:
    """The parent of an absolute path; ``/`` has none."""
    if path == "/":
        raise XsPathError("the root node has no parent")
    head, _, _ = path.rpartition("/")
    return head or "/"


def basename(path: str) -> str:
    return path.rpartition("/")[2]


def is_subpath(path: str, base: str) -> bool:
    """True if ``path`` is ``base`` or lies below it (absolute paths)."""
    return path == base or base == "/" or path.startswith(base + "/")


def _num(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise XsPathError(f"{what} {value!r} is not a non-negative int")
    return str(value)


def _dom(domid: int) -> str:
    try:
        return str(check_domid(domid))
    except ValueError as exc:
        raise XsPathError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Domain home and its keys


def domain_path(domid: int) -> str:
    """``/local/domain/<domid>``: the home GET_DOMAIN_PATH returns."""
    return f"{LOCAL_DOMAIN_PATH}/{_dom(domid)}"


def domain_key_path(domid: int, key: str) -> str:
    """``/local/domain/<domid>/<key>`` (``key`` may have several components)."""
    return join_path(domain_path(domid), key)


def domain_name_path(domid: int) -> str:
    return domain_key_path(domid, Key.NAME)


def domain_domid_path(domid: int) -> str:
    return domain_key_path(domid, Key.DOMID)


def domain_vm_path(domid: int) -> str:
    """``~/vm``, whose value is the domain's ``/vm/<uuid>`` path."""
    return domain_key_path(domid, Key.VM)


def control_path(domid: int) -> str:
    return domain_key_path(domid, "control")


def control_shutdown_path(domid: int) -> str:
    """Toolstack writes poweroff/halt/reboot/suspend here; the guest acks with ``""``."""
    return domain_key_path(domid, "control/shutdown")


def control_sysrq_path(domid: int) -> str:
    return domain_key_path(domid, "control/sysrq")


def control_feature_path(domid: int, feature: ControlFeature) -> str:
    """``~/control/feature-<feature>``: the guest writes "1" if it will respond."""
    if feature not in ("poweroff", "reboot", "suspend"):
        raise XsPathError(f"unknown control feature {feature!r}")
    return domain_key_path(domid, f"control/feature-{feature}")


def memory_target_path(domid: int) -> str:
    return domain_key_path(domid, "memory/target")


def memory_static_max_path(domid: int) -> str:
    return domain_key_path(domid, "memory/static-max")


def cpu_path(domid: int) -> str:
    return domain_key_path(domid, "cpu")


def cpu_availability_path(domid: int, vcpu: int) -> str:
    return domain_key_path(domid, f"cpu/{_num(vcpu, 'vcpu')}/availability")


def domain_error_path(domid: int) -> str:
    return domain_key_path(domid, Key.ERROR)


def guest_writable_paths(domid: int) -> tuple[str, ...]:
    """The nodes of a home that the guest may write (libxl creates them owned by the guest)."""
    return (
        control_shutdown_path(domid),
        control_sysrq_path(domid),
        *(control_feature_path(domid, f) for f in ("poweroff", "reboot", "suspend")),
        *(domain_key_path(domid, k) for k in ("data", "drivers", "feature", "attr", "error")),
    )


# ---------------------------------------------------------------------------------------------
# Devices: frontend dirs in the guest's home, backend dirs in the backend domain's home


def device_type_path(domid: int, devtype: str) -> str:
    """``/local/domain/<domid>/device/<type>``."""
    return domain_key_path(domid, f"device/{check_component(devtype)}")


def frontend_path(domid: int, devtype: str, devid: int) -> str:
    """``/local/domain/<domid>/device/<type>/<devid>``: the frontend dir."""
    return f"{device_type_path(domid, devtype)}/{_num(devid, 'devid')}"


def device_name(devtype: str, devid: int) -> str:
    """``<type>/<devid>``: the device as both ends name it beyond the store (the grant pools
    a frontend sets up name their device so: channels/hypercall.py), its frontend dir's path
    below ``device/``."""
    return f"{check_component(devtype)}/{_num(devid, 'devid')}"


def backend_root_path(backend_domid: int) -> str:
    return domain_key_path(backend_domid, "backend")


def backend_type_path(backend_domid: int, devtype: str) -> str:
    """``/local/domain/<backend>/backend/<type>``: what a backend driver watches."""
    return f"{backend_root_path(backend_domid)}/{check_component(devtype)}"


def backend_domain_path(backend_domid: int, devtype: str, domid: int) -> str:
    return f"{backend_type_path(backend_domid, devtype)}/{_dom(domid)}"


def backend_path(backend_domid: int, devtype: str, domid: int, devid: int) -> str:
    """``/local/domain/<backend>/backend/<type>/<domid>/<devid>``: the backend dir."""
    return f"{backend_domain_path(backend_domid, devtype, domid)}/{_num(devid, 'devid')}"


def key_path(dev_path: str, key: str) -> str:
    """A key under a device dir, e.g. ``key_path(fe, Key.RING_REF)``."""
    return join_path(dev_path, key)


def state_path(dev_path: str) -> str:
    return key_path(dev_path, Key.STATE)


def error_path(dev_path: str) -> str:
    """``<dev_path>/error``: where xenbus_dev_fatal reports what failed."""
    return key_path(dev_path, Key.ERROR)


class DevicePath(NamedTuple):
    """A path parsed as lying in a device dir: which device, and the key path below its dir."""

    backend_domid: int | None  # None for a frontend path
    devtype: str
    domid: int  # the frontend (guest) domain
    devid: int
    dir: str
    rest: str  # "" for the dir itself, else e.g. "state" or "queue-0/tx-ring-ref"


_BACKEND_RE = re.compile(
    r"/local/domain/(\d{1,5})/backend/([A-Za-z0-9\-_@]+)/(\d{1,5})/(\d{1,10})(?:/(.+))?"
)
_FRONTEND_RE = re.compile(r"/local/domain/(\d{1,5})/device/([A-Za-z0-9\-_@]+)/(\d{1,10})(?:/(.+))?")


def parse_backend_path(path: str) -> DevicePath | None:
    """Parse a path at or below a backend dir; None if it is not one."""
    m = _BACKEND_RE.fullmatch(path)
    if m is None:
        return None
    backend, devtype, domid, devid, rest = m.groups()
    directory = path[: m.end(4)]
    return DevicePath(int(backend), devtype, int(domid), int(devid), directory, rest or "")


def parse_frontend_path(path: str) -> DevicePath | None:
    """Parse a path at or below a frontend dir; None if it is not one."""
    m = _FRONTEND_RE.fullmatch(path)
    if m is None:
        return None
    domid, devtype, devid, rest = m.groups()
    directory = path[: m.end(3)]
    return DevicePath(None, devtype, int(domid), int(devid), directory, rest or "")


# ---------------------------------------------------------------------------------------------
# Console, /vm and the toolstack's private copy


def console_path(domid: int) -> str:
    """``~/console``: the primary console frontend (ring-ref, port, type, tty, limit)."""
    return domain_key_path(domid, "console")


def console_ring_ref_path(domid: int) -> str:
    return key_path(console_path(domid), Key.RING_REF)


def console_port_path(domid: int) -> str:
    return key_path(console_path(domid), Key.PORT)


def console_type_path(domid: int) -> str:
    return key_path(console_path(domid), Key.TYPE)


def console_tty_path(domid: int) -> str:
    return key_path(console_path(domid), Key.TTY)


def console_backend_path(backend_domid: int, domid: int) -> str:
    return backend_path(backend_domid, "console", domid, 0)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def vm_path(uuid: str) -> str:
    """``/vm/<uuid>``: toolstack-only domain record."""
    if not isinstance(uuid, str) or _UUID.fullmatch(uuid) is None:
        raise XsPathError(f"{uuid!r} is not a UUID")
    return f"{VM_ROOT_PATH}/{uuid.lower()}"


def tool_path(domid: int) -> str:
    """``/tool/hyper/<domid>``: the toolstack's private, trusted copy (libxl's /libxl/<domid>)."""
    return f"{TOOL_HYPER_PATH}/{_dom(domid)}"


def tool_device_path(domid: int, devtype: str, devid: int) -> str:
    return f"{tool_path(domid)}/device/{check_component(devtype)}/{_num(devid, 'devid')}"


# ---------------------------------------------------------------------------------------------
# Permission lists of §6.6 (owner first)


def home_perms(domid: int) -> list[Perm]:
    """Home and read-only keys: owned by dom0, readable by the guest."""
    return [Perm(0, "n"), Perm(domid, "r")]


def guest_rw_perms(domid: int) -> list[Perm]:
    """Guest-writable keys: owned by the guest, invisible to other domUs."""
    return [Perm(domid, "n")]


def frontend_perms(domid: int, backend_domid: int) -> list[Perm]:
    return [Perm(domid, "n"), Perm(backend_domid, "r")]


def backend_perms(backend_domid: int, domid: int) -> list[Perm]:
    return [Perm(backend_domid, "n"), Perm(domid, "r")]


def toolstack_perms() -> list[Perm]:
    return [Perm(0, "n")]


# ---------------------------------------------------------------------------------------------
# State helpers over a client


def parse_state(value: str | None) -> XenbusState:
    """A ``state`` value as read; absent or garbage reads as Unknown (as Linux does)."""
    if value is None:
        return XenbusState.Unknown
    text = value.strip()
    if not text.isdecimal() or not text.isascii() or len(text) > 3:
        return XenbusState.Unknown
    try:
        return XenbusState(int(text))
    except ValueError:
        return XenbusState.Unknown


def read_state(client: XsClient, path: str, tx: Transaction | None = None) -> XenbusState:
    """Read a ``state`` node (the node path, not the device dir)."""
    return parse_state(client.read_optional(path, tx=tx))


def switch_state(client: XsClient, dev_path: str, state: XenbusState) -> None:
    """Write this side's state; only ever our own ``<dev_path>/state``."""
    client.write(state_path(dev_path), str(int(state)))


def wait_for_state(
    client: XsClient, path: str, wanted: Container[XenbusState], timeout: float
) -> XenbusState:
    """Watch the state node ``path`` until its value is in ``wanted``; return that state.

    Raises the client's XsTimeoutError when ``timeout`` seconds pass first. Watch events are
    only hints: the node is re-read after each one.
    """
    deadline = time.monotonic() + timeout
    with client.watch(path) as watch:
        while True:
            state = read_state(client, path)
            if state in wanted:
                return state
            watch.get(timeout=max(0.0, deadline - time.monotonic()))
