"""The toolstack's control requests (channels/control.py): each decodes into its model or is
refused with one line per problem, and an error keeps its kind across the socket."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from channels import control
from channels.errors import BadInput, Closed, HyperError, NotAllowed, NotFound, ProtocolViolation

EXAMPLES: list[control.Request] = [
    control.Create(text="name: web\n", source="web.yaml", base_dir="/srv", owner=1000),
    control.List(),
    control.Destroy(domain="web"),
    control.Shutdown(domain="web", wait=True, grace=5.0),
    control.Reboot(domain="3"),
    control.Pause(domain="web"),
    control.Unpause(domain="web"),
    control.ExecTarget(domain="web"),
    control.SchedCredit(domain="web", cpu_weight=512),
    control.MemSet(domain="web", memory="256M"),
    control.Info(),
    control.Dmesg(clear=True),
    control.Halt(),
    control.Console(domain="web"),
    control.StoreLs(path="/local"),
    control.StoreRead(path="/local/domain/0/name"),
    control.StoreWrite(path="/x", value="y"),
    control.StoreRm(path="/x"),
    control.StoreWatch(path="@releaseDomain"),
    control.DeviceAttach(domain="web", kind="vbd", spec="target=a.img,vdev=xvdb"),
    control.DeviceDetach(domain="web", kind="vif", device="0"),
    control.DeviceList(domain="web", kind="vbd"),
    control.DeviceStats(kind="vif"),
    control.FaultSet(domain="web", device="xvda", spec="eio=100,sectors=0-7"),
    control.FaultList(domain="web"),
    control.Capture(domain="web", device="vif0", count=10, duration=2.5),
    control.Trace(domain="web", device="xvda"),
]


def test_the_examples_cover_every_request() -> None:
    assert {type(r) for r in EXAMPLES} == set(control.REQUESTS.values())


@pytest.mark.parametrize("request_", EXAMPLES, ids=lambda r: r.method)
def test_every_request_decodes_to_what_was_sent(request_: control.Request) -> None:
    assert control.decode_request(control.encode_request(request_).rstrip(b"\n")) == request_


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json", "bad request: not JSON"),
        (b'["destroy"]', "bad request: not a request object"),
        (b'{"method": "format_the_disk", "params": {}}', "unknown method 'format_the_disk'"),
    ],
)
def test_a_line_that_is_no_request_is_bad_input(line: bytes, expected: str) -> None:
    with pytest.raises(BadInput, match=expected):
        control.decode_request(line)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "destroy: domain: Field required"),
        ({"domain": 3}, "destroy: domain: Input should be a valid string"),
        ({"domain": "web", "force": True}, "destroy: force: Unexpected keyword argument"),
    ],
)
def test_a_request_with_bad_params_names_each_problem(
    params: dict[str, object], problem: str
) -> None:
    line = json.dumps({"method": "destroy", "params": params}).encode()
    with pytest.raises(BadInput) as info:
        control.decode_request(line)
    assert info.value.lines == [problem]


def test_constraints_are_checked_where_the_request_is_decoded() -> None:
    line = json.dumps({"method": "shutdown", "params": {"domain": "web", "grace": -1}})
    with pytest.raises(BadInput) as info:
        control.decode_request(line.encode())
    assert info.value.lines == ["shutdown: grace: Input should be greater than 0"]
    attach = {"domain": "web", "kind": "usb", "spec": ""}
    with pytest.raises(BadInput, match="device_attach"):
        control.decode_request(json.dumps({"method": "device_attach", "params": attach}).encode())


@pytest.mark.parametrize("kind", [BadInput, NotFound, NotAllowed, ProtocolViolation, Closed])
def test_an_error_reply_is_raised_again_as_its_kind_with_its_lines(
    kind: type[HyperError],
) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:

        def toolstack() -> None:
            control.read_line(theirs, bytearray())
            control.send_json(theirs, control.error_reply(kind("refused", ["a: one", "b: two"])))

        server = threading.Thread(target=toolstack)
        server.start()
        conn = object.__new__(control.Connection)
        conn.sock, conn.buffer = ours, bytearray()
        with pytest.raises(kind) as info:
            conn.request(control.Destroy(domain="web"))
        server.join()
    assert type(info.value) is kind
    assert (info.value.summary, info.value.lines) == ("refused", ["a: one", "b: two"])
    assert str(info.value) == "refused: a: one; b: two"  # what a program's traceback shows


def test_hyperctl_builds_requests_without_pydantic() -> None:
    """hyperctl imports channels.control on every command; pydantic is dom0's cost alone."""
    import subprocess
    import sys

    code = "import sys, channels.control; print('pydantic' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
