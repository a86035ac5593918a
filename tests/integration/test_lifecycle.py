"""Domains come and go without a trace; bad input creates nothing; on_* actions apply."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.netback import firewall
from tests.integration.conftest import (
    REPO,
    domain_info,
    domains,
    hyperctl,
    kill_hyperd,
    leftovers,
    wait_for,
)

pytestmark = pytest.mark.root


def domain_objects(domid: int) -> list[str]:
    """The host-side traces of one domain: shm/semaphores, cgroups, processes."""
    found = [p.name for p in Path("/dev/shm").iterdir() if f"hyper.d{domid}." in p.name]
    found += [str(g) for g in Path("/sys/fs/cgroup").glob(f"*/hyper/dom{domid}")]
    return found


def described(leftover: str) -> str:
    """A leftover, and for a process, its state and parent (a zombie whose parent is hyperd
    is one it has yet to reap)."""
    if not leftover.startswith("process "):
        return leftover
    try:
        status = Path(f"/proc/{leftover.split()[1]}/status").read_text().splitlines()
    except OSError:
        return f"{leftover} (gone)"
    fields = dict(line.split(":\t", 1) for line in status if ":\t" in line)
    return f"{leftover} ({fields.get('State', '?')}, parent {fields.get('PPid', '?')})"


def test_fifty_create_destroy_cycles_leave_nothing(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    before = set(leftovers())
    for cycle in range(50):
        name = make_domain(name=f"cycle{cycle}")
        info = domain_info(name)
        assert info is not None and info["status"] == "running"
        assert domain_objects(info["domid"]), "a running domain holds rings and a cgroup"
        kernel = info["pid"]
        hyperctl("destroy", name)
        assert domain_info(name) is None
        assert domain_objects(info["domid"]) == [], f"cycle {cycle} left objects behind"
        assert not Path(f"/proc/{kernel}").exists(), f"cycle {cycle} left its kernel"
        # A process of the domain's that died with it is reaped by hyperd (their subreaper)
        # as its SIGCHLD arrives, which may be just after destroy returned: give it a moment.
        now = set(leftovers())
        if now != before:
            wait_for(
                lambda: set(leftovers()) == before,
                5,
                f"cycle {cycle}'s leftovers to go: {', '.join(map(described, now ^ before))}",
            )


def test_shutdown_is_cooperative_and_poweroff_destroys(make_domain: Callable[..., str]) -> None:
    name = make_domain()
    hyperctl("shutdown", "-w", name)
    assert domain_info(name) is None
    assert "shutting down: poweroff" in hyperctl("dmesg").out


def test_a_finished_command_is_preserved_when_asked(make_domain: Callable[..., str]) -> None:
    name = make_domain('command: ["sh", "-c", "echo done; exit 0"]\non_poweroff: preserve\n')
    info = wait_for(
        lambda: (d := domain_info(name)) and d["status"] == "shutdown" and d,
        30,
        "the domain to power off",
    )
    assert info["state"] == "---s--"
    assert info["exit_code"] == 0
    hyperctl("destroy", name)
    assert domain_info(name) is None


def test_reboot_restarts_the_domain(make_domain: Callable[..., str]) -> None:
    name = make_domain()
    first = domain_info(name)
    assert first is not None
    hyperctl("reboot", name)
    again = wait_for(
        lambda: (
            (d := domain_info(name))
            and d["status"] == "running"
            and d["domid"] != first["domid"]
            and d
        ),
        30,
        "the domain to restart",
    )
    assert hyperctl("exec", name, "--", "hostname").out.strip() == name
    assert again["uuid"] != first["uuid"]


def test_pause_and_unpause(make_domain: Callable[..., str]) -> None:
    name = make_domain()
    hyperctl("pause", name)
    assert domain_info(name)["state"] == "--p---"  # type: ignore[index]
    hyperctl("unpause", name)
    assert domain_info(name)["state"][2] == "-"  # type: ignore[index]
    assert hyperctl("exec", name, "--", "true").status == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("memroy: 64\n", "memroy: unknown key"),
        ("memory: -5\n", "memory:"),
        ("memory: [64\n", "YAML"),
        ('command: "not a list"\n', "command:"),
    ],
)
def test_bad_config_exits_2_with_one_line_per_error_and_creates_nothing(
    hypervisor: None, tmp_path: Path, body: str, expected: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"name: bad\n{body}")
    shm_before = hyper_shm()
    result = hyperctl("create", str(config), check=False)
    assert result.status == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"{config}:") and expected in lines[0], lines[0]
    assert domain_info("bad") is None
    assert hyper_shm() == shm_before


def hyper_shm() -> set[str]:
    """The hypervisor's shared memory and doorbells (unit tests running meanwhile make their
    own, named hyper-test-*)."""
    return {name for name in os.listdir("/dev/shm") if "hyper." in name}


def test_two_errors_give_two_lines(hypervisor: None, tmp_path: Path) -> None:
    config = tmp_path / "two.yaml"
    config.write_text("name: two\nmemory: -1\nvcpus: 0\n")
    result = hyperctl("create", str(config), check=False)
    assert result.status == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{config}: memory:"), lines
    assert lines[1].startswith(f"{config}: vcpus:"), lines


def test_a_duplicate_name_exits_2_and_creates_nothing(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    name = make_domain()
    count = len(domains())
    config = tmp_path / "dup.yaml"
    config.write_text(f"name: {name}\n")
    result = hyperctl("create", str(config), check=False)
    assert result.status == 2
    assert result.err.strip() == f"{config}: name: a domain named {name!r} already exists"
    assert len(domains()) == count


def test_a_backend_no_domain_can_serve_exits_2_naming_each_entry_and_creates_nothing(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """A device whose ``backend`` names no domain, or a domain whose config does not list its
    kind among the ``backends`` it serves, is refused before anything is made, one line per
    entry (a driver domain serving it: tests/integration/test_driver_domains.py)."""
    netvm, plain = make_domain("backends: [vif]\n"), make_domain()
    netvm_id, plain_id = (_domid(name) for name in (netvm, plain))
    image = tmp_path / "served.img"
    config = tmp_path / "served.yaml"
    config.write_text(
        f"name: served\nvif:\n  - backend=nosuch\n  - backend={plain}\n"
        f"disk:\n  - target={image},size=1M,vdev=xvda,backend={netvm}\n"
    )
    before = set(leftovers())
    result = hyperctl("create", str(config), check=False)
    assert result.status == 2, result
    assert result.err.splitlines() == [
        f"{config}: vif.0.backend: 'nosuch': no such domain",
        f"{config}: vif.1.backend: {plain} (dom{plain_id}) runs no netback: its config lists "
        "no backends",
        f"{config}: disk.0.backend: {netvm} (dom{netvm_id}) runs no blkback: its backends are "
        "['vif']",
    ]
    assert domain_info("served") is None and not image.exists()
    assert set(leftovers()) <= before
    attach = hyperctl("network-attach", plain, f"backend={plain}", check=False)
    assert attach.status == 2 and "vifspec: backend:" in attach.err, attach
    assert hyperctl("network-list", "--json", plain).out.strip() == "[]"


def _domid(name: str) -> int:
    info = domain_info(name)
    assert info is not None, f"no domain {name}"
    return int(info["domid"])


def test_a_create_whose_device_cannot_connect_is_rolled_back(
    hypervisor: None, tmp_path: Path
) -> None:
    """Valid config, refused device: the host's lo cannot take a TAP, so netback gives up. The
    create fails with why, and the domain, its disk's loop device and the image made for it
    are gone."""
    image = tmp_path / "rollback.img"
    config = tmp_path / "rollback.yaml"
    config.write_text(
        f"name: rollback\nvif:\n  - bridge=lo\ndisk:\n  - target={image},size=1M,vdev=xvda\n"
    )
    before = set(leftovers())
    result = hyperctl("create", str(config), check=False)
    assert result.status == 1, result
    assert "vif" in result.err and "did not connect: creating the host TAP" in result.err
    assert "domain rollback was destroyed again" in result.err
    assert domain_info("rollback") is None
    assert not image.exists()
    assert set(leftovers()) <= before


def test_unknown_domain_and_missing_file_are_errors(hypervisor: None) -> None:
    assert hyperctl("destroy", "no-such-domain", check=False).status == 1
    missing = hyperctl("create", "/nonexistent/x.yaml", check=False)
    assert missing.status == 2 and "/nonexistent/x.yaml" in missing.err
    assert hyperctl("frobnicate", check=False).status == 2


def test_dry_run_prints_normalised_json_and_creates_nothing(hypervisor: None) -> None:
    count = len(domains())
    result = hyperctl("create", "--dry-run", str(REPO / "configs" / "idle.yaml"))
    assert '"name": "idle"' in result.out and '"cpu_weight": 256' in result.out
    assert len(domains()) == count


def test_cleanup_after_hyperd_is_killed_leaves_nothing(
    own_hypervisor: None, tmp_path: Path
) -> None:
    for i in range(2):
        config = tmp_path / f"victim{i}.yaml"
        vif = f"vif:\n  - bridge: hyclean\n    ip: 10.78.0.{i + 2}/24\n"
        config.write_text(f"name: victim{i}\n{vif}")
        hyperctl("create", str(config))
    kill_hyperd()
    assert leftovers(), "domains and dom0 outlive a killed hyperd until cleanup"
    if shutil.which("iptables"):
        assert ("iptables", "hyclean") in firewall.ours(), "and the bridge's firewall rule"
    result = hyperctl("cleanup")
    assert "removed" in result.out
    wait_for(lambda: not leftovers(), 10, "cleanup to leave nothing")
