# Kernel-path suite, boot 4 (systemd 252 as PID 1; 1 GiB RAM, 1.25 GiB on 7.x, 256 huge
# pages): systemd/vramblk.service as shipped, under real systemd: READY=1,
# ExecStop, Restart=on-failure, and the fd store (FDSTORE=1 from the main
# process, LISTEN_FDS at the restart). Only the unit's output is redirected
# (a drop-in: no journald here).
. /lib/vm/lib.sh
insmod /lib/modules/ublk_drv.ko || fail "insmod ublk_drv"
LOG=/run/vramblk-service.log
info "$(systemctl --version | head -1)"
cat > /etc/vramblk.toml <<'CFG'
[[device]]
size = "192M"
backend = "host"
hugepages = true
queues = 2
CFG
check "systemctl start vramblk: returns once the service says READY=1" systemctl start vramblk || { systemctl status vramblk --no-pager; cat $LOG; }
check "systemd: the configured device is up as swap" swap_on /dev/ublkb0
check "systemd: the unit is active" [ "$(systemctl is-active vramblk)" = active ]
main=$(systemctl show -p MainPID --value vramblk)
check "systemd: MainPID is vramblk's service" grep -q service /proc/$main/cmdline
check "systemd: the service holds the memfd" wait_for 10 sh -c "vramblk status | grep -q 'holds the memory of /dev/ublkb0 too'"
swapoff /dev/ublkb0
$FIO --name=sd --filename=/dev/ublkb0 --rw=randwrite --bsrange=4k-64k --iodepth=32 --size=100% \
    --rate_iops=1000 --verify=crc32c --do_verify=0 --output=/tmp/fio-sd.txt &
fpid=$!
sleep 3
check "systemd kill 1 (supervisor + server): the service adopted the device" kill_device0 "kill 1" $LOG
sleep 3
check "systemd kill 2 (main + supervisor + server): the restarted service adopted the device" kill_device0 "kill 2" $LOG "$main" || systemctl status vramblk --no-pager
main2=$(systemctl show -p MainPID --value vramblk)
check "systemd restarted the service (MainPID $main -> $main2)" sh -c "[ -n '$main2' ] && [ '$main2' != 0 ] && [ '$main2' != '$main' ]"
check "systemd handed the memfd back from its fd store (LISTEN_FDS)" grep -q "systemd handed back the memory of /dev/ublkb0" $LOG
# systemd 252 goes straight to stopping a unit whose main process failed,
# without ExecStop (its documentation says the stop is always performed:
# `vramblk down` checks SERVICE_RESULT for that case, tested under the
# fd-store stand-in in the crash boot).
check "systemd: the crash did not take the device down" sh -c "! grep -q 'down: device 0' $LOG"
check "systemd: fio was still writing after both kills" kill -0 $fpid
wait $fpid
rc=$?
check "systemd: fio wrote through both kills with no I/O error" [ $rc -eq 0 ] || tail -5 /tmp/fio-sd.txt
fio_verified "systemd: verify-only pass: every block intact after both kills (crc32c)" /tmp/fio-sdv.txt \
    --name=sd --filename=/dev/ublkb0 --rw=randwrite --bsrange=4k-64k --iodepth=32 --size=100%
check "systemctl stop vramblk" systemctl stop vramblk
check "systemd: the unit is inactive after stop" [ "$(systemctl is-active vramblk)" = inactive ]
check "systemd: the device is removed" wait_for 30 nodes_gone 0
check "systemd: every vramblk process is gone" wait_for 30 daemon_gone
while read -r l; do info "service: $l"; done < $LOG
check "no kernel oops or hung task (systemd boot)" no_oops
