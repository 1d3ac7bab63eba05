# Benchmark boot 1: every job of bench/jobs/run-jobs.sh on each device in
# turn, 2 GiB each, fio on vCPU 0 and each server on vCPU 1. Round 1 runs
# every job (rublk null, which keeps no data, only the fio jobs); later
# rounds run the fio jobs again on the devices the targets compare
# (vramblk, rublk null, NBD), in reverse order, to show the spread.
. /lib/vm/lib.sh
. /lib/vm/devices.sh
load_modules
export FIO_CPUS=0
secs=${BENCH_SECS:-5}
rounds=${BENCH_ROUNDS:-2}
kinds="vramblk rublk_null rublk_loop nbd zram"
info "bench: $rounds rounds, $secs s per job, devices: $kinds"
r=1
while [ $r -le "$rounds" ]; do
    [ $r -eq 1 ] && order=$kinds || order="nbd rublk_null vramblk"
    for k in $order; do
        which=all
        [ $r -gt 1 ] || [ $k = rublk_null ] && which=fio
        label=$(echo $k | tr _ -)
        dev=$(setup_$k 2G)
        if [ -b "$dev" ]; then
            info "bench round $r: $label on $dev"
            sh /lib/vm/run-jobs.sh "$dev" "$label" "$r" "$secs" "$which"
        else
            fail "bench round $r: could not set up $label ($dev)"
        fi
        teardown_$k
    done
    r=$((r + 1))
done
check "no kernel oops or hung task during the benchmark" no_oops
