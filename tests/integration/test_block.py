"""The block split driver, end to end: /dev/xvdX in a domU through blkif rings to a loop device.

Programs inside the domain (dd, fio, mkfs.ext4) run as its unprivileged workload user on the
disk file blkfront serves through FUSE; blkback in dom0 does the I/O on a loop device over the
image file. What the domain wrote is checked in the image from dom0 after `hyperctl destroy`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import domain_info, hyperctl, in_domain, wait_for

pytestmark = pytest.mark.root

MiB = 1 << 20


def disk(target: Path, vdev: str = "xvda", size: str | None = "128M", access: str = "rw") -> str:
    lines = f"  - target: {target}\n    vdev: {vdev}\n    access: {access}\n"
    return lines + (f"    size: {size}\n" if size else "")


def fio_verify(rw: str, size: str, *more: str) -> list[str]:
    """fio over /dev/xvda, 4 KiB at iodepth 16 with direct libaio, checking what it wrote with
    crc32c; a JSON report."""
    return [
        "fio",
        "--name=verify",
        "--filename=/dev/xvda",
        f"--rw={rw}",
        "--bs=4k",
        "--iodepth=16",
        "--ioengine=libaio",
        "--direct=1",
        f"--size={size}",
        "--verify=crc32c",
        "--output-format=json",
        *more,
    ]


def verifying_fio(name: str, runtime: int = 20) -> subprocess.Popen[str]:
    """fio in domain ``name``, verifying what it writes (randrw over 32 MiB) for ``runtime``
    seconds; started, not waited for."""
    timed = ["--time_based", f"--runtime={runtime}"]
    # A timed run would save its verify state into the cwd.
    return in_domain(name, *fio_verify("randrw", "32M", "--verify_state_save=0", *timed))


def sha256_of(path: Path, length: int, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(length, MiB))
            if not chunk:
                break
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def vbds(name: str) -> list[dict[str, Any]]:
    return list(json.loads(hyperctl("block-list", "--json", name).out))


def attached_loops(image: Path) -> list[str]:
    """The loop devices the kernel has attached to ``image``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if Path(backing.read_text().strip()) == image:
                found.append(backing.parts[3])
        except OSError:
            continue
    return found


def destroy(name: str, image: Path) -> None:
    hyperctl("destroy", name)
    wait_for(lambda: not attached_loops(image), 5, f"the loop device over {image} to go")


def test_dd_through_xvda_lands_in_the_image(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    image = tmp_path / "dd.img"
    name = make_domain("disk:\n" + disk(image))
    assert image.stat().st_size == 128 * MiB  # made, sparse, by the toolstack
    listing = hyperctl("exec", name, "--", "ls", "-ln", "/dev/xvda").out.split()
    assert listing[0] == "-rw-------" and listing[2:4] == ["1000", "1000"]
    assert listing[4] == str(128 * MiB)

    written = hyperctl(
        "exec",
        name,
        "--",
        "dd",
        "if=/dev/urandom",
        "of=/dev/xvda",
        "bs=1M",
        "count=64",
        "oflag=direct",
        "conv=fsync,notrunc",
    )
    assert "67108864 bytes" in written.err
    inside = hyperctl(
        "exec", name, "--", "sh", "-c", "head -c 67108864 /dev/xvda | sha256sum"
    ).out.split()[0]
    counters = vbds(name)[0]
    assert counters["wr_sect"] >= 64 * MiB // 512  # every sector crossed the ring
    assert counters["flush_req"] >= 1  # conv=fsync became a flush
    assert counters["errors"] == 0

    destroy(name, image)
    assert sha256_of(image, 64 * MiB) == inside


def test_fio_verifies_and_mkfs_leaves_a_clean_file_system(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    image = tmp_path / "fs.img"
    name = make_domain("disk:\n" + disk(image))
    fio = hyperctl("exec", name, "--", *fio_verify("randrw", "64M"), timeout=300)
    job = json.loads(fio.out[fio.out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0

    hyperctl("exec", name, "--", "mkfs.ext4", "-F", "-q", "/dev/xvda")
    destroy(name, image)
    fsck = subprocess.run(
        ["fsck.ext4", "-n", "-f", str(image)], capture_output=True, text=True, timeout=60
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_read_only_disk_refuses_writes_with_erofs(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(os.urandom(4 * MiB))
    before = sha256_of(image, 4 * MiB)
    name = make_domain("disk:\n" + disk(image, size=None, access="ro"))

    attempt = hyperctl(
        "exec",
        name,
        "--",
        "dd",
        "if=/dev/zero",
        "of=/dev/xvda",
        "bs=4k",
        "count=1",
        "conv=notrunc",
        check=False,
    )
    assert attempt.status != 0
    assert "Read-only file system" in attempt.err
    read_back = hyperctl("exec", name, "--", "sh", "-c", "sha256sum < /dev/xvda").out.split()[0]
    assert read_back == before
    assert vbds(name)[0]["mode"] == "r"

    destroy(name, image)
    assert sha256_of(image, 4 * MiB) == before


def test_block_attach_and_detach_on_a_running_domain(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    name = make_domain("disk:\n" + disk(first, size="32M"))

    hyperctl("block-attach", name, f"target={second},size=16M,vdev=xvdb")
    assert [v["vdev"] for v in vbds(name)] == ["xvda", "xvdb"]
    probe = "printf hello | dd of=/dev/xvdb conv=notrunc,fsync 2>/dev/null && head -c 5 /dev/xvdb"
    assert hyperctl("exec", name, "--", "sh", "-c", probe).out == "hello"
    assert attached_loops(second)

    hyperctl("block-detach", name, "xvdb")
    wait_for(lambda: not attached_loops(second), 5, "xvdb's loop device to go")
    assert [v["vdev"] for v in vbds(name)] == ["xvda"]
    gone = hyperctl("exec", name, "--", "ls", "/dev/xvdb", check=False)
    assert gone.status != 0
    still = "dd if=/dev/zero of=/dev/xvda bs=4k count=1 conv=notrunc,fsync 2>&1 && echo ok"
    assert hyperctl("exec", name, "--", "sh", "-c", still).out.strip().endswith("ok")
    assert second.read_bytes()[:5] == b"hello"

    missing = hyperctl("block-detach", name, "xvdq", check=False)
    assert missing.status != 0 and "has no disk xvdq" in missing.err
    assert domain_info(name) is not None


def test_the_domain_sees_no_host_storage(make_domain: Callable[..., str], tmp_path: Path) -> None:
    name = make_domain("disk:\n" + disk(tmp_path / "only.img", size="16M"))
    listing = hyperctl("exec", name, "--", "ls", "/dev").out.split()
    assert "xvda" in listing
    assert not [entry for entry in listing if entry.startswith(("loop", "sd", "vd", "nvme"))]
    denied = hyperctl("exec", name, "--", "sh", "-c", "touch /dev/sda", check=False)
    assert denied.status != 0


def test_a_bad_disk_entry_is_refused_and_creates_nothing(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.img"
    config = tmp_path / "bad.yaml"
    config.write_text(f"name: bad-disk\ndisk:\n{disk(missing, size=None)}")
    result = hyperctl("create", str(config), check=False)
    assert result.status == 2
    assert f"{config}: disk.0.target:" in result.err
    assert "does not exist and no size is given" in result.err
    assert not missing.exists()
    assert domain_info("bad-disk") is None


# A uid that is neither root nor the user hyperctl acts for (SUDO_UID, under sudo).
STRANGER = 4242 if os.environ.get("SUDO_UID") != "4242" else 4243


def images_another_user_could_reach(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Disk targets another host user could read or write the guest's disk through, each with
    the reason hyperctl must give: name -> (target, reason)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.img").write_bytes(bytes(MiB))
    (tmp_path / "link.img").symlink_to(real / "a.img")
    (tmp_path / "linked").symlink_to(real)
    theirs = tmp_path / "theirs.img"
    theirs.write_bytes(bytes(MiB))
    os.chown(theirs, STRANGER, -1)
    their_folder = tmp_path / "their-folder"
    their_folder.mkdir()
    os.chown(their_folder, STRANGER, -1)
    open_folder = tmp_path / "open-folder"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    return {
        "symlink": (
            tmp_path / "link.img",
            f"reached through a symlink: {tmp_path / 'link.img'} -> {real / 'a.img'}",
        ),
        "symlinked folder": (
            tmp_path / "linked" / "a.img",
            f"reached through a symlink: {tmp_path / 'linked'} -> {real}",
        ),
        "another user's image": (theirs, f"belongs to uid {STRANGER}"),
        "missing, in another user's folder": (
            their_folder / "new.img",
            f"{their_folder} belongs to uid {STRANGER}",
        ),
        "missing, in a folder anyone can write": (
            open_folder / "new.img",
            f"{open_folder} is writable by every user",
        ),
    }


def tree(path: Path) -> list[tuple[str, int]]:
    """Every entry below ``path``, with its owner: what a refused request must leave as is."""
    return sorted((str(p), p.lstat().st_uid) for p in path.rglob("*"))


def test_an_image_another_user_could_reach_is_refused_and_nothing_is_made(
    make_domain: Callable[..., str], tmp_path: Path
) -> None:
    """A symlinked or foreign image, or one in a folder another user may change, would let
    that user read and write the guest's disk: create (--dry-run or not) and block-attach
    refuse it as bad input (exit 2), naming the entry and why, and make nothing."""
    running = make_domain()
    configs = tmp_path / "configs"
    configs.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    for case, (target, reason) in images_another_user_could_reach(images).items():
        config = configs / f"{case.replace(' ', '-').replace(',', '')}.yaml"
        config.write_text(f"name: refused\ndisk:\n{disk(target, size='16M')}")
        before = tree(images)

        for command in (("create", "--dry-run", str(config)), ("create", str(config))):
            result = hyperctl(*command, check=False)
            assert result.status == 2, (case, command, result)
            assert f"{config}: disk.0.target: {target}" in result.err, (case, result.err)
            assert reason in result.err, (case, result.err)
        assert domain_info("refused") is None, case

        attach = hyperctl(
            "block-attach", running, f"target={target},size=16M,vdev=xvdb", check=False
        )
        assert attach.status == 2, (case, attach)
        assert f"diskspec: target: {target}" in attach.err and reason in attach.err, case
        assert [v["vdev"] for v in vbds(running)] == [], case
        assert tree(images) == before, f"{case}: nothing made, nothing changed"
