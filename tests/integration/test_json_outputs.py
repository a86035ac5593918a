"""Every `--json` output has one schema, golden-tested as --dry-run is (issue 17, item 5): each
command runs against a hypervisor with a domain that has a vif and a disk, its JSON is reduced
to its shape (each key's type, a list's last element's), and the shape is compared with
tests/golden/json/<command>.json, which is the schema's documentation. After an intended
change: ``HYPER_UPDATE_GOLDEN=1 python -m pytest tests/integration/test_json_outputs.py`` and
review the diff."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.golden import JSON_SCHEMAS, assert_matches_schema
from tests.integration.conftest import domain_info, hyperctl
from tests.integration.test_block import disk
from tests.integration.test_network import vif
from tests.integration.test_p9 import p9, share

pytestmark = pytest.mark.root

#: Each command (by its golden file's name) and its arguments; DOMAIN and DOMID are the test
#: domain's.
COMMANDS = {
    "list": ["list", "--json"],
    "info": ["info", "--json"],
    "dmesg": ["dmesg", "--json"],
    "top": ["top", "-b", "-n", "1", "-d", "0", "--json"],
    "store-ls": ["store", "ls", "/local/domain/DOMID/device", "--json"],
    "network-list": ["network-list", "--json", "DOMAIN"],
    "block-list": ["block-list", "--json", "DOMAIN"],
    "p9-list": ["p9-list", "--json", "DOMAIN"],
    "fault-list": ["fault", "list", "DOMAIN", "--json"],
    "rings": ["rings", "DOMAIN", "--json"],
    "check": ["check", "--json"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_json_output_matches_its_golden_schema(
    command: str, make_domain: Callable[..., str], lan: tuple[str, str], tmp_path: Path
) -> None:
    bridge, net = lan
    devices = vif(bridge, f"{net}.2") + "disk:\n" + disk(tmp_path / "d.img", size="8M")
    name = make_domain(devices + "p9:\n" + p9("data", share(tmp_path / "data")))
    info = domain_info(name)
    assert info is not None
    argv = [
        a.replace("DOMAIN", name).replace("DOMID", str(info["domid"])) for a in COMMANDS[command]
    ]

    assert_matches_schema(json.loads(hyperctl(*argv).out), command)


def test_every_golden_schema_has_its_command() -> None:
    # trace's is checked where a trace runs: test_capture.py, beside dd's writes.
    assert {p.stem for p in JSON_SCHEMAS.glob("*.json")} == {*COMMANDS, "trace"}
