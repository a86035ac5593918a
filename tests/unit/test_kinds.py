"""The device-kind table (channels/kinds.py) holds together: every kind's drivers, config
entries, store keys and commands exist where the table says they are."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from backends import drivers as backend_drivers
from channels import kinds, p9fs
from channels.config import Access, DomainConfig, P9Config, entry_model, parse_entry
from channels.kinds import KINDS, DeviceKind
from domu import drivers as frontend_drivers
from hyper.cli import build_parser

EXAMPLES = {
    "vif": "bridge=hyperbr0,ip=10.0.0.5/24",
    "vbd": "target=data.img,size=1M,vdev=xvdb",
    "9pfs": "tag=data,path=.,access=ro",
}


@pytest.fixture(params=KINDS, ids=lambda kind: kind.xenbus_type)
def kind(request: pytest.FixtureRequest) -> DeviceKind:
    found: DeviceKind = request.param
    return found


def test_each_kind_has_a_backend_and_a_frontend_driver(kind: DeviceKind) -> None:
    # Each side's driver is the one its folder defines, and the frontend bus probes it for the
    # kind's XenBus type.
    assert backend_drivers.driver_class(kind).__module__ == f"backends.{kind.backend}.xenbus"
    assert frontend_drivers.driver_class(kind).__module__ == f"domu.{kind.frontend}.xenbus"
    assert frontend_drivers.DRIVER_CLASSES[kind.xenbus_type] is frontend_drivers.driver_class(kind)
    assert {"probe", "otherend_changed", "remove"} <= set(dir(frontend_drivers.driver_class(kind)))
    assert "stats" in dir(backend_drivers.driver_class(kind))


def test_each_kind_is_a_list_of_entries_in_the_config(kind: DeviceKind) -> None:
    assert kind.config_key in DomainConfig.model_fields
    assert DomainConfig.model_fields[kind.config_key].default_factory is list
    assert "backend" in entry_model(kind.config_key).model_fields


def test_each_kinds_store_keys_name_the_device_as_the_user_does(
    kind: DeviceKind, tmp_path: Path
) -> None:
    entry = parse_entry(
        kind.config_key, EXAMPLES[kind.xenbus_type], tmp_path, source="spec", owner=0
    )
    devid = kind.devid_of(entry)
    front, back = kind.store_keys(entry, 0 if devid is None else devid, 0)
    if kind.name_key is not None:
        assert kind.name_field is not None
        assert front[kind.name_key] == str(getattr(entry, kind.name_field))
    assert set(kind.front_keys.values()) <= {*front, "state", "backend"}
    # blkback adds sectors; faults are there when the entry has them (or hyperctl fault sets)
    assert set(kind.back_keys.values()) <= {*back, "sectors", "faults"}


def test_each_kind_has_its_three_commands(kind: DeviceKind) -> None:
    [commands] = [
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    for verb in ("attach", "detach", "list"):
        assert f"{kind.cli}-{verb}" in commands


def test_the_9pfs_keys_the_table_spells_out_are_the_protocols() -> None:
    # Built without validation: the path need not exist on this host.
    share = P9Config.model_construct(tag="t", path=Path("/x"), access=Access.RO)
    front, back = kinds._p9_keys(share, 0, 0)
    assert set(front) == {p9fs.P9Key.TAG}
    assert back[p9fs.P9Key.MODE] == "r", "an ro share is read-only to the backend"
    assert set(back) == {
        p9fs.P9Key.PATH,
        p9fs.P9Key.SECURITY_MODEL,
        p9fs.P9Key.MODE,
        p9fs.P9Key.PATH_OWNER,
    }


def test_kinds_are_unique_by_every_name() -> None:
    for attribute in ("xenbus_type", "config_key", "cli", "backend", "frontend", "spec_name"):
        values = [getattr(kind, attribute) for kind in KINDS]
        assert len(set(values)) == len(values), attribute
