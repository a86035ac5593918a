"""Faults injected at the channel (issue 16): blkback fails, delays or refuses the requests a
disk's fault spec names, whatever program runs inside, set in the config or with `hyperctl
fault` while the domain runs, and cleared again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hyper import api
from tests.integration.conftest import hyperctl
from tests.integration.test_block import disk

pytestmark = pytest.mark.root

# MiB 1 of the disk: sectors 2048-4095.
SECOND_MIB = "eio=100,sectors=2048-4095"


def read_mib(mib: int) -> list[str]:
    return ["dd", "if=/dev/xvda", "of=/dev/null", "bs=1M", f"skip={mib}", "count=1"]


def test_eio_fails_the_reads_of_its_sectors_and_no_others_until_cleared(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    assert hyperctl("exec", name, "--", *read_mib(1)).status == 0

    hyperctl("fault", "set", name, "xvda", SECOND_MIB)

    failed = hyperctl("exec", name, "--", *read_mib(1), check=False)
    assert failed.status != 0 and "Input/output error" in failed.err, failed
    assert hyperctl("exec", name, "--", *read_mib(4)).status == 0
    (listing,) = json.loads(hyperctl("fault", "list", name, "--json").out)
    assert listing["device"] == "xvda" and listing["faults"] == SECOND_MIB
    assert listing["injected"] > 0

    hyperctl("fault", "clear", name, "xvda")
    assert hyperctl("exec", name, "--", *read_mib(1)).status == 0
    (listing,) = json.loads(hyperctl("fault", "list", name, "--json").out)
    assert listing["faults"] == ""


def test_a_failed_flush_makes_fsync_fail_inside(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    target = tmp_path / "d.img"
    name = make_domain("disk:\n" + disk(target, size="16M") + "    faults: flush=fail\n")
    write = ["dd", "if=/dev/zero", "of=/dev/xvda", "bs=4k", "count=1", "conv=fsync"]

    failed = hyperctl("exec", name, "--", *write, check=False)

    assert failed.status != 0 and "Input/output error" in failed.err, failed
    hyperctl("fault", "clear", name, "xvda")
    assert hyperctl("exec", name, "--", *write).status == 0


def test_a_bad_spec_is_refused_with_one_line_and_changes_nothing(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    refused = hyperctl("fault", "set", name, "xvda", "eio=lots", check=False)
    assert refused.status == 2
    assert refused.err.strip().splitlines() == [
        "fault: eio: 'lots' is not a percentage from 0 to 100"
    ]
    (listing,) = json.loads(hyperctl("fault", "list", name, "--json").out)
    assert listing["faults"] == ""
    vif = hyperctl("fault", "set", name, "vif0", "drop=10", check=False)
    assert vif.status == 2 and "not built yet" in vif.err


def test_the_api_drives_a_fault(make_domain: Callable[..., str], tmp_path: Path) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "d.img", size="16M"))
    domain = api.connect().domain(name)
    domain.set_faults("xvda", SECOND_MIB)
    assert domain.exec(read_mib(1)).status != 0
    assert domain.faults()["xvda"][0] == SECOND_MIB
    domain.clear_faults("xvda")
    assert domain.exec(read_mib(1)).status == 0
    assert domain.faults()["xvda"][0] == ""
