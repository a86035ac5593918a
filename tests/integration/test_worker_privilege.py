"""A backend's data-path workers hold no host privilege (backends/privilege.py).

Each worker parses memory a domU writes, in Python or in native code: were it subverted, it
must not be host root. So every thread of every worker runs as a uid of its own, never 0, and
its domain's gid (no more than the domain can open: backends/privilege.py), with no capability in
any set (the bounding set too) and no new privileges; it is not dumpable; it has a network
namespace of its own, empty; and the only fds it shares with dom0 are its device and its
counter page. With all that, its device still carries traffic (through the native pumps where
they are built), and a worker killed mid-way is restarted the same way.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from channels import pumps
from channels.ids import host_gid
from tests.integration.conftest import domain_info, hyperctl, wait_for
from tests.integration.test_block import disk
from tests.integration.test_faults import dom0_pid
from tests.integration.test_network import vif

pytestmark = pytest.mark.root

CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def workers(name: str) -> dict[str, int | None]:
    """Domain ``name``'s data-path workers, by device: ``vif0``, ``xvda``, ..."""
    vifs = json.loads(hyperctl("network-list", "--json", name).out)
    vbds = json.loads(hyperctl("block-list", "--json", name).out)
    found = {f"vif{v['devid']}": v["worker_pid"] for v in vifs}
    found.update({v["vdev"]: v["worker_pid"] for v in vbds})
    return found


def domid_of(name: str) -> int:
    info = domain_info(name)
    assert info is not None, f"no domain {name}"
    return int(info["domid"])


def thread_statuses(pid: int) -> list[dict[str, str]]:
    """The /proc status of every thread of process ``pid``."""
    statuses = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        lines = (task / "status").read_text().splitlines()
        statuses.append({k: v.strip() for k, _, v in (line.partition(":") for line in lines)})
    return statuses


def assert_holds_no_privilege(device: str, domid: int, pid: int | None) -> int:
    """Every thread of worker ``pid``: one nonzero uid throughout (real, effective, saved, file
    system), its domain's host gid, no supplementary group, every capability set empty,
    no-new-privs set; the process is not dumpable, and in network and IPC namespaces of its
    own, with no interface but its loopback. Its uid."""
    assert isinstance(pid, int), f"{device}: no worker runs"
    statuses = thread_statuses(pid)
    assert len(statuses) >= 2, f"{device}: its data-path threads run"
    uid = statuses[0]["Uid"].split()[0]
    for status in statuses:
        where = f"{device} worker {pid}, thread {status['Name']}"
        assert status["Uid"].split() == [uid] * 4 and uid != "0", f"{where}: Uid {status['Uid']}"
        assert status["Gid"].split() == [str(host_gid(domid))] * 4, f"{where}: {status['Gid']}"
        assert status["Groups"] == "", f"{where}: Groups {status['Groups']}"
        for name in CAPABILITY_SETS:
            assert int(status[name], 16) == 0, f"{where}: {name} {status[name]}"
        assert status["NoNewPrivs"] == "1", f"{where}: NoNewPrivs {status['NoNewPrivs']}"
    # Not dumpable: the files of its /proc entry are root's; no process of its uid may ptrace
    # it or read its memory.
    assert Path(f"/proc/{pid}/status").stat().st_uid == 0, f"{device}: dumpable"
    dom0 = dom0_pid()
    for ns in ("net", "ipc"):  # of its own: no network, no host service to reach
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/{dom0}/ns/{ns}"), ns
    links = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in links] == ["lo"], f"{device}: {links}"
    return int(uid)


def open_files(pid: int) -> dict[int, tuple[str, tuple[int, int]]]:
    """Process ``pid``'s fds: what each names, and its (device, inode)."""
    files = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with_target = os.readlink(fd), os.stat(fd)
        files[int(fd.name)] = (with_target[0], (with_target[1].st_dev, with_target[1].st_ino))
    return files


def native_pumps(pid: int) -> int:
    """How many native pumps (channels/native) worker ``pid`` has made: each has an eventfd
    to be stopped with, which nothing else in a worker opens."""
    return sum(target == "anon_inode:[eventfd]" for target, _ in open_files(pid).values())


def assert_shares_only_its_device_with_dom0(device: str, domid: int, pid: int) -> None:
    """What the worker holds that dom0 holds too (the same file) is its native device (a TAP
    queue, a loop device), its counter page, its domain's doorbells (each a FIFO, which dom0's
    end of the channel holds open too) and /dev/null: never dom0's hypercall socket, its store,
    its toolstack socket or its log. Besides, it holds /dev/null as stdin, two sockets of
    its own (its output, its link to dom0), pipes and event fds of its own (the native pumps'
    eventfds and epoll), its domain's grant pools (Python's mmap keeps an fd of each
    mapping) and doorbells, nothing else."""
    device_file = "/dev/net/tun" if device.startswith("vif") else "/dev/loop"
    counters = "/memfd:hyper-counters (deleted)"
    dom0 = {inode for _, inode in open_files(dom0_pid() or 0).values()}
    files = open_files(pid)
    shared = {target for target, inode in files.values() if inode in dom0}
    doorbells = f"/dev/shm/fifo.hyper.d{domid}."
    others = {t for t in shared if not t.startswith((device_file, doorbells))}
    assert others <= {counters, "/dev/null"}, shared
    assert files[0][0] == "/dev/null", f"{device}: stdin {files[0][0]}"
    pools = f"/dev/shm/hyper.d{domid}.gnt"
    kinds = {target.split(":")[0] if ":[" in target else target for target, _ in files.values()}
    others = {k for k in kinds if not k.startswith((device_file, pools, doorbells))}
    own = {"/dev/null", "socket", "pipe", "anon_inode", counters}
    assert others <= own, f"{device}: holds {kinds}"
    sockets = {inode for target, inode in files.values() if target.startswith("socket:")}
    assert len(sockets) == 2, f"{device}: {len(sockets)} sockets"


def test_every_data_path_worker_holds_no_privilege_and_its_device_carries_traffic(
    make_domain: Callable[..., str], lan: tuple[str, str], tmp_path: Path
) -> None:
    bridge, net = lan
    a = make_domain(vif(bridge, f"{net}.2") + "disk:\n" + disk(tmp_path / "a.img", size="64M"))
    b = make_domain(vif(bridge, f"{net}.3"))
    uids = {}
    for name in (a, b):
        domid = domid_of(name)
        for device, pid in workers(name).items():
            uids[f"{name} {device}"] = assert_holds_no_privilege(device, domid, pid)
            assert_shares_only_its_device_with_dom0(device, domid, pid or 0)
    assert len(uids) == 3, f"a vif each, and a's disk: {uids}"
    for name in (a, b):  # where they are built, the native pumps run in these workers
        for device, pid in workers(name).items():
            kind = pumps.NETPUMP if device.startswith("vif") else pumps.BLKPUMP
            if pumps.native(kind) is not None:
                assert native_pumps(pid or 0) >= 1, f"{name} {device}: no native pump runs"

    assert hyperctl("exec", a, "--", "ping", "-c", "3", "-W", "5", f"{net}.3").status == 0
    dd = ["dd", "if=/dev/urandom", "of=/dev/xvda", "bs=1M", "count=8", "oflag=direct"]
    assert "8388608 bytes" in hyperctl("exec", a, "--", *dd, "conv=fsync,notrunc").err
    read = ["dd", "if=/dev/xvda", "of=/dev/null", "bs=1M", "count=8", "iflag=direct"]
    assert "8388608 bytes" in hyperctl("exec", a, "--", *read).err


def test_a_worker_restarted_after_a_crash_drops_its_privilege_too(
    make_domain: Callable[..., str], lan: tuple[str, str], tmp_path: Path
) -> None:
    bridge, net = lan
    a = make_domain(vif(bridge, f"{net}.2") + "disk:\n" + disk(tmp_path / "a.img", size="64M"))
    make_domain(vif(bridge, f"{net}.3"))
    first = workers(a)
    for device, pid in first.items():
        assert pid is not None, f"{device}: no worker runs"
        os.kill(pid, signal.SIGKILL)

        def restarted(device: str = device, pid: int = pid) -> bool:
            return workers(a).get(device) not in (None, pid)

        wait_for(restarted, 10, f"{device}'s data path to restart")
    for device, pid in workers(a).items():
        assert_holds_no_privilege(device, domid_of(a), pid)
        assert_shares_only_its_device_with_dom0(device, domid_of(a), pid or 0)

    assert hyperctl("exec", a, "--", "ping", "-c", "3", "-W", "5", f"{net}.3").status == 0
    dd = ["dd", "if=/dev/zero", "of=/dev/xvda", "bs=1M", "count=8", "oflag=direct"]
    assert "8388608 bytes" in hyperctl("exec", a, "--", *dd, "conv=fsync,notrunc").err
