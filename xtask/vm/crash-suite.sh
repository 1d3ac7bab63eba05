# Kernel-path suite, boot 3 (1 GiB RAM, 256 huge pages reserved): crash
# recovery. The server is SIGKILLed under a verifying fio load and under
# swap pressure; its supervisor (holding the memory) restarts it, the
# kernel holds the I/O meanwhile, and no byte is lost. Then a crash loop:
# the supervisor gives up and removes the device, so I/O fails, not hangs.
. /lib/vm/lib.sh
insmod /lib/modules/ublk_drv.ko || fail "insmod ublk_drv"
FIO="fio --ioengine=io_uring --direct=1 --group_reporting --eta=never"
mem() { awk -v k="$1:" '$1 == k {print int($2 / 1024)}' /proc/meminfo; }

holder_pid() {
    sed -n 's/.*"holder_pid": *\([0-9]*\).*/\1/p' /run/vramblk/ublkb$1.json 2>/dev/null
}

# wait_recovered ID OLD_PID: a new server serves the device within 60 s
wait_recovered() {
    i=0
    while [ $i -lt 120 ]; do
        p=$(daemon_pid $1 2>/dev/null)
        if [ -n "$p" ] && [ "$p" != "$2" ] && vramblk list 2>/dev/null | grep -q "^$1 .* live "; then
            info "recovered: server $2 -> $p after about $((i / 2)) s"
            return 0
        fi
        sleep 0.5
        i=$((i + 1))
    done
    return 1
}

# kill_servers ID N GAP: SIGKILL the serving process N times, GAP seconds
# after each recovery
kill_servers() {
    k=1
    while [ $k -le $2 ]; do
        sleep $3
        p=$(daemon_pid $1)
        kill -9 "$p"
        info "kill $k: SIGKILLed server $p"
        wait_recovered $1 "$p" || { fail "device $1 not recovered after kill $k"; show_logs; return 1; }
        k=$((k + 1))
    done
}

# --- 1. fio random writes with crc32c headers while the server is killed
dev=$(vramblk add --size 448M --backend host --hugepages --queues 2)
check "add (hugetlb memfd, 448 MiB)" [ "$dev" = /dev/ublkb0 ] || show_logs
holder=$(holder_pid 0)
check "the record names a live supervisor apart from the server" \
    sh -c "[ -n '$holder' ] && [ '$holder' != '$(daemon_pid 0)' ] && kill -0 $holder"
out=$(vramblk recover 0 2>&1)
check "recover on a live device: nothing to do" sh -c "echo '$out' | grep -q 'nothing to recover'"
$FIO --name=crash --filename=$dev --rw=randwrite --bs=4k --iodepth=32 --size=100% \
    --rate_iops=4000 --verify=crc32c --do_verify=0 --output=/tmp/fio-c.txt &
fpid=$!
kill_servers 0 3 2
check "fio was still writing after the third recovery" kill -0 $fpid
wait $fpid
rc=$?
check "fio finished its write pass with no I/O error through 3 server kills" [ $rc -eq 0 ] || tail -5 /tmp/fio-c.txt
$FIO --name=crash --filename=$dev --rw=randwrite --bs=4k --iodepth=32 --size=100% \
    --verify=crc32c --verify_only --output=/tmp/fio-cv.txt
rc=$?
grep -q "verify: bad" /tmp/fio-cv.txt && rc=99
check "fio verify-only pass: every block intact after the kills (crc32c)" [ $rc -eq 0 ] || tail -20 /tmp/fio-cv.txt
check "the supervisor logged the recoveries" grep -q "recovered" /run/vramblk/*.log
check "restarts counted in the record" grep -q '"restarts": 3' /run/vramblk/ublkb0.json
check "no kernel oops or hung task after the fio kills" no_oops
out=$(vramblk del 0 2>&1)
check "del after the kills" [ "$out" = "removed /dev/ublkb0" ]
i=0
while daemon_alive && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
check "supervisor and server exit after del" daemon_gone

# --- 2. as the only swap under memory pressure while the server is killed
echo 20 > /proc/sys/kernel/hung_task_timeout_secs
rm -f /tmp/pswatch.stop
pswatch 15 &
dev=$(vramblk add --size 448M --backend host --hugepages --swap --depth 64 --queues 2)
check "add --swap (hugetlb)" [ "$dev" = /dev/ublkb0 ] || show_logs
avail=$(mem MemAvailable)
fill=$((avail + 200))
info "MemAvailable $avail MiB; memcheck fills $fill MiB twice while the server is killed 3 times"
out0=$(awk '/^pswpout/ {print $2}' /proc/vmstat)
memcheck $fill 2 > /tmp/mc 2>&1 &
mpid=$!
kill_servers 0 3 4
wait $mpid
rc=$?
while read -r l; do info "$l"; done < /tmp/mc
out1=$(awk '/^pswpout/ {print $2}' /proc/vmstat)
info "pswpout $((out1 - out0)) pages"
check "memcheck: every byte read back intact through 3 server kills" [ $rc -eq 0 ]
check "swap was really used (pswpout grew by > 32 MiB)" [ $((out1 - out0)) -gt 8192 ]
touch /tmp/pswatch.stop
check "nothing was OOM-killed" no_oom
check "no kernel oops or hung task after the swap kills" no_oops
out=$(vramblk del 0 2>&1)
check "swapoff and del after the swap kills" [ "$out" = "removed /dev/ublkb0" ]

# --- 3. a crash loop: every new server is killed at once
dev=$(vramblk add --size 64M --backend host)
holder=$(holder_pid 0)
first=$(daemon_pid 0)
kill -9 "$first"
(
    # kill every server the supervisor starts, for up to 90 s
    i=0
    while [ $i -lt 900 ] && kill -0 "$holder" 2>/dev/null; do
        for p in $(pidof vramblk); do
            [ "$p" != "$holder" ] && kill -9 "$p" 2>/dev/null
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
dmesg | grep -E 'ublk|Oops|BUG|hung' | tail -20 | while read -r l; do info "dmesg: $l"; done
