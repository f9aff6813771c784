#!/usr/bin/env bash
# Checks the NVTX ranges an example pushed, as counted by the injection
# library tests/nvtx/nvtx_count.c (see docs/DEVELOPMENT.md, "NVTX ranges").
# The GPU bundle's run.sh runs it after each example it ran with the library.
#
#   check.sh streaming RUN COUNTS LOG
#       The README's main job (the `streaming` example: a warm-up run and a
#       measured run of the same input). RUN is the run's range ("run_pinned"
#       on a GPU, "run" from pageable memory or on the host backend). N, the
#       chunks of one run, is read from the stats the example printed (LOG).
#       Expects: RUN 2; fma 2N; on a GPU upload 2N and download 2N (and,
#       with RUN=run, staging copy in 2N and out 2N).
#   check.sh coordinator COUNTS LOG
#       The `coordinator` example: queue_upload 2, "queue_compute: scale a" 1,
#       "queue_compute: shift b" 1, queue_download 2, wait 2.
#
# Both: every push popped on its own thread (pushes = pops, no bad pop, none
# left open), and no range in the domain "prism" but those (and "wait for
# the GPU", whose count depends on timing). Ranges of other domains (another
# library's) are listed, not failed: prism's missing from "prism" fail.
set -u
mode=${1:?usage: check.sh streaming RUN COUNTS LOG | coordinator COUNTS LOG}
shift
if [ "$mode" = streaming ]; then
    run=${1:?RUN}
    shift
fi
counts=${1:?COUNTS}
log=${2:?LOG}
if [ ! -s "$counts" ]; then
    echo "prism nvtx check: no counts in $counts (was the library loaded? see the example's log)"
    exit 1
fi
echo "prism nvtx check ($mode): counts from $counts"
sed 's/^/counts: /' "$counts"
bad=0
total() { awk -F'\t' -v k="$1" '$1 == k { print $2 }' "$counts"; }
count() { awk -F'\t' -v n="$1" '$1 == "range" && $2 == "prism" && $3 == n { c = $4 } END { print c + 0 }' "$counts"; }
declare -A want=()
expect() {
    want["$1"]=1
    local got
    got=$(count "$1")
    if [ "$got" = "$2" ]; then
        printf '  ok   %-28s %s\n' "$1" "$got"
    else
        printf '  FAIL %-28s %s, expected %s\n' "$1" "$got" "$2"
        bad=1
    fi
}
pushes=$(total pushes)
pops=$(total pops)
if [ -z "$pushes" ] || [ "$pushes" != "$pops" ] || [ "$(total bad_pops)" != 0 ] || [ "$(total open)" != 0 ]; then
    echo "  FAIL unbalanced: pushes $pushes, pops $pops, bad pops $(total bad_pops), open $(total open)"
    bad=1
else
    echo "  ok   balanced: $pushes pushes, $pops pops, on $(total threads) threads"
fi
case $mode in
streaming)
    n=$(grep -oE 'runs [0-9]+  chunks [0-9]+' "$log" | tail -1 | awk '{ print $4 }')
    if [ -z "$n" ]; then
        echo "  FAIL no 'runs R  chunks N' stats line in $log"
        exit 1
    fi
    echo "  the measured run had $n chunks (stats); the warm-up the same"
    expect "$run" 2
    expect fma $((2 * n))
    if grep -q "backend GPU" "$log"; then
        expect upload $((2 * n))
        expect download $((2 * n))
        if [ "$run" = run ]; then
            expect "staging copy in" $((2 * n))
            expect "staging copy out" $((2 * n))
        fi
    fi
    ;;
coordinator)
    expect queue_upload 2
    expect "queue_compute: scale a" 1
    expect "queue_compute: shift b" 1
    expect queue_download 2
    expect wait 2
    ;;
*)
    echo "nvtx check: unknown mode $mode"
    exit 2
    ;;
esac
want["wait for the GPU"]=1
while IFS=$'\t' read -r kind domain name c; do
    [ "$kind" = range ] || continue
    if [ "$domain" != prism ]; then
        # Another library's NVTX ranges (prism's would all be in "prism").
        printf '  note: a range outside the prism domain: %s / %s (%s)\n' "$domain" "$name" "$c"
    elif [ -z "${want[$name]:-}" ]; then
        printf '  FAIL unexpected range %-20s %s\n' "$name" "$c"
        bad=1
    fi
done <"$counts"
if [ $bad = 0 ]; then echo "prism nvtx check ($mode): OK"; else echo "prism nvtx check ($mode): FAILED"; fi
exit $bad
