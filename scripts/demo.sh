#!/usr/bin/env bash
# The demo: set up, start the hypervisor with one domU from configs/domu.yaml, look at it from
# outside and from inside, run a small workload in it, then tear everything down and say whether
# anything was left on the host. Run as root. Teardown runs even when a step fails or on Ctrl-C.
# With --driver-domain it also runs a network driver domain (configs/netvm.yaml) and two guests
# whose vifs it serves (configs/netguest.yaml, netguest2.yaml): their frames never reach dom0;
# then a block driver domain (configs/blkvm.yaml) serving a guest's disk (configs/blkguest.yaml),
# killed and restarted under it.
set -euo pipefail

driver_domain=0
case "${1:-}" in
    "") ;;
    --driver-domain) driver_domain=1 ;;
    *) printf 'usage: %s [--driver-domain]\n' "$0" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=${HYPER_RUN_DIR:-/run/hyper}
demo_image=/var/lib/hyper/images/hyper-demo-xvda.img # configs/domu.yaml's disk
blk_image=/var/lib/hyper/images/blkguest.img # configs/blkguest.yaml's disk (--driver-domain)
# The image's folders that do not exist yet: hyperctl makes them (root's, 0700) with the image,
# and the demo removes them with it, innermost first.
demo_dirs=()
for dir in /var/lib/hyper /var/lib/hyper/images; do
    [ -e "$dir" ] || demo_dirs=("$dir" "${demo_dirs[@]}")
done

say() { printf 'demo: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { say "run as root (sudo $0)"; exit 1; }

python=$(bash "$repo/scripts/setup.sh")
# From the checkout's top, `python -m hyper.cli` runs this checkout's hyperctl.
cd "$repo"
hyperctl() { "$python" -m hyper.cli "$@"; }
hyperctl check --demo --quiet || { say "this host cannot run the demo: see above"; exit 1; }
# Shows each command as one would type it: arguments with spaces or shell syntax in quotes.
shown() {
    local arg out=()
    for arg in "$@"; do
        if [[ $arg =~ [^A-Za-z0-9_./=:,-] ]]; then out+=("'$arg'"); else out+=("$arg"); fi
    done
    printf '\n$ hyperctl %s\n' "${out[*]}"
}
step() {
    shown "$@"
    hyperctl "$@"
}

# Everything of hyper's that can be on the host; prints nothing when the host is clean.
leftovers() {
    find /dev/shm -maxdepth 1 \( -name 'hyper.*' -o -name 'sem.hyper.*' \) 2>/dev/null
    find /sys/fs/cgroup -maxdepth 2 -type d -name hyper 2>/dev/null
    [ ! -e "$run_dir" ] || echo "$run_dir"
    ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^vif[0-9]+\./ {print "interface " $2}'
    losetup -j "$demo_image" 2>/dev/null | sed 's/^/loop device /'
    losetup -j "$blk_image" 2>/dev/null | sed 's/^/loop device /'
    pgrep -a -x hyper-kernel || true
    pgrep -a -x hyper-init || true
    pgrep -a -f 'hyper\.hyperd|-m dom0( |$)|domu\.boot' || true
}

wait_until_clean() {
    local deadline=$((SECONDS + $1))
    while [ -n "$(leftovers)" ]; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

teardown() {
    local status=$? left
    set +e
    trap - EXIT INT TERM
    if hyperctl list >/dev/null 2>&1; then
        say "a step failed (status $status): destroying the domain and halting the hypervisor"
        for name in blkguest blkvm netguest2 netguest netvm demo-peer demo; do
            hyperctl destroy "$name" 2>/dev/null
        done
        hyperctl halt
    fi
    if ! wait_until_clean 15; then
        say "the host is not clean after halt; running hyperctl cleanup"
        hyperctl cleanup
        wait_until_clean 15
    fi
    rm -f "$demo_image" "$blk_image"
    for dir in "${demo_dirs[@]}"; do rmdir "$dir" 2>/dev/null; done
    left=$(leftovers)
    printf '\n'
    if [ -z "$left" ]; then
        echo "Left behind: nothing (no shared memory, semaphore, cgroup, interface, loop device, process or $run_dir)"
    else
        printf 'Left behind:\n%s\n' "$left"
        [ "$status" -ne 0 ] || status=1
    fi
    [ "$status" -eq 0 ] && echo "Demo finished." || say "demo failed (status $status)"
    exit "$status"
}

if hyperctl list >/dev/null 2>&1; then
    say "a hypervisor is already running; the demo ends by halting it, so stop it yourself first:"
    say "  $python -m hyper.cli halt   (from $repo)"
    exit 1
fi
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step cleanup
step create configs/domu.yaml
step create configs/peer.yaml
step list
step exec demo -- sh -c 'hostname; id; ip -o link; ip -o -4 addr show eth0; ps -e'

# Network traffic: every frame crosses the netif rings to dom0's netback and back.
step exec demo -- ping -c 3 10.0.0.3
step exec demo-peer -- iperf3 -s -1 -D
for _ in $(seq 50); do
    hyperctl exec demo-peer -- sh -c 'ss -ltn | grep -q :5201' && break
    sleep 0.1
done
step exec demo -- iperf3 -c 10.0.0.3 -t 3
step network-list demo

# Disk I/O: every block crosses the blkif ring to blkback, which does the I/O on a loop device
# over the image file. Write 64 MiB, checksum them inside, run fio with verification, and after
# the domain is destroyed compare with the image in dom0.
step exec demo -- ls -l /dev/xvda
step exec demo -- dd if=/dev/urandom of=/dev/xvda bs=1M count=64 oflag=direct conv=fsync,notrunc
checksum='head -c 67108864 /dev/xvda | sha256sum'
shown exec demo -- sh -c "$checksum"
inside=$(hyperctl exec demo -- sh -c "$checksum" | cut -d' ' -f1)
echo "$inside  (first 64 MiB of /dev/xvda, inside the domain)"
fio='fio --name=demo --filename=/dev/xvda --offset=128M --size=32M --rw=randrw --bs=4k'
fio+=' --iodepth=16 --ioengine=libaio --direct=1 --verify=crc32c --eta=never'
step exec demo -- sh -c "$fio >/tmp/fio.log; s=\$?; grep -E \"err=|IOPS\" /tmp/fio.log; exit \$s"
step block-list demo

step top -b -n 1
step destroy demo
outside=$(head -c 67108864 "$demo_image" | sha256sum | cut -d' ' -f1)
echo "$outside  (first 64 MiB of $demo_image, in dom0 after destroy)"
if [ "$inside" = "$outside" ]; then
    echo "the image holds exactly what the domain wrote"
else
    say "the image differs from what the domain read back"
    exit 1
fi
step destroy demo-peer

if [ "$driver_domain" = 1 ]; then
    # A network driver domain: netback runs in netvm, a domU, for the two guests whose vifs name
    # it; their TAPs and their bridge are in netvm's namespace, and no dom0 process maps their
    # pages. network-list's BE column says which domain serves a vif.
    step create configs/netvm.yaml
    step create configs/netguest.yaml
    step create configs/netguest2.yaml
    step exec netguest -- ping -c 3 10.0.7.3
    step exec netguest2 -- iperf3 -s -1 -D
    for _ in $(seq 50); do
        hyperctl exec netguest2 -- sh -c 'ss -ltn | grep -q :5201' && break
        sleep 0.1
    done
    step exec netguest -- iperf3 -c 10.0.7.3 -t 3
    step network-list netguest
    step exec netvm -- ip -o link
    for name in netguest2 netguest netvm; do step destroy "$name"; done

    # A block driver domain: blkback runs in blkvm for blkguest's disk. dom0 opened the image
    # and handed blkvm the loop device alone. Killed, blkvm comes back (on_crash: restart) and
    # the guest's disk with it: what was written is read back through the new one.
    step create configs/blkvm.yaml
    step create configs/blkguest.yaml
    step exec blkguest -- sh -c 'head -c 16M /dev/urandom > /tmp/data && dd if=/tmp/data of=/dev/xvda bs=1M conv=fsync,notrunc && sha256sum /tmp/data'
    step block-list blkguest
    served_by=$(hyperctl block-list blkguest | awk 'NR == 2 {print $2}')
    kernel=$(hyperctl list --json | "$python" -c \
        'import json, sys; print(next(d["pid"] for d in json.load(sys.stdin) if d["name"] == "blkvm"))')
    printf '\n$ kill -9 %s   # blkvm'"'"'s kernel: it crashes; on_crash: restart builds it again\n' "$kernel"
    kill -9 "$kernel"
    for _ in $(seq 100); do
        hyperctl block-list blkguest 2>/dev/null |
            awk -v old="$served_by" 'NR == 2 && $2 != old && $3 == 4 {ok=1} END {exit !ok}' && break
        sleep 0.2
    done
    step exec blkguest -- sh -c 'head -c 16M /dev/xvda | sha256sum'
    step list
    for name in blkguest blkvm; do step destroy "$name"; done
fi
step halt
