"""Xen's 9pfs device, end to end: a host directory at /mnt/<tag> in a domU, through 9pfs rings.

Programs inside the domain (cat, dd, sh) run as its unprivileged workload user on the FUSE file
system p9front serves; p9back in dom0 answers each 9P request on the share's directory, as the
directory's owner (``nobody`` here: a share is never written as root).
"""

from __future__ import annotations

import hashlib
import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import domain_info, hyperctl, in_domain

pytestmark = pytest.mark.root

NOBODY = pwd.getpwnam("nobody")


def share(path: Path, *files: tuple[str, bytes]) -> Path:
    """A directory for a share, nobody's (so that the domain may write in it), with files."""
    path.mkdir(mode=0o755)
    for name, data in files:
        (path / name).write_bytes(data)
        os.chown(path / name, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


def run(name: str, script: str) -> tuple[int, str, str]:
    """``sh -c script`` in domain ``name``: (status, stdout, stderr)."""
    proc = in_domain(name, "sh", "-c", script)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def p9(tag: str, path: Path, access: str = "rw") -> str:
    return f"  - tag: {tag}\n    path: {path}\n    access: {access}\n"


def test_a_host_file_reads_back_and_what_the_workload_writes_lands_on_the_host(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    shared = share(tmp_path / "data", ("hello.txt", b"hello from the host\n"))
    name = make_domain("p9:\n" + p9("data", shared))

    status, out, err = run(name, "cat /mnt/data/hello.txt && id -u && stat -c %u /mnt/data")
    assert status == 0, err
    assert out.splitlines() == ["hello from the host", "1000", "1000"]

    script = (
        "head -c 300000 /dev/urandom > /mnt/data/blob && sha256sum /mnt/data/blob | cut -d' ' -f1"
    )
    status, out, err = run(name, script)
    assert status == 0, err
    blob = shared / "blob"
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == out.strip()
    assert blob.stat().st_uid == NOBODY.pw_uid, "written as the share's owner, not as root"


def test_a_read_only_share_refuses_every_change_with_erofs(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    shared = share(tmp_path / "ro", ("kept.txt", b"kept\n"))
    name = make_domain("p9:\n" + p9("ro", shared, "ro"))

    assert run(name, "cat /mnt/ro/kept.txt")[1] == "kept\n"
    for change in ("echo x > /mnt/ro/new", "rm /mnt/ro/kept.txt", "mkdir /mnt/ro/d"):
        status, _, err = run(name, change)
        assert status != 0 and "Read-only file system" in err, (change, err)
    assert sorted(os.listdir(shared)) == ["kept.txt"]
    assert (shared / "kept.txt").read_bytes() == b"kept\n"


def test_nothing_outside_the_share_is_reached_through_it(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """The share holds a symlink to /etc/shadow and one that climbs out with ``..``; the
    backend follows neither (it opens nothing but what lies beneath the share: openat2 with
    RESOLVE_BENEATH), and the domain resolves a link it reads in its own file system, where
    the host's scratch files are not."""
    secret = tmp_path / "host-secret"
    secret.write_text("not for guests\n")
    secret.chmod(0o644)
    shared = share(tmp_path / "links")
    (shared / "shadow").symlink_to("/etc/shadow")
    (shared / "up").symlink_to(f"../{secret.name}")
    (shared / "far").symlink_to(str(secret))
    name = make_domain("p9:\n" + p9("links", shared))

    status, out, err = run(name, "readlink /mnt/links/shadow /mnt/links/up")
    assert (status, out.split()) == (0, ["/etc/shadow", f"../{secret.name}"]), err
    for path in ("shadow", "up", "far"):
        status, out, _ = run(name, f"cat /mnt/links/{path}")
        assert status != 0 and "not for guests" not in out, path
    status, out, _ = run(name, "cat /mnt/links/../links/../../" + str(secret).lstrip("/"))
    assert status != 0 and "not for guests" not in out


def test_a_thousand_files_made_inside_list_as_on_the_host(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    shared = share(tmp_path / "many")
    name = make_domain("p9:\n" + p9("many", shared))

    script = "cd /mnt/many && for i in $(seq 1000); do echo $i > f$i; done && ls"
    status, out, err = run(name, script)
    assert status == 0, err
    inside = sorted(out.split())
    assert len(inside) == 1000
    assert inside == sorted(os.listdir(shared))
    assert (shared / "f777").read_text() == "777\n"


def test_p9_attach_list_and_detach(make_domain: Callable[..., str], tmp_path: Path) -> None:
    shared = share(tmp_path / "late", ("late.txt", b"attached later\n"))
    name = make_domain()

    hyperctl("p9-attach", name, f"tag=late,path={shared}")
    assert run(name, "cat /mnt/late/late.txt")[1] == "attached later\n"
    listing = hyperctl("p9-list", name).out.splitlines()
    assert listing[0].split()[:3] == ["Idx", "Tag", "State"]
    assert listing[1].split()[:4] == ["0", "late", "4", "w"]

    again = hyperctl("p9-attach", name, f"tag=late,path={shared}", check=False)
    assert again.status == 2 and "p9spec: tag: late is already used" in again.err
    hyperctl("p9-detach", name, "late")
    assert hyperctl("p9-list", name).out.splitlines()[1:] == []
    assert run(name, "ls /mnt")[1] == ""


def test_a_root_owned_share_is_refused_read_write_naming_the_way_out(
    hypervisor: None, tmp_path: Path
) -> None:
    shared = tmp_path / "root-owned"
    shared.mkdir()
    config = tmp_path / "rootshare.yaml"
    config.write_text(f"name: rootshare\np9:\n{p9('data', shared)}")
    result = hyperctl("create", str(config), check=False)
    assert result.status == 2
    assert result.err.strip() == (
        f"{config}: p9.0.path: {shared} belongs to root, and a share is written as its owner, "
        "never as root: give it to a user (chown) or share it with access=ro"
    )
    assert domain_info("rootshare") is None
