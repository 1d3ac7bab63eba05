# Opt-in boot (VRAMBLK_VM_SUITE=crash-stress; 1.25 GiB RAM, 256 huge pages):
# the swap-kill shape (swap_kill_run in lib.sh) run after run, with the
# defaults and other queue shapes, then a crash loop.
. /lib/vm/lib.sh
insmod /lib/modules/ublk_drv.ko || fail "insmod ublk_drv"
echo 20 > /proc/sys/kernel/hung_task_timeout_secs
rm -f /tmp/pswatch.stop
pswatch 15 &
# Five rounds of four shapes (20 runs of 20 kills): the defaults (512M,
# one queue per CPU, depth 64), one deep queue, many shallow ones, a
# smaller device with more pressure.
for round in 1 2 3 4 5; do
    swap_kill_run "defaults, round $round" 512M "" 200 1 20
    swap_kill_run "1 queue x 128, round $round" 512M "--queues 1 --depth 128" 200 1 20
    swap_kill_run "4 queues x 16, round $round" 512M "--queues 4 --depth 16" 200 1 20
    swap_kill_run "256M, round $round" 256M "" 150 1 20
done

# --- 3. a crash loop: every new server is killed at once
dev=$(vramblk add --size 64M --backend host)
check "crash loop: add 64M" [ "$dev" = /dev/ublkb0 ]
holder=$(holder_pid 0)
first=$(daemon_pid 0)
kill -9 "$first"
(
    # crash every server the supervisor starts (SIGABRT, as a failed
    # assertion would), for up to 90 s; SIGKILLs are not crashes
    i=0
    while [ $i -lt 900 ] && kill -0 "$holder" 2>/dev/null; do
        for p in $(pidof vramblk); do
            [ "$p" != "$holder" ] && kill -ABRT "$p" 2>/dev/null
        done
        sleep 0.1
        i=$((i + 1))
    done
) &
killer=$!
# I/O that keeps the device open and waits in the kernel while no server runs
$FIO --name=loop --filename=$dev --rw=randread --bs=4k --iodepth=4 --runtime=300 --time_based \
    --output=/tmp/fio-loop.txt &
fpid=$!
i=0
while kill -0 "$holder" 2>/dev/null && [ $i -lt 180 ]; do sleep 0.5; i=$((i + 1)); done
check "the supervisor gives up within 90 s of a crash loop" sh -c "! kill -0 $holder 2>/dev/null"
info "supervisor gone after about $((i / 2)) s"
kill $killer 2>/dev/null
check "it says why" grep -q "giving up on /dev/ublkb0: its server died 5 times in a row" /run/vramblk/*.log
fio_ends_failing $fpid 60 "the give-up"
check "the device was removed" nodes_gone 0
check "no kernel oops or hung task after the crash loop" no_oops
touch /tmp/pswatch.stop
