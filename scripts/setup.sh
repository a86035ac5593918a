#!/usr/bin/env bash
# Install everything hyper needs on a Debian or Ubuntu host, idempotently, and print the path of
# the Python interpreter to use on stdout (everything else goes to stderr):
#
#   py=$(scripts/setup.sh) && "$py" -m hyper.cli list
#
# Host tools (apt-get, only when one is missing): python3, python3-pip, iproute2,
# util-linux (nsenter, setpriv, flock), procps, iperf3, fio, iputils-ping, e2fsprogs (mkfs.ext4
# and fsck.ext4 for the block tests), fuse3 (libfuse3, which blkfront's mfusepy loads), gcc and
# python3-dev (the native data-path pumps, channels/native/), clang (their fuzzers: libFuzzer),
# iptables (a bridge hyper makes lets its frames through FORWARD: backends/netback/firewall.py, and
# the tests set a Docker-like DROP policy to check it), libxen-dev (Xen's public headers, which
# the tests compare every shared page's layout with), tshark (the tests read `hyperctl capture`'s
# pcap files with it), xenstore-utils (Xen's own xenstore-* tools, which the tests run against
# dom0's store socket).
# The native pumps are (re)built in place whenever a source under channels/native/ is newer
# than its module; without a compiler the Python pumps run (``hyperctl info`` says which).
# Python packages: `pip install -e '.[test]'` (hyper, editable, with its test extras) into the
# interpreter itself: python3 on PATH, or $PYTHON (at least 3.11). Only when hyper is not yet
# installed from this checkout, or pyproject.toml's requirements changed since it was.
#
# Why not a venv inside the checkout: a domain's sandbox hides the host's /tmp behind a tmpfs of
# its own, so for a checkout under /tmp (as CI clones are) a venv there would vanish from inside
# the domains. Installing into the interpreter keeps the packages where the sandbox shows them.
# Debian 12 and Ubuntu 24.04 mark their python3 "externally managed" (PEP 668); only then does
# pip get --break-system-packages, and --ignore-installed so that it never tries to remove a
# package apt installed. Run as root when apt-get or a system-wide pip has work to do.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

APT_PACKAGES=(python3 python3-pip iproute2 util-linux procps iperf3 fio iputils-ping e2fsprogs fuse3
    gcc python3-dev clang iptables libxen-dev tshark xenstore-utils tmux)
HOST_TOOLS=(ip nsenter setpriv flock ps pgrep iperf3 fio ping mkfs.ext4 fsck.ext4 fusermount3 gcc
    clang iptables tshark xenstore-ls tmux)

say() { printf 'setup: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}

python_ok() {
    command -v "$python" >/dev/null 2>&1 &&
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null &&
        "$python" -m pip --version >/dev/null 2>&1
}

# libFuzzer's runtime, which the native pumps' fuzzers link: Debian 12 and Ubuntu 24.04 ship it
# apart from clang (libclang-rt-<major>-dev), and only as a recommendation.
fuzzer_runtime_ok() {
    local dir
    dir=$(clang --print-runtime-dir 2>/dev/null) || return 1
    compgen -G "$dir/libclang_rt.fuzzer*.a" >/dev/null
}

missing_host_tools() {
    local tool
    for tool in "${HOST_TOOLS[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s ' "$tool"
    done
    python_ok || printf '%s ' "$python>=3.11-with-pip"
    fuzzer_runtime_ok || printf '%s ' "libFuzzer-runtime"
    # Xen's public headers: the tests compare every shared page's layout with them.
    [ -e /usr/include/xen/io/ring.h ] || printf '%s ' "libxen-dev"
}

install_host_tools() {
    local missing
    missing=$(missing_host_tools)
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "missing: $missing; install them by hand (this script knows only apt-get)"
    [ "$(id -u)" -eq 0 ] || die "missing: $missing; run as root (sudo) so apt-get can install them"
    say "installing ${APT_PACKAGES[*]} (missing: $missing)"
    export DEBIAN_FRONTEND=noninteractive # iperf3 would ask whether to start a daemon
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2
    if ! fuzzer_runtime_ok; then
        apt-get install -y -qq --no-install-recommends "libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev" >&2
    fi
    missing=$(missing_host_tools)
    [ -z "$missing" ] ||
        die "still missing after apt-get: $missing (hyper needs Python >= 3.11; set PYTHON=...)"
}

# Exit 0 if hyper is installed, editable, from this checkout, with pyproject.toml's current
# requirements, and everything it and its tests import loads.
installed() {
    (cd / && "$python" - "$repo" <<'PY'
import json, sys, tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

repo = Path(sys.argv[1])
try:
    dist = distribution("hyper")
except PackageNotFoundError:
    sys.exit(1)
url = json.loads(dist.read_text("direct_url.json") or "{}")
if url.get("url") != repo.as_uri() or not url.get("dir_info", {}).get("editable"):
    sys.exit(1)
project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
wanted = set(project["dependencies"]) | {
    f'{req}; extra == "{extra}"'
    for extra, reqs in project.get("optional-dependencies", {}).items()
    for req in reqs
}
if set(dist.requires or []) != wanted:
    sys.exit(1)
scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
if scripts != project.get("scripts", {}):
    sys.exit(1)
# Every top-level package the checkout has (a package added since the last install is not on
# the editable install's path until pip runs again).
import importlib
for init in repo.glob("*/__init__.py"):
    if init.parent.name not in ("tests", "bench"):
        importlib.import_module(init.parent.name)
import hyper.cli, pydantic, yaml, posix_ipc, pyroute2, rich, pytest, pytest_timeout, hypothesis
import ruff, mypy, os
os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
import mfusepy
PY
    ) >/dev/null 2>&1
}

install_python_packages() {
    local flags=(--no-input --quiet --root-user-action=ignore)
    if "$python" -c 'import sys, sysconfig, os
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        flags+=(--break-system-packages --ignore-installed)
    fi
    say "pip install ${flags[*]} -e '.[test]' with $python"
    (cd "$repo" && "$python" -m pip install "${flags[@]}" -e '.[test]' >&2)
    installed || die "hyper is still not importable after pip install; see the messages above"
}

# Build channels/native/*.c into channels/_*.so in place when a module is missing or older than
# any native source (pip builds them at install; an edit afterwards needs this).
build_native() {
    local source module stale=0
    for source in "$repo"/channels/native/*.c; do
        module=$(compgen -G "$repo/channels/_$(basename "$source" .c).*.so" | head -n1) || true
        if [ -z "$module" ]; then
            stale=1
            continue
        fi
        [ -n "$(find "$repo/channels/native" -maxdepth 1 -newer "$module" -name '*.[ch]')" ] && stale=1
    done
    [ "$stale" -eq 0 ] && return 0
    say "building the native pumps (channels/native/)"
    (cd "$repo" && "$python" setup.py -q build_ext --inplace >&2) ||
        die "the native pumps do not build; see the compiler's messages above"
}

install_host_tools
python=$("$python" -c 'import sys; print(sys.executable)') # past any pyenv shim
if ! installed; then
    # Two checkouts setting up at once would run two pips over one site-packages.
    exec 9>"${TMPDIR:-/tmp}/hyper-setup.lock"
    flock 9
    installed || install_python_packages
    flock -u 9
fi
build_native
# Whether this host can run hyper (as root: a user who only installs is not asked for root).
if [ "$(id -u)" -eq 0 ]; then
    (cd "$repo" && "$python" -m hyper.cli check --quiet >&2) ||
        die "this host cannot run hyper: see above (hyperctl check lists everything)"
fi
say "ready: $python ($("$python" --version 2>&1)), hyper from $repo"
echo "$python"
