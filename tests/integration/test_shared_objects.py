"""Objects two domUs share (a guest's device served by a driver domain): in /dev/shm for real,
opened by processes running as each domain's host ids.

The guest holds the object, with its group; the driver domain is named by an ACL entry and finds
the object in its own view. A third domain can open neither the object nor its links, and the
driver domain cannot change who may open it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from channels.ids import host_gid, uid_base
from hyperd.resources import Resources, bell_paths, shm_path, view_dir

pytestmark = pytest.mark.root

GUEST, DRIVER, STRANGER = 32001, 32002, 32003  # ids no test hypervisor reaches


@pytest.fixture
def domains() -> Iterator[dict[int, Resources]]:
    made = {domid: Resources(domid) for domid in (GUEST, DRIVER, STRANGER)}
    for resources in made.values():
        resources.open_view()
    yield made
    for resources in made.values():
        resources.release()
    assert not [view_dir(d) for d in made if view_dir(d).exists()]


def as_domain(domid: int, action: Callable[[], None]) -> int:
    """Run ``action`` in a child process with domain ``domid``'s kernel's host ids; 0 if it
    returned, else the errno it failed with."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setresgid(host_gid(domid), host_gid(domid), host_gid(domid))
            os.setresuid(uid_base(domid), uid_base(domid), uid_base(domid))
            action()
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def open_rw(path: Path) -> Callable[[], None]:
    return lambda: os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))


def test_a_segment_the_guest_shares_with_its_driver_domain(domains: dict[int, Resources]) -> None:
    guest = domains[GUEST]
    name = guest.new_segment("gnt0", 4096, peer=DRIVER)
    host = shm_path(name)
    assert (host.stat().st_uid, host.stat().st_gid) == (0, host_gid(GUEST))
    in_driver_view = view_dir(DRIVER) / host.name

    assert as_domain(GUEST, open_rw(view_dir(GUEST) / host.name)) == 0
    assert as_domain(DRIVER, open_rw(in_driver_view)) == 0
    assert as_domain(STRANGER, open_rw(host)) == errno.EACCES
    assert as_domain(STRANGER, open_rw(in_driver_view)) == errno.EACCES
    assert as_domain(DRIVER, lambda: os.chmod(in_driver_view, 0o666)) == errno.EPERM

    guest.drop_segment(name)
    assert not host.exists() and not in_driver_view.exists()
    assert guest.peers == {}, "a dropped object is no one's to open any more"


def test_a_doorbell_the_driver_domain_holds_and_the_guest_rings(
    domains: dict[int, Resources],
) -> None:
    driver = domains[DRIVER]
    name = driver.new_doorbell("evtchn1", peer=GUEST)
    for path in bell_paths(name):
        assert as_domain(GUEST, open_rw(view_dir(GUEST) / path.name)) == 0
        assert as_domain(DRIVER, open_rw(view_dir(DRIVER) / path.name)) == 0
        assert as_domain(STRANGER, open_rw(path)) == errno.EACCES
    assert driver.paths() >= {view_dir(GUEST) / p.name for p in bell_paths(name)}


def test_a_peer_that_died_first_leaves_nothing_for_the_holder_to_trip_on(
    domains: dict[int, Resources],
) -> None:
    guest = domains[GUEST]
    name = guest.new_segment("gnt0", 4096, peer=DRIVER)
    domains[DRIVER].release()  # its view goes, with the link in it
    guest.drop_segment(name)
    assert not shm_path(name).exists()
