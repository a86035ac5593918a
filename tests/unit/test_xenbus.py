"""XenBus states, the store path builders and the one path-syntax check."""

from __future__ import annotations

import threading

import pytest

from channels import xenbus as xb
from channels.xs import XsTimeoutError
from channels.xs_wire import Perm
from xenstored import Store, connect_local

TIMEOUT = 5.0


def test_states_have_xens_names_and_values() -> None:
    assert {s.name: s.value for s in xb.XenbusState} == {
        "Unknown": 0, "Initialising": 1, "InitWait": 2, "Initialised": 3, "Connected": 4,
        "Closing": 5, "Closed": 6, "Reconfiguring": 7, "Reconfigured": 8,
    }  # fmt: skip


def test_domain_paths() -> None:
    assert xb.domain_path(3) == "/local/domain/3"
    assert xb.domain_name_path(3) == "/local/domain/3/name"
    assert xb.domain_domid_path(3) == "/local/domain/3/domid"
    assert xb.domain_vm_path(3) == "/local/domain/3/vm"
    assert xb.control_shutdown_path(3) == "/local/domain/3/control/shutdown"
    assert xb.control_feature_path(3, "reboot") == "/local/domain/3/control/feature-reboot"
    assert xb.memory_target_path(3) == "/local/domain/3/memory/target"
    assert xb.memory_static_max_path(3) == "/local/domain/3/memory/static-max"
    assert xb.cpu_availability_path(3, 1) == "/local/domain/3/cpu/1/availability"
    assert xb.domain_error_path(3) == "/local/domain/3/error"


def test_device_paths() -> None:
    assert xb.frontend_path(3, "vif", 0) == "/local/domain/3/device/vif/0"
    assert xb.backend_path(0, "vbd", 3, 51712) == "/local/domain/0/backend/vbd/3/51712"
    assert xb.backend_type_path(0, "vif") == "/local/domain/0/backend/vif"
    assert xb.state_path("/local/domain/3/device/vif/0") == "/local/domain/3/device/vif/0/state"
    assert xb.error_path("/local/domain/3/device/vif/0") == "/local/domain/3/device/vif/0/error"
    assert xb.key_path("/x", xb.Key.BACKEND_ID) == "/x/backend-id"


def test_console_vm_and_toolstack_paths() -> None:
    assert xb.console_ring_ref_path(3) == "/local/domain/3/console/ring-ref"
    assert xb.console_port_path(3) == "/local/domain/3/console/port"
    assert xb.console_type_path(3) == "/local/domain/3/console/type"
    assert xb.console_backend_path(0, 3) == "/local/domain/0/backend/console/3/0"
    uuid = "6F1C2D3E-0000-4000-8000-00000000ABCD"
    assert xb.vm_path(uuid) == "/vm/6f1c2d3e-0000-4000-8000-00000000abcd"
    assert xb.tool_path(3) == "/tool/hyper/3"
    assert xb.tool_device_path(3, "vif", 0) == "/tool/hyper/3/device/vif/0"


@pytest.mark.parametrize(
    "call",
    [
        lambda: xb.domain_path(-1),
        lambda: xb.domain_path(0x7FF0),
        lambda: xb.frontend_path(1, "vif/../x", 0),
        lambda: xb.frontend_path(1, "vif", -2),
        lambda: xb.vm_path("not-a-uuid"),
        lambda: xb.control_feature_path(1, "explode"),  # type: ignore[arg-type]
    ],
)
def test_builders_refuse_bad_components(call: object) -> None:
    with pytest.raises(xb.XsPathError):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    "path", ["/", "/local/domain/1", "name", "device/vif/0/state", "/a-b_c@d/E9"]
)
def test_validate_path_accepts(path: str) -> None:
    assert xb.validate_path(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/a//b", "/a/", "a/", "/a b", "/a.b", "/é", "/a\0b", "@introduceDomain",
     "/" + "a" * 3072, "a" * 2049],
)  # fmt: skip
def test_validate_path_rejects(path: str) -> None:
    with pytest.raises(xb.XsPathError):
        xb.validate_path(path)


def test_path_length_limits_are_3072_absolute_and_2048_relative() -> None:
    xb.validate_path("/" + "a" * 3071)
    xb.validate_path("a" * 2048)


def test_special_paths_are_watchable_but_not_nodes() -> None:
    assert xb.validate_watch_path("@releaseDomain") == "@releaseDomain"
    with pytest.raises(xb.XsPathError):
        xb.validate_watch_path("@somethingElse")


def test_resolve_path_puts_relative_paths_under_the_home() -> None:
    assert xb.resolve_path("data/x", 4) == "/local/domain/4/data/x"
    assert xb.resolve_path("/vm", 4) == "/vm"


def test_path_relations() -> None:
    assert xb.parent_path("/a/b") == "/a"
    assert xb.parent_path("/a") == "/"
    assert xb.is_subpath("/a/b", "/a") and xb.is_subpath("/a", "/a") and xb.is_subpath("/a", "/")
    assert not xb.is_subpath("/ab", "/a")


def test_parse_backend_and_frontend_paths() -> None:
    parsed = xb.parse_backend_path("/local/domain/0/backend/vif/3/1/state")
    assert parsed == xb.DevicePath(0, "vif", 3, 1, "/local/domain/0/backend/vif/3/1", "state")
    parsed = xb.parse_frontend_path("/local/domain/3/device/vbd/51712")
    assert parsed == xb.DevicePath(None, "vbd", 3, 51712, "/local/domain/3/device/vbd/51712", "")
    assert xb.parse_backend_path("/local/domain/0/backend/vif/3") is None
    assert xb.parse_frontend_path("/local/domain/3/device/vif/x") is None


@pytest.mark.parametrize(
    ("value", "state"),
    [("4", xb.XenbusState.Connected), (" 2\n", xb.XenbusState.InitWait), (None, 0), ("", 0),
     ("9", 0), ("-1", 0), ("x", 0), ("\uff14", 0)],
)  # fmt: skip
def test_parse_state_reads_absent_or_garbage_as_unknown(value: str | None, state: int) -> None:
    assert xb.parse_state(value) == state


def test_permission_lists_follow_the_layout_table() -> None:
    assert xb.home_perms(3) == [Perm(0, "n"), Perm(3, "r")]
    assert xb.guest_rw_perms(3) == [Perm(3, "n")]
    assert xb.frontend_perms(3, 0) == [Perm(3, "n"), Perm(0, "r")]
    assert xb.backend_perms(0, 3) == [Perm(0, "n"), Perm(3, "r")]
    assert xb.guest_writable_paths(3)[0] == "/local/domain/3/control/shutdown"


def test_switch_state_and_wait_for_state_over_a_store() -> None:
    store = Store()
    with connect_local(store, 0) as front, connect_local(store, 0) as back:
        dev = xb.frontend_path(1, "vif", 0)
        xb.switch_state(front.client, dev, xb.XenbusState.Initialising)

        peer = threading.Thread(
            target=xb.switch_state, args=(back.client, dev, xb.XenbusState.Connected)
        )
        peer.start()
        state = xb.wait_for_state(
            front.client, xb.state_path(dev), {xb.XenbusState.Connected}, TIMEOUT
        )
        peer.join(TIMEOUT)

        assert state is xb.XenbusState.Connected
        assert xb.read_state(front.client, xb.state_path(dev)) is xb.XenbusState.Connected


def test_wait_for_state_times_out_naming_the_path() -> None:
    store = Store()
    with connect_local(store, 0) as link, pytest.raises(XsTimeoutError, match="/tool/dev/state"):
        xb.wait_for_state(link.client, "/tool/dev/state", {xb.XenbusState.Connected}, 0.05)
