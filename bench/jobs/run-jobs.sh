#!/bin/sh
# The benchmark jobs, runnable against any block device (they overwrite it):
#
#   sh bench/jobs/run-jobs.sh DEVICE LABEL [ROUND] [SECONDS] [JOBS]
#
# DEVICE must hold at least 2 GiB (the seed's dd moves 2 GiB). SECONDS is
# the run time of the jobs that are not the seed's own (default 5). JOBS
# picks a subset: "all" (default) or "fio" (the fio jobs only, for the
# repeat rounds). FIO_CPUS pins fio (default: no pinning).
#
# Output, one record per job, for `cargo xtask bench` to parse:
#   BENCH-DD LABEL JOB ROUND :: BYTES SECONDS
#   BENCH-IOPING LABEL ROUND :: <ioping -B raw statistics>
#   BENCH-FIO-BEGIN LABEL JOB ROUND / <fio JSON> / BENCH-FIO-END
#
# The first three are nbd-vram's README benchmarks as it ran them (dd with
# 4 MiB blocks from /dev/zero, O_DIRECT; ioping; fio randrw qd32 for 20 s);
# "par16x8" is its later parallel read; the rest add queue depths 1 and
# 128 with latency percentiles and 1 MiB sequential at depth 8.
dev=$1
label=$2
round=${3:-1}
secs=${4:-5}
jobs=${5:-all}
if [ -z "$dev" ] || [ -z "$label" ] || [ ! -b "$dev" ]; then
    echo "usage: run-jobs.sh DEVICE LABEL [ROUND] [SECONDS] [all|fio]" >&2
    exit 2
fi
pin=""
[ -n "$FIO_CPUS" ] && pin="--cpus_allowed=$FIO_CPUS"

# dd_job COMMAND...: times dd itself (dd's own summary line did not reach
# the console in the VM); prints bytes moved and seconds.
dd_job() {
    t0=$(cut -d' ' -f1 /proc/uptime)
    if "$@" 2>/tmp/dd.err; then
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "BENCH-DD $label $job $round :: $((4 * 1024 * 1024 * 512)) $(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')"
    else
        echo "BENCH-DD $label $job $round :: failed: $(tail -1 /tmp/dd.err)"
    fi
}

fio_job() {
    job=$1; shift
    out=/tmp/fio-$label-$job-$round.json
    fio --name="$job" --filename="$dev" --ioengine=libaio --direct=1 \
        --size=512m --group_reporting --output-format=json $pin "$@" >"$out" 2>/tmp/fio.err
    echo "BENCH-FIO-BEGIN $label $job $round"
    cat "$out"
    echo "BENCH-FIO-END"
}

if [ "$jobs" = all ]; then
    job=dd-write
    dd_job dd if=/dev/zero of="$dev" bs=4M count=512 oflag=direct
    job=dd-read
    dd_job dd if="$dev" of=/dev/null bs=4M count=512 iflag=direct
    echo "BENCH-IOPING $label $round :: $(ioping -c 20 -D -B -q "$dev" 2>&1 | tail -1)"
fi
# random data over the region the fio jobs use, so reads do not hit
# never-written (or all-zero) blocks that some devices answer for free
fio --name=prefill --filename="$dev" --ioengine=libaio --direct=1 \
    --rw=write --bs=1M --iodepth=8 --size=512m $pin >/dev/null 2>&1
fio_job seed-randrw --rw=randrw --bs=4k --iodepth=32 --runtime=20 --time_based
fio_job par16x8 --rw=randread --bs=4k --iodepth=8 --numjobs=16 --runtime="$secs" --time_based
fio_job randread-qd1 --rw=randread --bs=4k --iodepth=1 --runtime="$secs" --time_based
fio_job randread-qd128 --rw=randread --bs=4k --iodepth=128 --runtime="$secs" --time_based
fio_job randwrite-qd128 --rw=randwrite --bs=4k --iodepth=128 --runtime="$secs" --time_based
fio_job seqwrite-1m --rw=write --bs=1M --iodepth=8 --runtime="$secs" --time_based
fio_job seqread-1m --rw=read --bs=1M --iodepth=8 --runtime="$secs" --time_based
