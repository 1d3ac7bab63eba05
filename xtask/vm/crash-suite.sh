# Kernel-path suite, boot 3 (1 GiB RAM, 256 huge pages reserved): crash
# recovery. The server is SIGKILLed under a verifying fio load; its
# supervisor (holding the memory) has a standby take over, the kernel holds
# the I/O meanwhile, and no byte is lost. (Kills under
# swap pressure and a crash loop: crash-stress-suite.sh, an opt-in boot.)
. /lib/vm/lib.sh
insmod /lib/modules/ublk_drv.ko || fail "insmod ublk_drv"
FIO="fio --ioengine=io_uring --direct=1 --group_reporting --eta=never"
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

check "no kernel oops or hung task" no_oops
dmesg | grep -E 'ublk|Oops|BUG|hung' | tail -20 | while read -r l; do info "dmesg: $l"; done
