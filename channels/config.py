"""Domain configuration: the YAML file a domain is created from, shaped like xl.cfg.

A config is one YAML mapping. Keys follow xl.cfg(5) where xl has one; ``command`` and ``env``
are what a process domain needs instead of a kernel. Unknown keys are errors, at every level.

=============== ======================================================================
key             meaning (default)
=============== ======================================================================
``name``        mandatory; 1-64 of ``[A-Za-z0-9_.-]``, not starting with ``-``, not all
                digits (that reads as a domid), not ``Domain-0`` or ``dom0``
``memory``      MiB, at least 32 (128, as xl); the domain's cgroup memory limit
``vcpus``       at least 1 (1)
``cpu_weight``  credit scheduler weight, 1..65535 (256)
``cap``         % of one CPU, 0..100*vcpus; 0 means no cap (0)
``command``     argv of the workload, a non-empty list of strings; absent means the
                domain idles, waiting for ``hyperctl exec`` or ``console`` (absent)
``env``         mapping of environment variable names to strings ({})
``on_poweroff`` ``destroy``, ``restart`` or ``preserve`` (destroy)
``on_reboot``   same choices (restart)
``on_crash``    same choices (destroy)
``vif``         list of network interfaces, see :class:`VifConfig` ([])
``disk``        list of virtual block devices, see :class:`DiskConfig` ([])
``p9``          list of shared host directories, see :class:`P9Config` ([])
``backends``    device kinds this domain serves to other domains as a driver domain:
                ``vif``, ``vbd`` or both ([]); a guest's ``backend:`` may then name it
``nics``        host interfaces a vif driver domain holds, see :class:`NicConfig` ([])
=============== ======================================================================

A ``vif``, ``disk`` or ``p9`` entry is either a mapping or, as in xl, a spec string of
comma-separated ``key=value`` pairs (``'bridge=hyperbr0,ip=10.0.0.2/24'``; ``''`` means all
defaults). Values in spec strings cannot contain commas; use the mapping form for such paths.

Normalised form (``hyperctl create --dry-run``): :meth:`DomainConfig.normalised_json`, JSON
with every key present in a fixed order, defaults filled in, sizes in bytes, rates as
``{"bytes_per_second", "window_us"}``, disk targets as absolute paths, backends as a domid
or a domain name. A vif without ``mac`` keeps ``null``: the toolstack picks a random
address in Xen's OUI (:func:`random_mac`) at create time, so the normalised form is stable.
The normalised JSON is itself a valid config and normalises to itself.

Loading touches the file system only to read: a disk image that exists must be a regular
file of at least one sector; one that does not exist needs a ``size`` so the toolstack can
create it. Nothing is created here. Either way the image's path must be one no other user can
redirect or change (channels/images.py): no symlink on it, and the image and its directories
root's or the *owner*'s, the user the disk is for (the validation context's ``owner``; by
default whoever runs this).

Errors: :class:`ConfigError` carries one line per problem, ``<file>: <field.path>: <reason>``,
e.g. ``configs/web.yaml: vif.0.mtu: Input should be less than or equal to 65535``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
import secrets
import types
import typing
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from channels import images
from channels.errors import BadInput

logger = logging.getLogger(__name__)

SECTOR_SIZE = 512
DOM0_DOMID = 0
DOM0_NAME = "Domain-0"
DOM0_NAMES = frozenset({DOM0_NAME, "dom0"})
DEFAULT_BRIDGE = "hyperbr0"
DEFAULT_MEMORY_MIB = 128
MIN_MEMORY_MIB = 32
DEFAULT_MTU = 1500
DEFAULT_RATE_WINDOW_US = 50_000  # xl's default credit replenish interval, 50 ms
XEN_OUI = (0x00, 0x16, 0x3E)

_NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_VDEV_RE = re.compile(r"xvd[a-z]{1,3}")
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# xl's rate grammar (xlu_vif_parse_rate): decimal prefixes, b = bits, B = bytes.
_RATE_RE = re.compile(r"(\d+)([GMK]?)([Bb])/s(?:@(\d+)([mu]?s))?")
_RATE_PREFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_WINDOW_UNIT_US = {"s": 10**6, "ms": 10**3, "us": 1}


#: The validation context for a config that crossed a process boundary or was read back from
#: disk: its shape is checked, the host (its disk images) is not; whoever sent it checked that.
RECEIVED: dict[str, Any] = {"check_host": False}


class ConfigError(BadInput):
    """A config that cannot be used; ``lines`` holds one ``<file>: <path>: <reason>`` each."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines), lines)
        self.args = (list(lines),)  # so that the error pickles as ConfigError(lines)

    def __str__(self) -> str:
        return "\n".join(self.lines)


class Action(StrEnum):
    """What the toolstack does when a domain powers off, reboots or crashes (xl.cfg)."""

    DESTROY = "destroy"
    RESTART = "restart"
    PRESERVE = "preserve"


class Access(StrEnum):
    """Disk access mode; xl's ``w``/``r`` spellings are accepted on input."""

    RW = "rw"
    RO = "ro"


# ----------------------------------------------------------------------------- field types


def _located(field: str, reason: str) -> PydanticCustomError:
    """An error whose path continues below the validator's own location by ``field``."""
    return PydanticCustomError("hyper_config", "{reason}", {"reason": reason, "field": field})


def _not_bool(value: Any) -> Any:
    # pydantic's lax int accepts True as 1; a YAML `yes` is never a count.
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    return value


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a domain name: 1-64 of A-Z a-z 0-9 _ . -, not starting with '-'"
        )
    if name in DOM0_NAMES:
        raise ValueError(f"{name!r} is reserved for dom0")
    if name.isdigit():
        raise ValueError(f"{name!r} is all digits, which reads as a domid")
    if name in {".", ".."}:
        raise ValueError(f"{name!r} is not a domain name")
    return name


def _domain_ref(value: Any) -> int | str:
    """A backend domain: a domid, or a domain name; dom0's names mean domid 0."""
    if isinstance(value, bool):
        raise ValueError("expected a domain name or domid, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"domid {value} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a domain name or domid")
    if value.isdigit():
        return int(value)
    if value in DOM0_NAMES:
        return DOM0_DOMID
    return _check_name(value)


def _mac(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 10:20:30:40:50:00 as a base-60 integer.
        raise ValueError("got a number; quote the MAC address in YAML")
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value.lower()):
        raise ValueError(f"{value!r} is not a MAC address like 00:16:3e:12:34:56")
    mac = value.lower()
    first = int(mac[:2], 16)
    if first & 1:
        raise ValueError(f"{mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise ValueError("00:00:00:00:00:00 is not a usable address")
    return mac


def _ifname(value: str) -> str:
    # Linux dev_valid_name(): shorter than IFNAMSIZ, no '/', ':' or whitespace.
    if not value or len(value) > 15 or value in {".", ".."}:
        raise ValueError(f"{value!r} is not an interface name (1-15 characters)")
    if any(c in "/:" or c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an interface name (no '/', ':' or spaces)")
    return value


def _ip_interface(value: Any) -> Any:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{value!r} is not an address with a prefix length, e.g. 10.0.0.2/24")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an address with a prefix length: {exc}") from exc
    net = iface.network
    if net.num_addresses > 2 and iface.ip in {net.network_address, net.broadcast_address}:
        raise ValueError(f"{iface} is the network's own or broadcast address")
    return iface


def _ip_address(value: Any) -> Any:
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``512M``, ``4G``, ``64MiB`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512M or 4G, got a boolean")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size like 512M, 4G or a number of bytes")
    return int(match[1]) * _SIZE_UNITS[match[2].upper()]


def _env_value(value: Any) -> Any:
    # An unquoted port number is a YAML int; anything else must be quoted.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _no_nul(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _env_name(name: str) -> str:
    if not _ENV_NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


def _env_text(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _access(value: Any) -> Any:
    return {"w": "rw", "r": "ro"}.get(value, value) if isinstance(value, str) else value


Int = Annotated[int, BeforeValidator(_not_bool)]
DomainName = Annotated[str, AfterValidator(_check_name)]
DomainRef = Annotated[int | str, BeforeValidator(_domain_ref)]
#: The device kinds (XenBus types) a driver domain can serve so far.
ServedKind = Literal["vif", "vbd"]
MacAddress = Annotated[str, BeforeValidator(_mac)]
IfName = Annotated[str, AfterValidator(_ifname)]
IPInterface = Annotated[
    ipaddress.IPv4Interface | ipaddress.IPv6Interface, BeforeValidator(_ip_interface)
]
IPAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, BeforeValidator(_ip_address)]
ByteSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0, multiple_of=SECTOR_SIZE)]
Arg = Annotated[str, AfterValidator(_no_nul)]
EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str, BeforeValidator(_env_value), AfterValidator(_env_text)]


def _split_spec(spec: str) -> dict[str, str]:
    """xl's device spec: comma-separated key=value pairs; empty items are ignored."""
    pairs: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        if key in pairs:
            raise ValueError(f"{key} is given twice")
        pairs[key] = value.strip()
    return pairs


def _entry(data: Any, example: str) -> Any:
    """A vif or disk entry: a mapping, or an xl spec string turned into one."""
    if isinstance(data, str):
        return _split_spec(data)
    if isinstance(data, dict | BaseModel):
        return data
    raise ValueError(f"expected a mapping or a spec string like {example!r}")


# ----------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rate(_Model):
    """A vif's credit-based rate limit: ``bytes_per_second``, replenished every ``window_us``.

    Input is xl's ``10Mb/s``, ``250KB/s`` or ``1MB/s@20ms`` (K/M/G are decimal, ``b`` is bits,
    ``B`` bytes; the window defaults to 50 ms), or the normalised mapping.
    """

    bytes_per_second: Int = Field(gt=0)
    window_us: Int = Field(default=DEFAULT_RATE_WINDOW_US, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        match = _RATE_RE.fullmatch(data.strip())
        if match is None:
            raise ValueError(f"{data!r} is not a rate like 10Mb/s, 250KB/s or 1MB/s@20ms")
        number, prefix, unit, window, window_unit = match.groups()
        per_second = int(number) * _RATE_PREFIX[prefix]
        if unit == "b":
            per_second //= 8
        if window is None:
            return {"bytes_per_second": per_second}
        return {
            "bytes_per_second": per_second,
            "window_us": int(window) * _WINDOW_UNIT_US[window_unit],
        }

    @model_validator(mode="after")
    def _credit(self) -> Rate:
        if self.bytes_per_window < 1:
            raise ValueError("the rate gives less than one byte per window")
        return self

    @property
    def bytes_per_window(self) -> int:
        """The credit netback grants per window (xl's rate_bytes_per_interval)."""
        return self.bytes_per_second * self.window_us // 1_000_000


def _fault_spec(value: str | None, kind: str) -> str | None:
    """A device's ``faults`` key, canonical (channels/faults.py); ValueError naming the key."""
    if value is None:
        return None
    from channels.faults import parse_block, parse_net

    try:
        return str((parse_net if kind == "net" else parse_block)(value, "")) or None
    except BadInput as exc:
        raise ValueError("; ".join(exc.lines)) from None


class VifConfig(_Model):
    """A network interface: a TAP ``vif<domid>.<devid>`` on ``bridge``, eth<devid> inside."""

    mac: MacAddress | None = None
    bridge: IfName = DEFAULT_BRIDGE
    ip: IPInterface | None = None
    gateway: IPAddress | None = None
    mtu: Int = Field(default=DEFAULT_MTU, ge=68, le=65535)
    rate: Rate | None = None
    backend: DomainRef = DOM0_DOMID
    #: Faults netback injects into its frames (channels/faults.py), kept canonical.
    faults: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, data: Any) -> Any:
        return _entry(data, "bridge=hyperbr0,ip=10.0.0.2/24")

    @field_validator("faults")
    @classmethod
    def _faults(cls, value: str | None) -> str | None:
        return _fault_spec(value, "net")

    @model_validator(mode="after")
    def _addresses(self) -> VifConfig:
        if self.ip is not None and self.ip.version == 6 and self.mtu < 1280:
            raise _located("mtu", "IPv6 needs an mtu of at least 1280")
        if self.gateway is None:
            return self
        if self.ip is None:
            raise _located("gateway", "a gateway needs an ip")
        if self.gateway.version != self.ip.version or self.gateway not in self.ip.network:
            raise _located("gateway", f"{self.gateway} is outside {self.ip.network}")
        if self.gateway == self.ip.ip:
            raise _located("gateway", f"{self.gateway} is the vif's own address")
        return self


class NicConfig(_Model):
    """A host interface a driver domain holds while it runs (Xen assigns a PCI device so): it
    moves into the domain's network namespace and joins ``bridge`` there, the bridge its guests'
    vifs name; it is given back to the host when the domain stops (as a crash leaves it, the
    kernel's own way: a physical interface returns, a veth goes with the namespace). A plain
    string is its name, on the default bridge."""

    name: IfName
    bridge: IfName = DEFAULT_BRIDGE

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _not_its_own_bridge(self) -> NicConfig:
        if self.name == self.bridge:
            raise _located("bridge", f"{self.name} cannot be its own bridge")
        return self


class DiskConfig(_Model):
    """A virtual block device ``vdev`` backed by the image file ``target``.

    ``size`` is used only to create a missing image; an existing image is used as it is.
    A relative ``target`` resolves against ``base_dir`` in the validation context.
    """

    target: Path
    size: ByteSize | None = None
    vdev: str
    access: Annotated[Access, BeforeValidator(_access)] = Access.RW
    backend: DomainRef = DOM0_DOMID
    #: Faults blkback injects into its requests (channels/faults.py), kept canonical.
    faults: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, data: Any) -> Any:
        return _entry(data, "target=disk.img,size=64M,vdev=xvdb")

    @field_validator("faults")
    @classmethod
    def _faults(cls, value: str | None) -> str | None:
        return _fault_spec(value, "block")

    @field_validator("target", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str | Path):
            raise ValueError("expected a file path")
        if not str(value) or "\0" in str(value):
            raise ValueError("expected a file path")
        base = (info.context or {}).get("base_dir", ".")
        # abspath, not resolve(): keep the user's folder names, follow no symlink.
        return Path(os.path.abspath(Path(base, value)))

    @field_validator("vdev")
    @classmethod
    def _vdev(cls, value: str) -> str:
        if not _VDEV_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a vdev like xvda, xvdb, ... xvdzzz")
        return value

    @model_validator(mode="after")
    def _image(self, info: ValidationInfo) -> DiskConfig:
        if (info.context or {}).get("check_host", True) is False:
            return self  # checked by whoever sent it; a config read back is not checked again
        reason = _image_problem(self.target, self.size, _owner(info))
        if reason is not None:
            raise _located("target", reason)
        return self

    @property
    def virtual_device(self) -> int:
        """The blkif ``virtual-device`` number for ``vdev`` (xen-vbd-interface(7))."""
        index = 0
        for letter in self.vdev[3:]:
            index = index * 26 + (ord(letter) - ord("a") + 1)
        index -= 1
        if index < 16:
            return (202 << 8) | (index << 4)
        return (1 << 28) | (index << 8)


_TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class P9Config(_Model):
    """A host directory ``path`` shared with the domain at ``/mnt/<tag>`` (xl.cfg's ``p9``: Xen's
    9pfs device). ``access`` ``ro`` makes the backend refuse every change; ``security_model``
    is ``none``, the only one there is: the backend reads and writes as the directory's owner
    (never as root, so an ``rw`` share must belong to a user). A relative ``path`` resolves
    against ``base_dir`` in the validation context."""

    tag: str
    path: Path
    access: Annotated[Access, BeforeValidator(_access)] = Access.RW
    security_model: Literal["none"] = "none"
    backend: DomainRef = DOM0_DOMID

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, data: Any) -> Any:
        return _entry(data, "tag=share,path=/srv/share,access=ro")

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        if not _TAG_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a tag: 1-64 of A-Z a-z 0-9 _ -")
        return value

    @field_validator("path", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str | Path) or not str(value) or "\0" in str(value):
            raise ValueError("expected a directory path")
        base = (info.context or {}).get("base_dir", ".")
        return Path(os.path.abspath(Path(base, value)))

    @model_validator(mode="after")
    def _share(self, info: ValidationInfo) -> P9Config:
        if (info.context or {}).get("check_host", True) is False:
            return self
        try:
            found = images.check(self.path, _owner(info), share=True)
        except images.ImageError as exc:
            raise _located("path", str(exc)) from exc
        if found is None:
            raise _located("path", f"{self.path} does not exist")
        if self.access == Access.RW and found.st_uid == 0:
            raise _located(
                "path",
                f"{self.path} belongs to root, and a share is written as its owner, never as "
                "root: give it to a user (chown) or share it with access=ro",
            )
        return self


def _owner(info: ValidationInfo) -> int:
    """The user a disk is for: the validation context's ``owner``, else whoever runs this."""
    return int((info.context or {}).get("owner", os.getuid()))


def _image_problem(target: Path, size: int | None, owner: int) -> str | None:
    try:
        st = images.check(target, owner)
    except images.ImageError as exc:
        return str(exc)
    if st is None:
        if size is None:
            return f"{target} does not exist and no size is given to create it"
        return None
    if st.st_size < SECTOR_SIZE:
        return f"{target} is {st.st_size} bytes, smaller than one {SECTOR_SIZE}-byte sector"
    return None


class DomainConfig(_Model):
    """One domain's configuration, validated and normalised; see the module docstring."""

    name: DomainName
    memory: Int = Field(default=DEFAULT_MEMORY_MIB, ge=MIN_MEMORY_MIB)
    vcpus: Int = Field(default=1, ge=1)
    cpu_weight: Int = Field(default=256, ge=1, le=65535)
    cap: Int = Field(default=0, ge=0)
    command: list[Arg] | None = Field(default=None, min_length=1)
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    on_poweroff: Action = Action.DESTROY
    on_reboot: Action = Action.RESTART
    on_crash: Action = Action.DESTROY
    vif: list[VifConfig] = Field(default_factory=list)
    disk: list[DiskConfig] = Field(default_factory=list)
    p9: list[P9Config] = Field(default_factory=list)
    backends: list[ServedKind] = Field(default_factory=list)
    nics: list[NicConfig] = Field(default_factory=list)

    @field_validator("cap")
    @classmethod
    def _cap(cls, cap: int, info: ValidationInfo) -> int:
        vcpus = info.data.get("vcpus")
        if vcpus is not None and cap > 100 * vcpus:
            raise ValueError(f"{cap}% is more than {vcpus} vcpus can use ({100 * vcpus}%)")
        return cap

    @field_validator("vif")
    @classmethod
    def _vifs(cls, vifs: list[VifConfig], info: ValidationInfo) -> list[VifConfig]:
        _check_own_backend(vifs, info.data.get("name"))
        _check_unique([v.mac for v in vifs], "mac", "MAC address")
        return vifs

    @field_validator("disk")
    @classmethod
    def _disks(cls, disks: list[DiskConfig], info: ValidationInfo) -> list[DiskConfig]:
        _check_own_backend(disks, info.data.get("name"))
        _check_unique([d.vdev for d in disks], "vdev", "vdev")
        _check_shared_images(disks)
        return disks

    @field_validator("p9")
    @classmethod
    def _shares(cls, shares: list[P9Config], info: ValidationInfo) -> list[P9Config]:
        _check_own_backend(shares, info.data.get("name"))
        _check_unique([p.tag for p in shares], "tag", "tag")
        return shares

    @field_validator("backends")
    @classmethod
    def _backends(cls, kinds: list[str]) -> list[str]:
        for index, kind in enumerate(kinds):
            if kind in kinds[:index]:
                raise _located(str(index), f"{kind} is listed twice")
        return kinds

    @field_validator("nics")
    @classmethod
    def _nics(cls, nics: list[NicConfig], info: ValidationInfo) -> list[NicConfig]:
        if nics and "vif" not in (info.data.get("backends") or []):
            raise ValueError("only a domain that serves vifs (backends: [vif]) holds nics")
        _check_unique([n.name for n in nics], "name", "interface")
        return nics

    def normalised(self) -> dict[str, Any]:
        """The normalised config as plain JSON-able data, keys in definition order."""
        return self.model_dump(mode="json")

    def normalised_json(self) -> str:
        """The ``--dry-run`` output: JSON, 2-space indent, every default filled in."""
        return json.dumps(self.normalised(), indent=2, ensure_ascii=False)


def _check_own_backend(
    devices: Sequence[VifConfig | DiskConfig | P9Config], name: str | None
) -> None:
    for index, device in enumerate(devices):
        if name is not None and device.backend == name:
            raise _located(f"{index}.backend", "a domain cannot be its own backend")


def _check_unique(values: list[Any], field: str, what: str) -> None:
    first: dict[Any, int] = {}
    for index, value in enumerate(values):
        if value is None:
            continue
        if value in first:
            raise _located(
                f"{index}.{field}", f"{what} {value} is already used by entry {first[value]}"
            )
        first[value] = index


def _check_shared_images(disks: list[DiskConfig]) -> None:
    # Two writers on one image corrupt it; xl allows sharing only read-only.
    first: dict[str, int] = {}
    for index, disk in enumerate(disks):
        real = os.path.realpath(disk.target)
        if real in first and Access.RW in (disk.access, disks[first[real]].access):
            raise _located(
                f"{index}.target",
                f"{disk.target} is already used by entry {first[real]}; "
                "an image can be shared only read-only",
            )
        first.setdefault(real, index)


def random_mac() -> str:
    """A random unicast MAC address in Xen's OUI 00:16:3e, as xl assigns."""
    tail = secrets.token_bytes(3)
    # The OUI's fourth byte keeps the top bit clear, as libxl does.
    octets = (*XEN_OUI, tail[0] & 0x7F, tail[1], tail[2])
    return ":".join(f"{o:02x}" for o in octets)


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice is an error.

    Plain YAML keeps the last value silently, so a second ``memory:`` would hide the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are meant to be overridden
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> dict[Any, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_yaml_error_line(source, exc)]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {_one_line(str(exc))}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{source}: YAML nested too deeply"]) from exc
    if data is None:
        raise ConfigError([f"{source}: the file is empty; a config needs at least a name"])
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{source}: expected a mapping of keys to values, got a {kind}"])
    return data


def _yaml_error_line(source: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "syntax error"
    if exc.context and problem.startswith("but "):
        problem = f"{exc.context}, {problem}"  # "expected a single document..., but found..."
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    return f"{where}: YAML syntax error: {_one_line(problem)}"


def _validate(
    model: type[_Model], data: Any, *, source: str, base_dir: Path, owner: int | None
) -> Any:
    context: dict[str, Any] = {"base_dir": Path(base_dir)}
    if owner is not None:
        context["owner"] = owner
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        lines = [_error_line(source, model, error) for error in exc.errors()]
        raise ConfigError(lines) from exc


def parse_config(
    text: str, *, source: str, base_dir: Path, owner: int | None = None
) -> DomainConfig:
    """Parse, validate and normalise config ``text``; relative disk targets use ``base_dir``.

    ``source`` names the file in error lines; ``owner`` is the uid the disk images may belong
    to besides root (None: whoever runs this). Raises :class:`ConfigError`.
    """
    data = _load_yaml(text, source)
    config = _validate(DomainConfig, data, source=source, base_dir=base_dir, owner=owner)
    logger.debug("config %s: domain %s is valid", source, config.name)
    return config


def load_config(path: str | Path, owner: int | None = None) -> DomainConfig:
    """Read and parse the config file at ``path``; errors name ``path`` as given."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start})"]) from exc
    return parse_config(text, source=source, base_dir=Path(path).parent, owner=owner)


def parse_vif_spec(spec: str, *, source: str = "vif") -> VifConfig:
    """A :class:`VifConfig` from an xl spec like ``bridge=hyperbr0,ip=10.0.0.5/24``."""
    return _validate(VifConfig, spec, source=source, base_dir=Path("."), owner=None)


def parse_disk_spec(
    spec: str, base_dir: Path, *, source: str = "disk", owner: int | None = None
) -> DiskConfig:
    """A :class:`DiskConfig` from an xl spec like ``target=img.raw,size=64M,vdev=xvdb``;
    ``owner`` as for :func:`parse_config`."""
    return _validate(DiskConfig, spec, source=source, base_dir=base_dir, owner=owner)


def entry_model(config_key: str) -> type[_Model]:
    """The model of one device kind's entries: the one its DomainConfig field is a list of."""
    (model,) = typing.get_args(DomainConfig.model_fields[config_key].annotation)
    if not (isinstance(model, type) and issubclass(model, _Model)):
        raise TypeError(f"DomainConfig.{config_key} is not a list of entries")
    return model


def parse_entry(
    config_key: str, spec: str, base_dir: Path, *, source: str, owner: int | None = None
) -> Any:
    """One device entry of the kind whose config key is ``config_key``, from an xl-style spec;
    relative paths against ``base_dir``, ``owner`` as for :func:`parse_config`."""
    model = entry_model(config_key)
    return _validate(model, spec, source=source, base_dir=base_dir, owner=owner)


# ----------------------------------------------------------------------------- error lines


def _error_line(source: str, root: type[BaseModel], error: ErrorDetails) -> str:
    loc = [part for part in error["loc"] if part != "[key]"]
    ctx = error.get("ctx") or {}
    if "field" in ctx:
        loc += str(ctx["field"]).split(".")
    path = ".".join(_one_line(str(part)) for part in loc)
    reason = _one_line(_reason(root, error))
    return f"{source}: {path}: {reason}" if path else f"{source}: {reason}"


def _reason(root: type[BaseModel], error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(root, error["loc"])
    if kind == "value_error":
        return str((error.get("ctx") or {}).get("error", error["msg"]))
    return error["msg"]


def _suggestion(root: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    model = _model_at(root, loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The model inside ``list[X]``, ``X | None`` or ``X`` itself, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text
