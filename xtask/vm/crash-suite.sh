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

# --- 2. the cuda backend through the kernel path, on the stand-in libcuda
# (cuda-store/tests/stub: host memory on huge pages behind the CUDA driver
# calls). It runs vramblk's cuda code (allocation, export to the supervisor,
# import by the next server, the copy kernel's descriptor tables, erase) on
# real ublk; it says nothing about a GPU.
STUB="env LD_LIBRARY_PATH=/opt/cudastub VRAMBLK_STUB_HUGETLB=1 VRAMBLK_STUB_VRAM_MIB=512"
dev=$($STUB vramblk add --size 256M --reserve 0 --queues 2 2>/tmp/add-cuda.txt)
check "add --backend cuda (the default) on the stub libcuda" [ "$dev" = /dev/ublkb0 ] || { cat /tmp/add-cuda.txt; show_logs; }
check "the record says cuda, on the stub" grep -q '"store": "cuda vramblk stub GPU' /run/vramblk/ublkb0.json
$FIO --name=cuda --filename=$dev --rw=randwrite --bsrange=4k-64k --iodepth=32 --size=100% \
    --rate_iops=1000 --verify=crc32c --do_verify=0 --output=/tmp/fio-g.txt &
fpid=$!
kill_servers 0 2 2
wait $fpid
rc=$?
check "cuda (stub): fio mixed sizes wrote through 2 server kills with no I/O error" [ $rc -eq 0 ] || tail -5 /tmp/fio-g.txt
$FIO --name=cuda --filename=$dev --rw=randwrite --bsrange=4k-64k --iodepth=32 --size=100% \
    --verify=crc32c --verify_only --output=/tmp/fio-gv.txt
rc=$?
grep -q "verify: bad" /tmp/fio-gv.txt && rc=99
check "cuda (stub): verify-only pass after the kills: the VRAM fds outlived both servers" [ $rc -eq 0 ] || tail -20 /tmp/fio-gv.txt
check "cuda (stub): the next servers imported the VRAM" grep -q "imported from" /run/vramblk/*.log
out=$(vramblk del 0 2>&1)
check "cuda (stub): del" [ "$out" = "removed /dev/ublkb0" ]
i=0
while daemon_alive && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
check "cuda (stub): the server erased the VRAM before letting go" grep -q "VRAM erased" /run/vramblk/*.log
dev=$($STUB vramblk add --size 128M --reserve 0 --queues 1 --copy-mode dma)
$FIO --name=dma --filename=$dev --rw=randwrite --bsrange=4k-512k --iodepth=16 --size=100% \
    --verify=crc32c --output=/tmp/fio-d.txt
rc=$?
grep -q "verify: bad" /tmp/fio-d.txt && rc=99
check "cuda (stub) --copy-mode dma: fio write + verify" [ $rc -eq 0 ] || tail -10 /tmp/fio-d.txt
check "cuda (stub) --copy-mode dma: the store says so" grep -q "copy engines only" /run/vramblk/*.log
vramblk del 0 > /dev/null 2>&1

check "no kernel oops or hung task" no_oops
dmesg | grep -E 'ublk|Oops|BUG|hung' | tail -20 | while read -r l; do info "dmesg: $l"; done
