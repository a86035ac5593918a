"""Domain config: golden normalised output for every file in configs/, and bad input.

Golden files: tests/golden/<stem>.json holds ``load_config(configs/<stem>.yaml).normalised_json()``
with the absolute path of configs/ replaced by ``$CONFIGS``. After an intended change,
regenerate them with ``HYPER_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_config.py`` and
review the diff.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from channels.config import (
    Access,
    Action,
    ConfigError,
    DomainConfig,
    load_config,
    parse_config,
    parse_disk_spec,
    parse_size,
    parse_vif_spec,
    random_mac,
)
from tests.golden import assert_matches_golden

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
GOLDEN = ROOT / "tests" / "golden"
PLACEHOLDER = "$CONFIGS"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def golden_text(config: DomainConfig) -> str:
    configs_in_json = json.dumps(str(CONFIGS))[1:-1]
    return config.normalised_json().replace(configs_in_json, PLACEHOLDER) + "\n"


def config_errors(text: str, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="x.yaml", base_dir=base_dir)
    return info.value.lines


# ----------------------------------------------------------------------------- configs/


def test_configs_folder_has_the_demo_domain() -> None:
    assert CONFIGS / "domu.yaml" in CONFIG_FILES
    assert len(CONFIG_FILES) >= 4


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_dry_run_output_matches_golden(path: Path) -> None:
    actual = golden_text(load_config(path))
    assert_matches_golden(actual, GOLDEN / f"{path.stem}.json")


def test_every_golden_file_has_a_config() -> None:
    stems = {p.stem for p in CONFIG_FILES}
    assert {p.stem for p in GOLDEN.glob("*.json")} <= stems


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_normalised_json_is_a_config_that_normalises_to_itself(path: Path) -> None:
    config = load_config(path)
    again = parse_config(config.normalised_json(), source="again.json", base_dir=Path("/"))
    assert again == config
    assert again.normalised_json() == config.normalised_json()


def test_loading_every_config_creates_nothing() -> None:
    before = sorted(CONFIGS.iterdir())
    for path in CONFIG_FILES:
        load_config(path)
    assert sorted(CONFIGS.iterdir()) == before


def test_demo_domain_is_idle_with_one_vif_and_one_disk() -> None:
    demo = load_config(CONFIGS / "domu.yaml")
    assert demo.name == "demo"
    assert demo.command is None
    assert [str(v.ip) for v in demo.vif] == ["10.0.0.2/24"]
    assert [(d.vdev, d.access, d.size) for d in demo.disk] == [("xvda", "rw", 256 << 20)]


def test_a_name_alone_gets_every_default(tmp_path: Path) -> None:
    config = parse_config("name: solo\n", source="solo.yaml", base_dir=tmp_path)
    assert (config.memory, config.vcpus, config.cpu_weight, config.cap) == (128, 1, 256, 0)
    assert (config.command, config.env, config.vif, config.disk) == (None, {}, [], [])
    assert (config.on_poweroff, config.on_reboot, config.on_crash) == (
        Action.DESTROY,
        Action.RESTART,
        Action.DESTROY,
    )


# ----------------------------------------------------------------------------- file-level errors


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    assert config_errors("name: a\nmemroy: 64\n", tmp_path) == [
        "x.yaml: memroy: unknown key (did you mean 'memory'?)"
    ]


def test_unknown_nested_key_is_named_with_its_path(tmp_path: Path) -> None:
    text = "name: a\nvif:\n  - brige: hyperbr0\n"
    assert config_errors(text, tmp_path) == [
        "x.yaml: vif.0.brige: unknown key (did you mean 'bridge'?)"
    ]


def test_negative_memory(tmp_path: Path) -> None:
    assert config_errors("name: a\nmemory: -64\n", tmp_path) == [
        "x.yaml: memory: Input should be greater than or equal to 32"
    ]


def test_missing_name(tmp_path: Path) -> None:
    assert config_errors("memory: 64\n", tmp_path) == ["x.yaml: name: required"]


def test_malformed_yaml_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    lines = config_errors("name: a\nvif: [\n  bridge: x\n", tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith("x.yaml:4:1: YAML syntax error: ")


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    lines = config_errors("name: a\nmemory: 64\nmemory: 256\n", tmp_path)
    assert lines == ["x.yaml:3:1: YAML syntax error: key 'memory' is given twice (first on line 2)"]


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = "name: a\nvif:\n  - <<: {mtu: 9000, bridge: br1}\n    mtu: 1400\n"
    [vif] = parse_config(text, source="x.yaml", base_dir=tmp_path).vif
    assert (vif.mtu, vif.bridge) == (1400, "br1")


def test_two_yaml_documents_are_an_error(tmp_path: Path) -> None:
    assert config_errors("name: a\n---\nname: b\n", tmp_path) == [
        "x.yaml:2:1: YAML syntax error: expected a single document in the stream,"
        " but found another document"
    ]


def test_config_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ConfigError(["a.yaml: name: required", "a.yaml: x: y"])))
    assert error.lines == ["a.yaml: name: required", "a.yaml: x: y"]
    assert str(error) == "a.yaml: name: required\na.yaml: x: y"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("", "x.yaml: the file is empty; a config needs at least a name"),
        ("# only a comment\n", "x.yaml: the file is empty; a config needs at least a name"),
        ("- name: a\n", "x.yaml: expected a mapping of keys to values, got a list"),
        ("just text\n", "x.yaml: expected a mapping of keys to values, got a str"),
    ],
)
def test_documents_that_are_not_a_mapping(text: str, line: str, tmp_path: Path) -> None:
    assert config_errors(text, tmp_path) == [line]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: 7\n", "x.yaml: name: Input should be a valid string"),
        ("name: a\nmemory: 64M\n", "x.yaml: memory: Input should be a valid integer, unable to"),
        ("name: a\nvcpus: yes\n", "x.yaml: vcpus: expected an integer, got a boolean"),
        ("name: a\nvcpus: 1.5\n", "x.yaml: vcpus: Input should be a valid integer, got a number"),
        ("name: a\ncommand: sleep 1\n", "x.yaml: command: Input should be a valid list"),
        ("name: a\ncommand: []\n", "x.yaml: command: List should have at least 1 item"),
        ("name: a\ncommand: [sh, '']\n", "x.yaml: command.1: must not be empty"),
        ("name: a\nenv: [A=1]\n", "x.yaml: env: Input should be a valid dictionary"),
        ("name: a\nenv: {A: true}\n", "x.yaml: env.A: Input should be a valid string"),
        ("name: a\nenv: {1A: x}\n", "x.yaml: env.1A: '1A' is not an environment variable name"),
        ("name: a\non_crash: reboot\n", "x.yaml: on_crash: Input should be 'destroy', 'restart'"),
        ("name: a\nvif: bridge=br0\n", "x.yaml: vif: Input should be a valid list"),
        ("name: a\nvif: [7]\n", "x.yaml: vif.0: expected a mapping or a spec string like"),
        ("name: a\ncpu_weight: 0\n", "x.yaml: cpu_weight: Input should be greater than or equal"),
        ("name: a\ncap: 101\n", "x.yaml: cap: 101% is more than 1 vcpus can use (100%)"),
    ],
)
def test_wrong_types_and_ranges(text: str, line: str, tmp_path: Path) -> None:
    lines = config_errors(text, tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith(line)


def test_cap_may_reach_100_per_vcpu(tmp_path: Path) -> None:
    config = parse_config("name: a\nvcpus: 2\ncap: 200\n", source="x.yaml", base_dir=tmp_path)
    assert config.cap == 200


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("-a", "is not a domain name"),
        ("a b", "is not a domain name"),
        ("a" * 65, "is not a domain name"),
        ("Domain-0", "is reserved for dom0"),
        ("dom0", "is reserved for dom0"),
        ("42", "is all digits, which reads as a domid"),
        ("..", "is not a domain name"),
    ],
)
def test_bad_names(name: str, reason: str, tmp_path: Path) -> None:
    [line] = config_errors(f"name: '{name}'\n", tmp_path)
    assert line.startswith("x.yaml: name: ")
    assert reason in line


def test_names_use_the_allowed_characters(tmp_path: Path) -> None:
    name = "web-1.eu_" + "x" * 55
    assert parse_config(f"name: {name}\n", source="x.yaml", base_dir=tmp_path).name == name


def test_several_errors_give_one_line_each(tmp_path: Path) -> None:
    text = (
        "name: a\n"
        "memory: 0\n"
        "vcpus: 0\n"
        "bogus: 1\n"
        "vif:\n"
        "  - mtu: 70000\n"
        "  - rate: fast\n"
        "disk:\n"
        "  - {target: a.img, size: 100, vdev: sda}\n"
    )
    lines = config_errors(text, tmp_path)
    assert [line.split(": ")[1] for line in lines] == [
        "memory",
        "vcpus",
        "vif.0.mtu",
        "vif.1.rate",
        "disk.0.size",
        "disk.0.vdev",
        "bogus",
    ]
    assert lines[2] == "x.yaml: vif.0.mtu: Input should be less than or equal to 65535"
    assert all(line.startswith("x.yaml: ") and "\n" not in line for line in lines)
    assert not any("errors.pydantic.dev" in line for line in lines)


def test_load_config_names_the_file_as_given(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.yaml").write_text("name: a\nmemory: 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("./sub/bad.yaml")
    assert info.value.lines == [
        "./sub/bad.yaml: memory: Input should be greater than or equal to 32"
    ]


def test_load_config_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines == [f"{path}: cannot read: No such file or directory"]


def test_load_config_of_binary_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines == [f"{path}: not UTF-8 text (byte 6)"]


# ----------------------------------------------------------------------------- vif


def test_vif_defaults(tmp_path: Path) -> None:
    [vif] = parse_config("name: a\nvif: [{}]\n", source="x.yaml", base_dir=tmp_path).vif
    assert vif.model_dump(mode="json") == {
        "mac": None,
        "bridge": "hyperbr0",
        "ip": None,
        "gateway": None,
        "mtu": 1500,
        "rate": None,
        "backend": 0,
        "faults": None,
    }


@pytest.mark.parametrize(
    ("spec", "bytes_per_second", "window_us"),
    [
        ("10Mb/s", 1_250_000, 50_000),
        ("250KB/s", 250_000, 50_000),
        ("1MB/s@20ms", 1_000_000, 20_000),
        ("1Gb/s@1s", 125_000_000, 1_000_000),
        ("800b/s@500000us", 100, 500_000),
    ],
)
def test_rates_in_xl_syntax(spec: str, bytes_per_second: int, window_us: int) -> None:
    rate = parse_vif_spec(f"rate={spec}").rate
    assert rate is not None
    assert (rate.bytes_per_second, rate.window_us) == (bytes_per_second, window_us)


@pytest.mark.parametrize("spec", ["10 Mbps", "10mb/s", "0Mb/s", "1Mb/s@0ms", "7b/s", "8b/s@1ms"])
def test_bad_rates(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_vif_spec(f"rate={spec}")
    [line] = info.value.lines
    assert line.startswith("vif: rate")


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        ("{ip: 10.0.0.2}", "vif.0.ip: '10.0.0.2' is not an address with a prefix length"),
        ("{ip: 10.0.0.0/24}", "vif.0.ip: 10.0.0.0/24 is the network's own or broadcast"),
        ("{ip: 10.0.0.300/24}", "vif.0.ip: '10.0.0.300/24' is not an address with a prefix"),
        ("{gateway: 10.0.0.1}", "vif.0.gateway: a gateway needs an ip"),
        ("{ip: 10.0.0.2/24, gateway: 10.0.1.1}", "vif.0.gateway: 10.0.1.1 is outside 10.0.0.0/24"),
        ("{ip: 10.0.0.2/24, gateway: '::1'}", "vif.0.gateway: ::1 is outside 10.0.0.0/24"),
        ("{ip: 10.0.0.2/24, gateway: 10.0.0.2}", "vif.0.gateway: 10.0.0.2 is the vif's own"),
        ("{ip: 'fd00::2/64', mtu: 1000}", "vif.0.mtu: IPv6 needs an mtu of at least 1280"),
        ("{mtu: 67}", "vif.0.mtu: Input should be greater than or equal to 68"),
        ("{mac: 01:16:3e:00:00:01}", "vif.0.mac: 01:16:3e:00:00:01 is a multicast address"),
        ("{mac: 00:16:3e:00:01}", "vif.0.mac: '00:16:3e:00:01' is not a MAC address"),
        ("{mac: 10:20:30:40:50:00}", "vif.0.mac: got a number; quote the MAC address in YAML"),
        ("{bridge: a-very-long-bridge}", "vif.0.bridge: 'a-very-long-bridge' is not an interface"),
        ("{backend: -1}", "vif.0.backend: domid -1 is negative"),
        ("{backend: a}", "vif.0.backend: a domain cannot be its own backend"),
    ],
)
def test_bad_vif_entries(entry: str, line: str, tmp_path: Path) -> None:
    lines = config_errors(f"name: a\nvif: [{entry}]\n", tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith(f"x.yaml: {line}")


def test_vif_addresses_and_mac_are_normalised(tmp_path: Path) -> None:
    text = "name: a\nvif: [{mac: '00:16:3E:0A:0B:0C', ip: 10.0.0.9/255.255.255.0}]\n"
    [vif] = parse_config(text, source="x.yaml", base_dir=tmp_path).normalised()["vif"]
    assert (vif["mac"], vif["ip"]) == ("00:16:3e:0a:0b:0c", "10.0.0.9/24")


def test_duplicate_vif_mac_names_the_second_entry(tmp_path: Path) -> None:
    text = "name: a\nvif:\n  - mac: '00:16:3e:00:00:01'\n  - {}\n  - mac: '00:16:3E:00:00:01'\n"
    assert config_errors(text, tmp_path) == [
        "x.yaml: vif.2.mac: MAC address 00:16:3e:00:00:01 is already used by entry 0"
    ]


@pytest.mark.parametrize(("backend", "domid_or_name"), [("0", 0), ("Domain-0", 0), ("dom0", 0)])
def test_dom0_backend_spellings(backend: str, domid_or_name: int | str) -> None:
    assert parse_vif_spec(f"backend={backend}").backend == domid_or_name


def test_a_driver_domain_backend_by_name_or_id() -> None:
    assert parse_vif_spec("backend=netvm").backend == "netvm"
    assert parse_vif_spec("backend=7").backend == 7


# ----------------------------------------------------------------------------- disk


def test_disk_target_resolves_against_the_config_folder(tmp_path: Path) -> None:
    text = "name: a\ndisk: [{target: ../img/a.img, size: 4G, vdev: xvdb, access: ro}]\n"
    [disk] = parse_config(text, source="x.yaml", base_dir=tmp_path / "cfg").disk
    assert disk.target == tmp_path / "img" / "a.img"
    assert (disk.size, disk.access, disk.backend) == (4 << 30, Access.RO, 0)


def test_disk_without_size_uses_an_existing_image(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(1024))
    text = "name: a\ndisk: [{target: a.img, vdev: xvda}]\n"
    [disk] = parse_config(text, source="x.yaml", base_dir=tmp_path).disk
    assert (disk.target, disk.size, disk.access) == (tmp_path / "a.img", None, Access.RW)


def test_missing_image_without_size(tmp_path: Path) -> None:
    text = "name: a\ndisk: [{target: a.img, vdev: xvda}]\n"
    assert config_errors(text, tmp_path) == [
        f"x.yaml: disk.0.target: {tmp_path / 'a.img'} does not exist and no size is given"
        " to create it"
    ]
    assert not (tmp_path / "a.img").exists()


def test_image_smaller_than_a_sector(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(511))
    text = "name: a\ndisk: [{target: a.img, size: 1M, vdev: xvda}]\n"
    assert config_errors(text, tmp_path) == [
        f"x.yaml: disk.0.target: {tmp_path / 'a.img'} is 511 bytes, smaller than one"
        " 512-byte sector"
    ]


def test_image_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "a.img").mkdir()
    [line] = config_errors("name: a\ndisk: [{target: a.img, vdev: xvda}]\n", tmp_path)
    assert line == f"x.yaml: disk.0.target: {tmp_path / 'a.img'} is not a regular file"


def test_an_image_reached_through_a_symlink_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "real.img").write_bytes(bytes(1024))
    (tmp_path / "a.img").symlink_to(tmp_path / "real.img")
    [line] = config_errors("name: a\ndisk: [{target: a.img, vdev: xvda}]\n", tmp_path)
    link = tmp_path / "a.img"
    assert line == (
        f"x.yaml: disk.0.target: {link} is reached through a symlink: {link} -> "
        f"{tmp_path / 'real.img'}"
    )


def test_an_image_is_checked_for_the_owner_the_caller_names(tmp_path: Path) -> None:
    """An image is accepted if it is root's or the owner's; here it is ours, so it passes for
    us, and for anyone else only if we are root."""
    (tmp_path / "a.img").write_bytes(bytes(1024))
    mine = parse_disk_spec("target=a.img,vdev=xvda", tmp_path, owner=os.getuid())
    assert mine.target == tmp_path / "a.img"
    if os.getuid() == 0:
        return
    with pytest.raises(ConfigError) as raised:
        parse_disk_spec("target=a.img,vdev=xvda", tmp_path, owner=os.getuid() + 1)
    assert raised.value.lines == [
        f"disk: target: {tmp_path / 'a.img'} belongs to uid {os.getuid()}; only root or uid "
        f"{os.getuid() + 1} (who asked for the disk) may own it"
    ]


def test_duplicate_vdev_names_the_second_entry(tmp_path: Path) -> None:
    text = (
        "name: a\ndisk:\n"
        "  - {target: a.img, size: 1M, vdev: xvda}\n"
        "  - {target: b.img, size: 1M, vdev: xvda}\n"
    )
    assert config_errors(text, tmp_path) == [
        "x.yaml: disk.1.vdev: vdev xvda is already used by entry 0"
    ]


def test_an_image_is_shared_only_read_only(tmp_path: Path) -> None:
    shared = "  - {target: a.img, size: 1M, vdev: xvda, access: ro}\n"
    text = f"name: a\ndisk:\n{shared}  - {{target: ./a.img, size: 1M, vdev: xvdb}}\n"
    [line] = config_errors(text, tmp_path)
    assert line.startswith("x.yaml: disk.1.target: ")
    assert line.endswith("an image can be shared only read-only")
    both_ro = f"name: a\ndisk:\n{shared}  - {{target: a.img, size: 1M, vdev: xvdb, access: r}}\n"
    assert len(parse_config(both_ro, source="x.yaml", base_dir=tmp_path).disk) == 2


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        ("{vdev: xvda}", "disk.0.target: required"),
        ("{target: a.img, size: 1M}", "disk.0.vdev: required"),
        ("{target: a.img, size: 1M, vdev: hda}", "disk.0.vdev: 'hda' is not a vdev like xvda"),
        (
            "{target: a.img, size: 1000, vdev: xvda}",
            "disk.0.size: Input should be a multiple of 512",
        ),
        ("{target: a.img, size: 0, vdev: xvda}", "disk.0.size: Input should be greater than 0"),
        ("{target: a.img, size: 1X, vdev: xvda}", "disk.0.size: '1X' is not a size like 512M"),
        ("{target: a.img, size: 1M, vdev: xvda, access: rx}", "disk.0.access: Input should be"),
        ("{target: 5, size: 1M, vdev: xvda}", "disk.0.target: expected a file path"),
    ],
)
def test_bad_disk_entries(entry: str, line: str, tmp_path: Path) -> None:
    lines = config_errors(f"name: a\ndisk: [{entry}]\n", tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith(f"x.yaml: {line}")


@pytest.mark.parametrize(
    ("value", "size"),
    [(1024, 1024), ("512M", 512 << 20), ("4G", 4 << 30), ("64MiB", 64 << 20), ("2k", 2048)],
)
def test_sizes(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("vdev", "number"),
    [("xvda", 51712), ("xvdb", 51728), ("xvdp", 51952), ("xvdq", (1 << 28) | (16 << 8))],
)
def test_vdev_to_blkif_virtual_device(vdev: str, number: int, tmp_path: Path) -> None:
    disk = parse_disk_spec(f"target=a.img,size=1M,vdev={vdev}", tmp_path)
    assert disk.virtual_device == number


# ----------------------------------------------------------------------------- spec strings


def test_vif_spec_string() -> None:
    vif = parse_vif_spec("bridge=br1, ip=10.0.0.5/24 ,mtu=9000,rate=1MB/s@20ms,backend=netvm")
    assert vif.model_dump(mode="json") == {
        "mac": None,
        "bridge": "br1",
        "ip": "10.0.0.5/24",
        "gateway": None,
        "mtu": 9000,
        "rate": {"bytes_per_second": 1_000_000, "window_us": 20_000},
        "backend": "netvm",
        "faults": None,
    }


def test_empty_vif_spec_means_all_defaults() -> None:
    assert parse_vif_spec("") == parse_vif_spec(",")
    assert parse_vif_spec("").bridge == "hyperbr0"


def test_disk_spec_string(tmp_path: Path) -> None:
    disk = parse_disk_spec("target=img.raw,size=64M,vdev=xvdb,access=ro", tmp_path)
    assert (disk.target, disk.size, disk.vdev, disk.access) == (
        tmp_path / "img.raw",
        64 << 20,
        "xvdb",
        Access.RO,
    )


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        ("mtu=1", "vif: mtu: Input should be greater than or equal to 68"),
        ("bridge=br0,colour=red", "vif: colour: unknown key"),
        ("bridge=br0,trusted", "vif: expected key=value, got 'trusted'"),
        ("mtu=1500,mtu=9000", "vif: mtu is given twice"),
        ("ip=10.0.0.5", "vif: ip: '10.0.0.5' is not an address with a prefix length"),
    ],
)
def test_bad_vif_specs(spec: str, line: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_vif_spec(spec)
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith(line)


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        ("target=a.img,size=64M", "disk: vdev: required"),
        ("target=a.img,vdev=xvdb", "disk: target: "),
        ("target=a.img,size=64M,vdev=xvdb,format=qcow2", "disk: format: unknown key"),
        ("/img,raw,xvda,rw", "disk: expected key=value, got '/img'"),
    ],
)
def test_bad_disk_specs(spec: str, line: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_disk_spec(spec, tmp_path, source="block-attach")
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith(line.replace("disk", "block-attach", 1))


def test_spec_strings_inside_a_config_report_their_field_path(tmp_path: Path) -> None:
    text = "name: a\nvif: ['bridge=br0', 'mtu=10']\n"
    assert config_errors(text, tmp_path) == [
        "x.yaml: vif.1.mtu: Input should be greater than or equal to 68"
    ]


def test_random_mac_is_unicast_in_xens_oui() -> None:
    mac = random_mac()
    assert mac.startswith("00:16:3e:")
    assert parse_vif_spec(f"mac={mac}").mac == mac


def test_a_driver_domain_lists_the_kinds_it_serves_and_the_nics_it_holds(tmp_path: Path) -> None:
    text = "name: netvm\nbackends: [vif, vbd]\nnics: [veth0, {name: eth1, bridge: br1}]\n"
    config = parse_config(text, source="x.yaml", base_dir=tmp_path)
    assert config.backends == ["vif", "vbd"]
    assert [(nic.name, nic.bridge) for nic in config.nics] == [
        ("veth0", "hyperbr0"),
        ("eth1", "br1"),
    ]
    for text, error in (
        ("backends: [vif, vif]", "backends.1: vif is listed twice"),
        ("backends: [p9]", "backends.0: Input should be 'vif' or 'vbd'"),
        (
            "backends: [vbd]\nnics: [veth0]",
            "nics: only a domain that serves vifs (backends: [vif]) holds nics",
        ),
        ("nics: [veth0]", "nics: only a domain that serves vifs (backends: [vif]) holds nics"),
        (
            "backends: [vif]\nnics: [veth0, veth0]",
            "nics.1.name: interface veth0 is already used by entry 0",
        ),
    ):
        assert config_errors(f"name: a\n{text}\n", tmp_path) == [f"x.yaml: {error}"]


def test_a_vifs_faults_are_kept_canonical_and_a_bad_one_is_named() -> None:
    assert parse_vif_spec("bridge=br1,faults=dir=rx;drop=30%").faults == "drop=30,dir=rx"
    with pytest.raises(ConfigError) as refused:
        parse_vif_spec("bridge=br1,faults=drop=lots")
    [line] = refused.value.lines
    assert line.startswith("vif: faults") and "drop: 'lots' is not a percentage" in line
