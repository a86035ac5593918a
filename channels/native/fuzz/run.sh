#!/usr/bin/env bash
# Fuzz the native pumps' parsers of peer-written memory with libFuzzer, AddressSanitizer and
# UndefinedBehaviorSanitizer (clang):
#
#   channels/native/fuzz/run.sh [RUNS]     # each pump RUNS executions (default 1000000)
#
# One binary per pump (netpump_fuzz.c with -DTARGET=... for the four netif pumps, blkpump_fuzz.c
# for blkback's, fusepump_fuzz.c for blkfront's); corpora live under $FUZZ_DIR (default a
# temporary directory, removed afterwards). Exit status: non-zero as soon as one pump's fuzzer
# finds a crash, a sanitizer report or a leak; the reproducer is left in $FUZZ_DIR.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
runs=${1:-1000000}
keep=${FUZZ_DIR:+1}
dir=${FUZZ_DIR:-$(mktemp -d)}
mkdir -p "$dir"
[ -n "$keep" ] || trap 'rm -rf "$dir"' EXIT
command -v clang >/dev/null || { echo "fuzz: clang is missing (scripts/setup.sh installs it)" >&2; exit 1; }
python3 "$here/seeds.py" "$dir"  # honest traffic to start from
for pump in netpump:NETBACK_TX netpump:NETBACK_RX netpump:NETFRONT_TX netpump:NETFRONT_RX \
    blkpump:BLKBACK fusepump:FUSEFRONT; do
    source=${pump%%:*} target=${pump#*:}
    bin="$dir/$target"
    clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
        -DTARGET="$target" -I"$here/.." "$here/${source}_fuzz.c" -o "$bin"
    echo "fuzz: $target, $runs runs" >&2
    (cd "$dir" && "$bin" -runs="$runs" -max_len=70000 -print_final_stats=1 \
        -artifact_prefix="$dir/$target-" "$dir/$target.corpus" 2>&1 |
        grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss|==|SUMMARY|ERROR)" >&2) || true
    if compgen -G "$dir/$target-*" >/dev/null; then
        echo "fuzz: $target found a failing input: $(ls "$dir/$target-"*)" >&2
        exit 1
    fi
done
echo "fuzz: no failure in $runs runs of each pump" >&2
