"""hyper's Python API (hyper/api.py), driven as a program would: create, exec, devices, pause,
console, errors and destroy, with no `hyperctl` in between."""

from __future__ import annotations

from pathlib import Path

import pytest

from channels.errors import BadInput, NotFound
from hyper import api

pytestmark = pytest.mark.root


def test_a_domain_created_run_given_a_faulty_disk_and_destroyed_through_the_api(
    hypervisor: None, tmp_path: Path
) -> None:
    hv = api.connect()
    name = f"api{tmp_path.name[-8:]}".replace("_", "")
    domain = hv.create({"name": name, "memory": 96})
    try:
        assert domain.info().status == "running"
        assert any(d.name == name for d in hv.domains())

        result = domain.exec(["sh", "-c", "cat; echo to-stderr >&2; exit 3"], stdin=b"fed in")
        assert (result.status, result.out, result.err) == (3, "fed in", "to-stderr\n")
        with pytest.raises(api.ExecTimeout):
            domain.exec(["sleep", "30"], timeout=1)

        vdev = domain.attach("vbd", "target=disk.img,size=16M,vdev=xvdb", base_dir=tmp_path)
        assert vdev == "xvdb" and (tmp_path / "disk.img").exists()
        wrote = domain.exec(["dd", "if=/dev/zero", "of=/dev/xvdb", "bs=1M", "count=4"])
        assert wrote.status == 0, wrote.err
        (disk,) = domain.devices("vbd")
        assert disk["vdev"] == "xvdb" and disk["wr_req"] > 0
        domain.set_faults("xvdb", "eio=100")
        read = ["dd", "if=/dev/xvdb", "of=/dev/null", "bs=1M", "count=1", "skip=8"]
        failed = domain.exec(read)
        assert failed.status != 0 and "Input/output error" in failed.err, failed
        assert domain.faults()["xvdb"][1] > 0
        domain.clear_faults("xvdb")
        assert domain.exec(read).status == 0
        assert domain.detach("vbd", "xvdb")
        assert domain.devices("vbd") == []

        domain.pause()
        assert "p" in domain.info().state
        domain.unpause()
        assert hv.domain(name).domid == domain.domid
    finally:
        domain.destroy()
    assert not domain.exists()
    with pytest.raises(NotFound):
        hv.domain(name)


def test_a_bad_config_through_the_api_names_the_field(hypervisor: None) -> None:
    hv = api.connect()
    with pytest.raises(BadInput) as refused:
        hv.create({"name": "apibad", "memory": "lots"})
    assert any("memory" in line for line in refused.value.lines), refused.value.lines
    assert not any(d.name == "apibad" for d in hv.domains())
