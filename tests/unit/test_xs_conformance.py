"""Store conformance: one suite of client-visible XenStore behaviour, run over every transport.

Each test gets ``xs``, a fresh Store reached through one transport from TRANSPORTS. A transport
is a function ``(store, domid) -> Link`` where a Link has ``.client`` (an XsClient acting as
``domid``) and ``.close()``. Adding a transport (the XenStore byte ring, say) is one entry in
TRANSPORTS; every test below then runs over it too.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from channels.xenbus import (
    INTRODUCE_DOMAIN_WATCH,
    RELEASE_DOMAIN_WATCH,
    backend_path,
    backend_perms,
    domain_name_path,
    domain_path,
    frontend_path,
    frontend_perms,
    guest_rw_perms,
    home_perms,
    state_path,
)
from channels.xs import (
    Transaction,
    WatchQueue,
    XsClient,
    XsConnectionLost,
    XsError,
    XsStreamTransport,
)
from channels.xs_wire import Perm
from tests.unit.ringlink import ByteRingLink
from xenstored import Quota, Store, StreamConnection, connect_local

TIMEOUT = 5.0


class Link(Protocol):
    client: XsClient

    def close(self) -> None: ...


class SocketPairLink:
    """A client and a store connection on the two ends of a socketpair, each with its threads."""

    def __init__(self, store: Store, domid: int) -> None:
        server_sock, client_sock = socket.socketpair()
        self.server = StreamConnection(store, domid, server_sock)
        self.transport = XsStreamTransport(client_sock, timeout=TIMEOUT)
        self.client = self.transport.client

    def close(self) -> None:
        self.transport.close()
        self.server.close()


TRANSPORTS: dict[str, Callable[[Store, int], Link]] = {
    "in-process": lambda store, domid: connect_local(store, domid, timeout=TIMEOUT),
    "socketpair": SocketPairLink,
    "byte-ring": ByteRingLink,
}


class Harness:
    """A store plus clients over one transport; ``domain(n)`` sets up a home like the toolstack."""

    def __init__(self, transport: Callable[[Store, int], Link]) -> None:
        self.store = Store()
        self._transport = transport
        self._links: list[Link] = []
        self.dom0 = self.client(0)

    def client(self, domid: int) -> XsClient:
        link = self._transport(self.store, domid)
        self._links.append(link)
        return link.client

    def domain(self, domid: int) -> XsClient:
        """Home owned by dom0 readable by the guest, a ``name``, and a guest-owned ``data`` dir."""
        home = domain_path(domid)
        self.dom0.mkdir(home)
        self.dom0.set_perms(home, home_perms(domid))
        self.dom0.write(domain_name_path(domid), f"dom{domid}")
        self.dom0.mkdir(f"{home}/data")
        self.dom0.set_perms(f"{home}/data", guest_rw_perms(domid))
        self.dom0.introduce(domid)
        return self.client(domid)

    def close(self) -> None:
        for link in self._links:
            link.close()


@pytest.fixture(params=sorted(TRANSPORTS))
def xs(request: pytest.FixtureRequest) -> Iterator[Harness]:
    harness = Harness(TRANSPORTS[request.param])
    yield harness
    harness.close()


def errno_of(call: Callable[[], object]) -> str:
    """Run ``call``, which must fail with XsError, and return the errno name."""
    with pytest.raises(XsError) as info:
        call()
    return info.value.errno_name


# -- nodes ---------------------------------------------------------------------------------------


def test_write_then_read_returns_the_value_and_creates_parents(xs: Harness) -> None:
    xs.dom0.write("/tool/test/a/b", "hello")

    assert xs.dom0.read("/tool/test/a/b") == "hello"
    assert xs.dom0.read("/tool/test/a") == ""
    assert xs.dom0.directory("/tool/test") == ["a"]


def test_values_are_bytes_and_round_trip_exactly(xs: Harness) -> None:
    value = bytes(range(256))
    xs.dom0.write("/tool/blob", value)

    assert xs.dom0.read_bytes("/tool/blob") == value


def test_read_of_a_missing_node_is_enoent(xs: Harness) -> None:
    assert errno_of(lambda: xs.dom0.read("/tool/nothing")) == "ENOENT"
    assert xs.dom0.read_optional("/tool/nothing") is None


def test_mkdir_creates_an_empty_node_and_is_idempotent(xs: Harness) -> None:
    xs.dom0.mkdir("/tool/dir")
    xs.dom0.write("/tool/dir/child", "1")
    xs.dom0.mkdir("/tool/dir")

    assert xs.dom0.read("/tool/dir") == ""
    assert xs.dom0.directory("/tool/dir") == ["child"]


def test_directory_lists_children_sorted(xs: Harness) -> None:
    for name in ("c", "a", "b"):
        xs.dom0.write(f"/tool/list/{name}", name)

    assert xs.dom0.directory("/tool/list") == ["a", "b", "c"]


def test_store_starts_with_its_skeleton(xs: Harness) -> None:
    assert xs.dom0.directory("/") == ["local", "tool", "vm"]
    assert xs.dom0.directory("/local") == ["domain"]
    assert xs.dom0.get_perms("/local/domain") == [Perm(0, "n")]


def test_relative_paths_are_under_the_callers_home(xs: Harness) -> None:
    domu = xs.domain(7)
    domu.write("data/x", "42")

    assert xs.dom0.read("/local/domain/7/data/x") == "42"
    assert domu.read("name") == "dom7"
    assert domu.get_domain_path(7) == "/local/domain/7"


def test_xs_error_names_the_errno_and_the_path(xs: Harness) -> None:
    with pytest.raises(XsError) as info:
        xs.dom0.read("/tool/missing/node")

    assert info.value.errno_name == "ENOENT"
    assert info.value.path == "/tool/missing/node"
    assert "/tool/missing/node" in str(info.value)


# -- rm ------------------------------------------------------------------------------------------


def test_rm_removes_the_whole_subtree(xs: Harness) -> None:
    xs.dom0.write("/tool/tree/a/b/c", "1")
    xs.dom0.write("/tool/tree/a/d", "2")
    xs.dom0.write("/tool/tree/keep", "3")

    xs.dom0.rm("/tool/tree/a")

    assert xs.dom0.directory("/tool/tree") == ["keep"]
    assert errno_of(lambda: xs.dom0.read("/tool/tree/a/b/c")) == "ENOENT"


def test_rm_of_an_absent_node_is_ok_when_its_parent_exists(xs: Harness) -> None:
    xs.dom0.mkdir("/tool/parent")

    xs.dom0.rm("/tool/parent/absent")

    assert errno_of(lambda: xs.dom0.rm("/tool/no-parent/absent")) == "ENOENT"


def test_rm_of_the_root_is_refused(xs: Harness) -> None:
    assert errno_of(lambda: xs.dom0.rm("/")) == "EINVAL"


# -- permissions ---------------------------------------------------------------------------------


def test_a_domu_cannot_read_another_domus_home(xs: Harness) -> None:
    dom1 = xs.domain(1)
    xs.domain(2)

    assert dom1.read("/local/domain/1/name") == "dom1"
    assert errno_of(lambda: dom1.read("/local/domain/2/name")) == "EACCES"
    assert errno_of(lambda: dom1.directory("/local/domain/2")) == "EACCES"
    assert errno_of(lambda: dom1.read("/local/domain/2/data")) == "EACCES"
    # Whether a node exists is hidden too: a missing one is EACCES, not ENOENT.
    assert errno_of(lambda: dom1.read("/local/domain/2/no-such-node")) == "EACCES"
    assert errno_of(lambda: dom1.directory("/local/domain")) == "EACCES"


def test_a_domu_cannot_write_its_read_only_home(xs: Harness) -> None:
    dom1 = xs.domain(1)

    assert errno_of(lambda: dom1.write("name", "evil")) == "EACCES"
    assert errno_of(lambda: dom1.write("memory/target", "1")) == "EACCES"
    assert dom1.read("name") == "dom1"


def test_a_domu_cannot_write_a_backend_directory(xs: Harness) -> None:
    dom1 = xs.domain(1)
    backend = backend_path(0, "vif", 1, 0)
    xs.dom0.write(state_path(backend), "1")
    for path in (backend, state_path(backend)):
        xs.dom0.set_perms(path, backend_perms(0, 1))

    assert dom1.read(state_path(backend)) == "1"
    assert errno_of(lambda: dom1.write(state_path(backend), "4")) == "EACCES"
    assert errno_of(lambda: dom1.write(f"{backend}/evil", "1")) == "EACCES"
    assert errno_of(lambda: dom1.mkdir(f"{backend}/evil")) == "EACCES"
    assert errno_of(lambda: dom1.rm(backend)) == "EACCES"
    assert errno_of(lambda: dom1.set_perms(backend, [Perm(1, "b")])) == "EACCES"
    assert errno_of(lambda: dom1.write("/local/domain/0/backend/vbd/1/0/x", "1")) == "EACCES"
    assert xs.dom0.read(state_path(backend)) == "1"
    assert xs.dom0.directory(backend) == ["state"]


def test_a_domu_writes_its_frontend_dir_and_its_backend_can_read_it(xs: Harness) -> None:
    dom1 = xs.domain(1)
    driver = xs.domain(2)  # a driver domain serving dom1
    frontend = frontend_path(1, "vif", 0)
    xs.dom0.mkdir(frontend)
    xs.dom0.set_perms(frontend, frontend_perms(1, 2))

    dom1.write(f"{frontend}/ring-ref", "8")

    assert dom1.get_perms(f"{frontend}/ring-ref") == [Perm(1, "n"), Perm(2, "r")]
    assert driver.read(f"{frontend}/ring-ref") == "8"
    assert errno_of(lambda: driver.write(f"{frontend}/ring-ref", "9")) == "EACCES"


def test_a_new_node_inherits_perms_with_an_unprivileged_creator_as_owner(xs: Harness) -> None:
    dom1 = xs.domain(1)
    dom2 = xs.domain(2)
    xs.dom0.mkdir("/tool/shared")
    xs.dom0.set_perms("/tool/shared", [Perm(0, "r"), Perm(1, "b")])

    dom1.write("/tool/shared/by-dom1", "x")
    xs.dom0.write("/tool/shared/by-dom0", "y")

    assert dom1.get_perms("/tool/shared/by-dom1") == [Perm(1, "r"), Perm(1, "b")]
    assert xs.dom0.get_perms("/tool/shared/by-dom0") == [Perm(0, "r"), Perm(1, "b")]
    # The owner's letter is the default: dom2, unlisted, may read but not write.
    assert dom2.read("/tool/shared/by-dom1") == "x"
    assert errno_of(lambda: dom2.write("/tool/shared/by-dom1", "z")) == "EACCES"


def test_creating_a_node_needs_write_access_to_the_nearest_existing_ancestor(xs: Harness) -> None:
    dom1 = xs.domain(1)

    assert errno_of(lambda: dom1.write("/tool/x/y/z", "1")) == "EACCES"
    dom1.write("data/deep/er/node", "1")
    assert dom1.get_perms("data/deep/er") == [Perm(1, "n")]


def test_only_the_owner_sets_perms_and_only_dom0_changes_the_owner(xs: Harness) -> None:
    dom1 = xs.domain(1)
    dom2 = xs.domain(2)
    node = "/local/domain/1/data/node"
    dom1.write(node, "v")
    dom1.set_perms(node, [Perm(1, "n"), Perm(2, "b")])

    assert dom2.read(node) == "v"
    assert errno_of(lambda: dom2.set_perms(node, [Perm(1, "b")])) == "EACCES"
    assert errno_of(lambda: dom1.set_perms(node, [Perm(2, "n")])) == "EPERM"

    xs.dom0.set_perms(node, [Perm(2, "n")])

    assert errno_of(lambda: dom1.set_perms(node, [Perm(1, "n")])) == "EACCES"
    assert dom2.get_perms(node) == [Perm(2, "n")]


def test_dom0_bypasses_permission_checks(xs: Harness) -> None:
    dom1 = xs.domain(1)
    dom1.write("data/private", "secret")

    assert xs.dom0.read("/local/domain/1/data/private") == "secret"
    xs.dom0.write("/local/domain/1/data/private", "changed")
    assert dom1.read("data/private") == "changed"


# -- watches -------------------------------------------------------------------------------------


def test_a_watch_fires_on_registration_and_on_a_child_change(xs: Harness) -> None:
    watch = xs.dom0.watch("/tool/w", token="my-token")

    first = watch.get(TIMEOUT)
    xs.dom0.write("/tool/w/child", "1")
    second = watch.get(TIMEOUT)

    assert (first.path, first.token) == ("/tool/w", "my-token")
    assert (second.path, second.token) == ("/tool/w/child", "my-token")


def test_removing_an_ancestor_fires_the_watched_path(xs: Harness) -> None:
    xs.dom0.write("/tool/a/b/c", "1")
    deep = xs.dom0.watch("/tool/a/b/c")
    top = xs.dom0.watch("/tool/a")
    assert deep.get(TIMEOUT).path == "/tool/a/b/c"
    assert top.get(TIMEOUT).path == "/tool/a"

    xs.dom0.rm("/tool/a/b")

    assert deep.get(TIMEOUT).path == "/tool/a/b/c"
    assert top.get(TIMEOUT).path == "/tool/a/b"


def test_a_permission_change_fires_the_watch(xs: Harness) -> None:
    xs.dom0.write("/tool/p", "1")
    watch = xs.dom0.watch("/tool/p")
    watch.get(TIMEOUT)

    xs.dom0.set_perms("/tool/p", [Perm(0, "r")])

    assert watch.get(TIMEOUT).path == "/tool/p"


def test_a_watch_skips_changes_its_domain_cannot_read(xs: Harness) -> None:
    dom1 = xs.domain(1)
    xs.domain(2)
    events = WatchQueue()
    dom1.watch("/local/domain/2", queue=events)
    dom1.watch("data", queue=events)
    assert {events.get(TIMEOUT).path for _ in range(2)} == {"/local/domain/2", "data"}

    xs.dom0.write("/local/domain/2/data/secret", "1")
    xs.dom0.rm("/local/domain/2/data/secret")
    xs.dom0.write("/local/domain/1/data/sentinel", "1")

    # Events reach a connection in order: the first one after registration is the sentinel.
    assert events.get(TIMEOUT).path == "data/sentinel"


def test_a_relative_watch_reports_relative_paths(xs: Harness) -> None:
    dom1 = xs.domain(1)
    watch = dom1.watch("data")

    registration = watch.get(TIMEOUT)
    dom1.write("data/x", "1")

    assert registration.path == "data"
    assert watch.get(TIMEOUT).path == "data/x"


def test_watch_depth_limits_how_deep_changes_fire(xs: Harness) -> None:
    events = WatchQueue()
    xs.dom0.watch("/tool/d", queue=events, depth=1)
    assert events.get(TIMEOUT).path == "/tool/d"

    xs.dom0.write("/tool/d/one/two", "too deep")
    xs.dom0.write("/tool/d/one", "shallow")

    assert events.get(TIMEOUT).path == "/tool/d/one"


def test_unwatch_stops_the_events(xs: Harness) -> None:
    events = WatchQueue()
    gone = xs.dom0.watch("/tool/gone", queue=events)
    xs.dom0.watch("/tool/sentinel", queue=events)
    assert {events.get(TIMEOUT).path for _ in range(2)} == {"/tool/gone", "/tool/sentinel"}

    gone.unwatch()
    xs.dom0.write("/tool/gone/x", "1")
    xs.dom0.write("/tool/sentinel", "1")

    assert events.get(TIMEOUT).path == "/tool/sentinel"
    assert errno_of(gone.unwatch) == "ENOENT"


def test_special_watches_fire_on_introduce_and_release(xs: Harness) -> None:
    introduced = xs.dom0.watch(INTRODUCE_DOMAIN_WATCH)
    released = xs.dom0.watch(RELEASE_DOMAIN_WATCH)
    assert introduced.get(TIMEOUT).path == INTRODUCE_DOMAIN_WATCH
    assert released.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH

    xs.dom0.introduce(5)
    assert introduced.get(TIMEOUT).path == INTRODUCE_DOMAIN_WATCH
    xs.dom0.release(5)
    assert released.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH


# -- transactions --------------------------------------------------------------------------------


def test_a_transaction_sees_its_writes_and_others_see_them_after_commit(xs: Harness) -> None:
    other = xs.client(0)
    xs.dom0.write("/tool/tx/a", "old")
    tx = xs.dom0.transaction_start()

    tx.write("/tool/tx/a", "new")
    tx.write("/tool/tx/b", "created")

    assert tx.read("/tool/tx/a") == "new"
    assert other.read("/tool/tx/a") == "old"
    assert other.read_optional("/tool/tx/b") is None
    xs.dom0.transaction_end(tx)
    assert other.read("/tool/tx/a") == "new"
    assert other.directory("/tool/tx") == ["a", "b"]


def test_an_aborted_transaction_changes_nothing(xs: Harness) -> None:
    tx = xs.dom0.transaction_start()
    tx.write("/tool/aborted", "1")
    tx.rm("/tool")

    xs.dom0.transaction_end(tx, commit=False)

    assert xs.dom0.read_optional("/tool/aborted") is None
    assert xs.dom0.directory("/") == ["local", "tool", "vm"]


def test_a_conflicting_concurrent_write_makes_the_commit_fail_with_eagain(xs: Harness) -> None:
    dom1 = xs.domain(1)
    other = xs.client(0)
    dom1.write("data/counter", "0")
    tx = dom1.transaction_start()
    assert tx.read("data/counter") == "0"
    tx.write("data/counter", "1")

    other.write("/local/domain/1/data/counter", "5")

    assert errno_of(lambda: dom1.transaction_end(tx)) == "EAGAIN"
    assert dom1.read("data/counter") == "5"


def test_the_retry_helper_starts_over_after_eagain_and_then_commits(xs: Harness) -> None:
    dom1 = xs.domain(1)
    other = xs.client(0)
    dom1.write("data/counter", "0")
    seen: list[int] = []

    def increment(tx: Transaction) -> int:
        value = int(tx.read("data/counter"))
        seen.append(value)
        if len(seen) == 1:
            other.write("/local/domain/1/data/counter", "10")  # conflicts with this attempt
        tx.write("data/counter", str(value + 1))
        return value + 1

    result = dom1.transaction(increment)

    assert seen == [0, 10]
    assert result == 11
    assert dom1.read("data/counter") == "11"


def test_a_new_child_conflicts_with_a_transaction_that_listed_the_directory(xs: Harness) -> None:
    xs.dom0.mkdir("/tool/devices")
    tx = xs.dom0.transaction_start()
    assert tx.directory("/tool/devices") == []
    tx.write("/tool/summary", "0 devices")

    xs.client(0).write("/tool/devices/vif0", "1")

    assert errno_of(lambda: xs.dom0.transaction_end(tx)) == "EAGAIN"
    assert xs.dom0.read_optional("/tool/summary") is None


def test_transaction_changes_fire_watches_on_commit_only(xs: Harness) -> None:
    xs.dom0.mkdir("/tool/txw")  # so the transaction and the sentinel share no node
    xs.dom0.mkdir("/tool/sentinel")
    events = WatchQueue()
    xs.dom0.watch("/tool/txw", queue=events)
    xs.dom0.watch("/tool/sentinel", queue=events)
    assert {events.get(TIMEOUT).path for _ in range(2)} == {"/tool/txw", "/tool/sentinel"}
    tx = xs.dom0.transaction_start()

    tx.write("/tool/txw/key", "1")
    xs.dom0.write("/tool/sentinel", "1")
    assert events.get(TIMEOUT).path == "/tool/sentinel"
    xs.dom0.transaction_end(tx)

    assert events.get(TIMEOUT).path == "/tool/txw/key"


def test_rm_inside_a_transaction_takes_effect_on_commit(xs: Harness) -> None:
    xs.dom0.write("/tool/rmtx/a", "1")
    tx = xs.dom0.transaction_start()

    tx.rm("/tool/rmtx/a")

    assert errno_of(lambda: tx.read("/tool/rmtx/a")) == "ENOENT"
    assert xs.dom0.read("/tool/rmtx/a") == "1"
    xs.dom0.transaction_end(tx)
    assert xs.dom0.directory("/tool/rmtx") == []


def test_an_unknown_transaction_id_is_enoent(xs: Harness) -> None:
    bogus = Transaction(xs.dom0, 999_999)

    assert errno_of(lambda: bogus.read("/tool")) == "ENOENT"
    assert errno_of(lambda: xs.dom0.transaction_end(bogus)) == "ENOENT"


# -- quotas --------------------------------------------------------------------------------------


def test_node_quota_refuses_one_domu_while_another_domu_writes(xs: Harness) -> None:
    xs.store.set_quota(1, Quota(nodes=6))
    dom1 = xs.domain(1)
    dom2 = xs.domain(2)
    room = 6 - xs.store.node_count(1)

    for i in range(room):
        dom1.write(f"data/n{i}", "x")

    assert errno_of(lambda: dom1.write("data/one-too-many", "x")) == "ENOSPC"
    for i in range(room + 5):
        dom2.write(f"data/n{i}", "x")
    assert len(dom2.directory("data")) == room + 5
    assert len(dom1.directory("data")) == room


def test_node_quota_holds_for_the_nodes_one_request_or_one_commit_makes(xs: Harness) -> None:
    xs.store.set_quota(1, Quota(nodes=6))
    dom1 = xs.domain(1)
    room = 6 - xs.store.node_count(1)
    tx = dom1.transaction_start()
    for i in range(room + 1):
        tx.write(f"data/n{i}", "x")  # the transaction may hold them, the domain may not own them

    assert errno_of(lambda: dom1.transaction_end(tx)) == "ENOSPC"
    assert errno_of(lambda: dom1.write("data/" + "/".join("abcdefg"), "x")) == "ENOSPC"
    assert dom1.directory("data") == []
    assert xs.store.node_count(1) == 6 - room


def test_dom0_is_exempt_from_quotas(xs: Harness) -> None:
    xs.store.set_quota(0, Quota(nodes=1, value_size=1))

    for i in range(5):
        xs.dom0.write(f"/tool/many/n{i}", "a long value")

    assert len(xs.dom0.directory("/tool/many")) == 5


def test_value_size_quota_is_enospc(xs: Harness) -> None:
    xs.store.set_quota(1, Quota(value_size=8))
    dom1 = xs.domain(1)

    dom1.write("data/small", "12345678")
    assert errno_of(lambda: dom1.write("data/big", "123456789")) == "ENOSPC"


def test_watch_quota_is_e2big(xs: Harness) -> None:
    xs.store.set_quota(1, Quota(watches=2))
    dom1 = xs.domain(1)
    dom1.watch("data/a")
    dom1.watch("data/b")

    assert errno_of(lambda: dom1.watch("data/c")) == "E2BIG"


def test_transaction_quota_is_enospc(xs: Harness) -> None:
    xs.store.set_quota(1, Quota(transactions=2))
    dom1 = xs.domain(1)
    first = dom1.transaction_start()
    dom1.transaction_start()

    assert errno_of(dom1.transaction_start) == "ENOSPC"
    dom1.transaction_end(first, commit=False)
    dom1.transaction_start()


def test_memory_quota_counts_names_values_and_permissions_and_is_enospc(xs: Harness) -> None:
    dom1 = xs.domain(1)
    dom2 = xs.domain(2)
    base = xs.store.memory_used(1)
    xs.store.set_quota(1, Quota(memory=base + 2040))
    others = [Perm(12345, "r")] * 4  # 4 entries of "r12345" and a NUL: 28 bytes

    dom1.write("data/big", "v" * 2000)

    assert xs.store.memory_used(1) == base + len("/local/domain/1/data/big") + 2000 + len("n1\0")
    assert errno_of(lambda: dom1.write("data/more", "v" * 100)) == "ENOSPC"
    assert errno_of(lambda: dom1.write("data/big", "v" * 2048)) == "ENOSPC"
    assert errno_of(lambda: dom1.set_perms("data/big", [Perm(1, "n"), *others])) == "ENOSPC"
    assert dom1.read_optional("data/more") is None
    dom1.write("data/big", "w" * 2000)  # the same size: no more than it has
    dom2.write("data/more", "v" * 100)  # another domain's quota is its own
    dom1.rm("data/big")
    dom1.write("data/more", "v" * 100)


def test_memory_quota_holds_at_commit_and_bounds_what_a_transaction_holds(xs: Harness) -> None:
    dom1 = xs.domain(1)
    xs.store.set_quota(1, Quota(memory=xs.store.memory_used(1) + 3000))
    dom1.write("data/live", "v" * 1500)
    tx = dom1.transaction_start()
    tx.write("data/held", "v" * 1500)  # the transaction may hold it, the domain may not own it

    assert errno_of(lambda: dom1.transaction_end(tx)) == "ENOSPC"
    assert dom1.read_optional("data/held") is None
    tx = dom1.transaction_start()
    tx.write("data/a", "v" * 2000)
    assert errno_of(lambda: tx.write("data/b/c/d", "v" * 2000)) == "ENOSPC"
    assert errno_of(lambda: tx.read("data/b")) == "ENOENT"  # the refused write left nothing


def test_a_domains_open_transactions_hold_at_most_its_memory_quota_together(
    xs: Harness,
) -> None:
    dom1 = xs.domain(1)
    xs.store.set_quota(1, Quota(memory=5000))
    first = dom1.transaction_start()
    first.write("data/a", "v" * 2000)
    second = dom1.transaction_start()
    second.write("data/b", "v" * 2000)

    assert errno_of(lambda: second.write("data/c", "v" * 2000)) == "ENOSPC"
    dom1.transaction_end(first, commit=False)
    second.write("data/c", "v" * 2000)  # what the first held is free again
    dom1.transaction_end(second)
    assert dom1.read("data/c") == "v" * 2000


def test_dom0_may_write_past_a_domus_memory_quota(xs: Harness) -> None:
    dom1 = xs.domain(1)
    xs.store.set_quota(1, Quota(memory=xs.store.memory_used(1) + 100))

    xs.dom0.write("/local/domain/1/data/from-dom0", "v" * 2000)  # owned by domain 1

    assert dom1.read("data/from-dom0") == "v" * 2000


# -- domains -------------------------------------------------------------------------------------


def test_introduce_and_release_are_for_dom0_only(xs: Harness) -> None:
    dom1 = xs.domain(1)

    assert xs.dom0.is_domain_introduced(1)
    assert not xs.dom0.is_domain_introduced(9)
    assert errno_of(lambda: dom1.introduce(9)) == "EACCES"
    assert errno_of(lambda: dom1.release(1)) == "EACCES"
    assert errno_of(lambda: xs.dom0.release(9)) == "ENOENT"


def test_release_removes_the_domains_nodes_and_fires_release_domain(xs: Harness) -> None:
    dom1 = xs.domain(1)
    dom1.write("data/state", "4")
    frontend = frontend_path(1, "vif", 0)
    xs.dom0.mkdir(frontend)
    xs.dom0.set_perms(frontend, frontend_perms(1, 0))
    dom1.write(f"{frontend}/ring-ref", "8")
    released = xs.dom0.watch(RELEASE_DOMAIN_WATCH)
    assert released.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH

    xs.dom0.release(1)

    assert released.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH
    assert xs.dom0.read_optional("/local/domain/1/data") is None
    assert xs.dom0.read_optional(frontend) is None
    assert xs.dom0.read("/local/domain/1/name") == "dom1"  # dom0 owns the home itself
    assert xs.store.node_count(1) == 0
    assert not xs.dom0.is_domain_introduced(1)
    with pytest.raises(XsConnectionLost):
        dom1.read("name")


def test_release_domain_fires_after_the_removal_of_the_domains_nodes(xs: Harness) -> None:
    dom1 = xs.domain(1)
    dom1.write("data/x", "1")
    events = WatchQueue()
    xs.dom0.watch("/local/domain/1/data", queue=events)
    xs.dom0.watch(RELEASE_DOMAIN_WATCH, queue=events)
    registered = {events.get(TIMEOUT).path, events.get(TIMEOUT).path}
    assert registered == {"/local/domain/1/data", RELEASE_DOMAIN_WATCH}

    xs.dom0.release(1)

    assert events.get(TIMEOUT).path == "/local/domain/1/data"
    assert events.get(TIMEOUT).path == RELEASE_DOMAIN_WATCH


# -- concurrency ---------------------------------------------------------------------------------


def test_one_client_serves_many_threads_and_matches_replies(xs: Harness) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(40):
                xs.dom0.write(f"/tool/threads/{n}/{i}", f"{n}-{i}")
                assert xs.dom0.read(f"/tool/threads/{n}/{i}") == f"{n}-{i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 4)

    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    assert len(xs.dom0.directory("/tool/threads")) == 8


def test_messages_larger_than_a_ring_cross_intact(xs: Harness) -> None:
    """A reply can be four times the 1 KiB xenstore ring: it must cross in pieces, whole."""
    dom1 = xs.domain(1)
    value = bytes(range(256)) * 8  # 2048 bytes, the value-size quota
    dom1.write("data/big", value)
    assert dom1.read_bytes("data/big") == value
    names = [f"child-{i:03d}-{'x' * 20}" for i in range(120)]  # a ~3.5 KiB directory reply
    for name in names:
        xs.dom0.write(f"/local/domain/1/data/many/{name}", "")
    assert sorted(dom1.directory("data/many")) == names
