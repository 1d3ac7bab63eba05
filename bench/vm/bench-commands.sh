# Benchmark boot for `cargo xtask bench-commands`: the same device (host
# backend, 2 GiB, 1 queue of depth 128, its server pinned to vCPU 1, fio on
# vCPU 0) with batch commands (UBLK_F_BATCH_IO) and with per-tag commands,
# in turn, every round, alternating which goes first; the fio jobs of
# bench/jobs/run-jobs.sh on each.
. /lib/vm/lib.sh
. /lib/vm/devices.sh
load_modules
export FIO_CPUS=0
secs=${BENCH_SECS:-5}
rounds=${BENCH_ROUNDS:-3}
vramblk features | grep BATCH_IO | while read -r l; do info "features: $l"; done
if ! kernel_batches; then
    fail "bench: this kernel ($(uname -r)) offers no batch commands (UBLK_F_BATCH_IO, 7.0+)"
else
    info "bench: $rounds rounds, $secs s per job, batch and per-tag commands"
    r=1
    while [ $r -le "$rounds" ]; do
        if [ $((r % 2)) -eq 1 ]; then order="batch per-tag"; else order="per-tag batch"; fi
        for c in $order; do
            # auto is batch on this kernel; queues_serve_with checks it
            arg=auto
            [ "$c" = per-tag ] && arg=per-tag
            dev=$(setup_vramblk 2G "--io-commands $arg")
            if [ -b "$dev" ] && queues_serve_with 0 "$c"; then
                info "bench round $r: $c commands on $dev"
                sh /lib/vm/run-jobs.sh "$dev" "vramblk-$c" "$r" "$secs" fio
            else
                fail "bench round $r: could not set up a device with $c commands ($dev)"
                show_logs
            fi
            teardown_vramblk
            wait_for 30 nodes_gone 0
        done
        r=$((r + 1))
    done
fi
check "no kernel oops or hung task during the benchmark" no_oops
