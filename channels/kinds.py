"""The device-kind table (libxl's ``device_type`` role): every kind of split device, declared once.

Each entry says, for one kind: its XenBus device type; the config key its entries come under
(the entry's model is that field's in channels/config.py); the store keys the toolstack writes
for an entry; which backend folder in ``dom0/`` and frontend folder in ``domu/`` drive it (each
holds a ``xenbus.py`` whose ``Driver`` is the driver class, found by the buses through this
table as Linux finds a driver by its modalias); the counters its backend keeps, in order; and
how ``hyperctl`` attaches, detaches, lists and shows it in ``top``. The toolstack, the two
driver tables, ``hyperctl`` and ``top`` iterate over ``KINDS``; nothing else names a kind.

Adding a kind is one entry here (plus its entry model in channels/config.py), one folder in
``dom0/`` and one in ``domu/``.

This module is imported by ``hyperctl`` on every command, so it must not import pydantic: the
store-key builders take entries typed only for the checker.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from channels.config import DiskConfig, P9Config, VifConfig

#: A device's store keys: (frontend directory, backend directory), besides the ones every
#: device has (channels.xenbus: backend, frontend, state, ...).
StoreKeys = tuple[dict[str, str], dict[str, str]]
#: One ``<kind>-list`` entry or one backend's counters, as JSON.
Listing = Mapping[str, Any]


@dataclass(frozen=True)
class Column:
    """One column of ``hyperctl <cli>-list``: its header, width and what it shows."""

    header: str
    width: int
    value: Callable[[Listing], object]
    left: bool = False

    def cell(self, text: object) -> str:
        return f"{text!s:<{self.width}}" if self.left else f"{text!s:>{self.width}}"


@dataclass(frozen=True)
class TopColumn:
    """One column of ``hyperctl top``: a figure over one domain's devices of the kind."""

    header: str
    value: Callable[[Sequence[Listing]], int]


@dataclass(frozen=True)
class DeviceKind:
    #: The XenBus device type: the store's ``device/<type>`` and ``backend/<type>``.
    xenbus_type: str
    #: The DomainConfig field its entries come under (a list of the entry model).
    config_key: str
    #: ``hyperctl <cli>-attach``, ``<cli>-detach``, ``<cli>-list``; ``what`` is one device.
    cli: str
    what: str
    #: The attach command's argument (xl's name for it) and an example of one.
    spec_name: str
    spec_example: str
    #: The folders of its drivers: ``dom0/<backend>/xenbus.py``, ``domu/<frontend>/xenbus.py``.
    backend: str
    frontend: str
    #: (entry, devid, owner) -> the store keys the toolstack writes (libxl's set_xenstore_config).
    store_keys: Callable[[Any, int, int], StoreKeys]
    #: The devid an entry asks for, or None for the next free number.
    devid_of: Callable[[Any], int | None]
    #: The frontend key that names a device for the user (a disk's vdev, a share's tag), or
    #: None when its devid does; ``<cli>-detach`` takes either. ``name_field`` is the entry's
    #: field that holds it.
    name_key: str | None
    name_field: str | None
    #: The image an entry's backend needs made first: (path, size), or None.
    image_of: Callable[[Any], tuple[str, int | None] | None]
    #: Its backend's counters, in the order its data path keeps them.
    counters: tuple[str, ...]
    #: What ``<cli>-list`` reads from each end's directory into its JSON: {json key: store key}.
    front_keys: Mapping[str, str]
    back_keys: Mapping[str, str]
    columns: tuple[Column, ...]
    top: tuple[TopColumn, ...] = field(default=())

    @property
    def name_meaning(self) -> str:
        return self.name_field or "devid"

    def label(self, device: Mapping[str, Any]) -> str:
        """The name a user knows a device by, from its listing or stats entry: a vif's
        ``vif<N>``; else its ``name_field`` (a disk's vdev, a share's tag), or its devid."""
        if self.name_field is None:
            return f"{self.xenbus_type}{device['devid']}"
        return str(device.get(self.name_field) or device["devid"])


def _no_image(entry: Any) -> None:
    return None


def _next_free(entry: Any) -> None:
    return None


def _total(*keys: str, scale: int = 1) -> Callable[[Sequence[Listing]], int]:
    return lambda devices: sum(int(d.get(key, 0)) for d in devices for key in keys) // scale


def _count(devices: Sequence[Listing]) -> int:
    return len(devices)


def _or_dash(key: str) -> Callable[[Listing], object]:
    return lambda d: d.get(key) or "-"


def _sum(*keys: str) -> Callable[[Listing], object]:
    """The sum of counters ``keys``; "-" for a device with none (its backend's counters are
    not dom0's to read: a driver domain's)."""
    return lambda d: sum(int(d[k]) for k in keys if k in d) if any(k in d for k in keys) else "-"


# -- vif ----------------------------------------------------------------------------------------


def _vif_keys(vif: VifConfig, devid: int, owner: int) -> StoreKeys:
    """libxl's libxl__device_nic_add: a random MAC in Xen's OUI when none is given."""
    from channels.config import random_mac

    mac = vif.mac or random_mac()
    front = {"handle": str(devid), "mac": mac, "mtu": str(vif.mtu)}
    if vif.ip is not None:
        front["ip"] = str(vif.ip)
    if vif.gateway is not None:
        front["gateway"] = str(vif.gateway)
    back = {"handle": str(devid), "mac": mac, "bridge": vif.bridge, "mtu": str(vif.mtu)}
    back["type"] = "vif"
    if vif.ip is not None:
        # As libxl does: Xen's vif scripts read it here for their antispoof rules, and so does
        # netback. The address alone: it is all the vif may send from.
        back["ip"] = str(ipaddress.ip_interface(vif.ip).ip)
    if vif.rate is not None:
        back["rate"] = f"{vif.rate.bytes_per_window},{vif.rate.window_us}"
    if vif.faults:
        back["faults"] = vif.faults
    return front, back


def _backend_domid(listing: Listing) -> object:
    """The domain serving a device: its backend directory's ``/local/domain/<domid>/...``."""
    parts = str(listing.get("backend") or "").split("/")
    return parts[3] if len(parts) > 3 else "-"


#: A vif's counters of injected faults, one per kind of fault.
NET_FAULT_COUNTERS = ("fault_dropped", "fault_duplicated", "fault_corrupted", "fault_delayed")

VIF = DeviceKind(
    xenbus_type="vif",
    config_key="vif",
    cli="network",
    what="vif",
    spec_name="vifspec",
    spec_example="bridge=hyperbr0,ip=10.0.0.5/24",
    backend="netback",
    frontend="netfront",
    store_keys=_vif_keys,
    devid_of=_next_free,
    name_key=None,
    name_field=None,
    image_of=_no_image,
    counters=(
        "tx_packets",
        "tx_bytes",
        "tx_errors",
        "tx_dropped",
        "tx_spoofed",
        "rx_packets",
        "rx_bytes",
        "rx_errors",
        "rx_dropped",
        "bad_grefs",
        # Frames the injected faults (channels/faults.py) dropped, sent twice, flipped a bit
        # of, or held back; counted by the Python path, which runs while a vif has faults.
        "fault_dropped",
        "fault_duplicated",
        "fault_corrupted",
        "fault_delayed",
    ),
    front_keys={"mac": "mac", "ip": "ip", "mtu": "mtu", "state": "state", "backend": "backend"},
    back_keys={"fault_spec": "faults"},
    columns=(
        Column("Idx", 3, lambda d: d["devid"]),
        Column("BE", 4, _backend_domid),
        Column("MAC", 17, _or_dash("mac"), left=True),
        Column("IP", 18, _or_dash("ip"), left=True),
        Column("State", 5, _or_dash("state")),
        Column("Q", 2, lambda d: len(d.get("queues") or []) or "-"),
        Column("TX pkts", 9, _sum("tx_packets")),
        Column("TX bytes", 12, _sum("tx_bytes")),
        Column("RX pkts", 9, _sum("rx_packets")),
        Column("RX bytes", 12, _sum("rx_bytes")),
        Column("Err", 5, _sum("tx_errors", "rx_errors")),
        Column("Drop", 5, _sum("tx_dropped", "rx_dropped")),
        Column("Spoof", 5, _sum("tx_spoofed")),
        Column("BadRef", 6, _sum("bad_grefs")),
        Column("Faults", 6, _sum(*NET_FAULT_COUNTERS)),
    ),
    top=(
        TopColumn("NETS", _count),
        TopColumn("NETTX(k)", _total("tx_bytes", scale=1024)),
        TopColumn("NETRX(k)", _total("rx_bytes", scale=1024)),
        TopColumn("NETSPOOF", _total("tx_spoofed")),
        TopColumn("NET_FLT", _total(*NET_FAULT_COUNTERS)),
    ),
)


# -- vbd ----------------------------------------------------------------------------------------


def _vbd_keys(disk: DiskConfig, devid: int, owner: int) -> StoreKeys:
    """libxl's libxl__device_disk_add; ``owner`` is the uid the image may belong to besides
    root (blkback checks it again when it opens the image)."""
    from channels import blkif  # dom0's alone: hyperctl need not load the ring declarations

    front = {"virtual-device": str(devid), "device-type": "disk", "dev": disk.vdev}
    back = {
        "params": str(disk.target),
        blkif.BlkifKey.PARAMS_OWNER: str(owner),
        "mode": "w" if disk.access == "rw" else "r",
        **({"faults": disk.faults} if disk.faults else {}),
        "dev": disk.vdev,
        "type": "file",
        "device-type": "disk",
        "removable": "0",
        "bootable": "1",
    }
    return front, back


def _vbd_image(disk: DiskConfig) -> tuple[str, int | None]:
    return str(disk.target), disk.size


def _vbd_devid(disk: DiskConfig) -> int:
    from channels import blkif

    return blkif.vdev_number(disk.vdev)


VBD = DeviceKind(
    xenbus_type="vbd",
    config_key="disk",
    cli="block",
    what="disk",
    spec_name="diskspec",
    spec_example="target=data.img,size=64M,vdev=xvdb",
    backend="blkback",
    frontend="blkfront",
    store_keys=_vbd_keys,
    devid_of=_vbd_devid,
    name_key="dev",
    name_field="vdev",
    image_of=_vbd_image,
    counters=(
        "rd_req",
        "rd_sect",
        "wr_req",
        "wr_sect",
        "flush_req",
        "discard_req",
        "oo_req",
        "errors",
        "bad_grefs",
        "faults",
    ),
    front_keys={"vdev": "dev", "state": "state", "backend": "backend"},
    back_keys={"params": "params", "mode": "mode", "sectors": "sectors", "fault_spec": "faults"},
    columns=(
        Column("Vdev", 5, lambda d: d.get("vdev") or d["devid"], left=True),
        Column("BE", 4, _backend_domid),
        Column("State", 5, _or_dash("state")),
        Column("Mode", 4, _or_dash("mode"), left=True),
        Column("Sectors", 12, _or_dash("sectors")),
        Column("RD req", 9, _sum("rd_req")),
        Column("WR req", 9, _sum("wr_req")),
        Column("RD sect", 11, _sum("rd_sect")),
        Column("WR sect", 11, _sum("wr_sect")),
        Column("OO", 5, _sum("oo_req")),
        Column("Err", 5, _sum("errors")),
        Column("BadRef", 6, _sum("bad_grefs")),
        Column("Faults", 6, _sum("faults")),
        Column("Target", 0, _or_dash("params"), left=True),
    ),
    top=(
        TopColumn("VBDS", _count),
        TopColumn("VBD_OO", _total("oo_req")),
        TopColumn("VBD_RD", _total("rd_req")),
        TopColumn("VBD_WR", _total("wr_req")),
        TopColumn("VBD_RSECT", _total("rd_sect")),
        TopColumn("VBD_WSECT", _total("wr_sect")),
        TopColumn("VBD_FLT", _total("faults")),
    ),
)


# -- 9pfs ---------------------------------------------------------------------------------------


def _p9_keys(share: P9Config, devid: int, owner: int) -> StoreKeys:
    """libxl's libxl__device_p9_add: the tag in the frontend's directory, the rest in the
    backend's (channels/p9fs.py's P9Key; spelled out here so that hyperctl need not import the
    9P codec). ``owner`` is the uid the share may belong to besides root (p9back checks it)."""
    front = {"tag": share.tag}
    back = {
        "path": str(share.path),
        "security_model": share.security_model,
        "mode": "r" if share.access == "ro" else "w",
        "path-owner": str(owner),
    }
    return front, back


P9 = DeviceKind(
    xenbus_type="9pfs",
    config_key="p9",
    cli="p9",
    what="share",
    spec_name="p9spec",
    spec_example="tag=data,path=/srv/data,access=ro",
    backend="p9back",
    frontend="p9front",
    store_keys=_p9_keys,
    devid_of=_next_free,
    name_key="tag",
    name_field="tag",
    image_of=_no_image,
    counters=("requests", "errors", "bytes_in", "bytes_out", "bad_grefs"),
    front_keys={"tag": "tag", "state": "state", "backend": "backend"},
    back_keys={"path": "path", "mode": "mode"},
    columns=(
        Column("Idx", 3, lambda d: d["devid"]),
        Column("Tag", 16, _or_dash("tag"), left=True),
        Column("State", 5, _or_dash("state")),
        Column("Mode", 4, _or_dash("mode"), left=True),
        Column("Requests", 9, _sum("requests")),
        Column("Err", 5, _sum("errors")),
        Column("In bytes", 12, _sum("bytes_in")),
        Column("Out bytes", 12, _sum("bytes_out")),
        Column("BadRef", 6, _sum("bad_grefs")),
        Column("Path", 0, _or_dash("path"), left=True),
    ),
    top=(TopColumn("P9S", _count), TopColumn("P9_REQ", _total("requests"))),
)


#: Every kind, in the order the toolstack adds a new domain's devices and `top` shows them.
KINDS: tuple[DeviceKind, ...] = (VIF, VBD, P9)
BY_TYPE: dict[str, DeviceKind] = {kind.xenbus_type: kind for kind in KINDS}
BY_CLI: dict[str, DeviceKind] = {kind.cli: kind for kind in KINDS}
