# Kernel-path suite, boot 2 (1 GiB RAM, 256 huge pages reserved): the
# device as the only swap under real memory pressure.
. /lib/vm/lib.sh
insmod /lib/modules/ublk_drv.ko || fail "insmod ublk_drv"
info "MemTotal $(mem MemTotal) MiB, MemAvailable $(mem MemAvailable) MiB, HugePages_Free $(awk '/HugePages_Free/ {print $2}' /proc/meminfo)"

dev=$(vramblk add --size 512M --backend host --hugepages --swap --depth 64)
check "add --hugepages --swap gives /dev/ublkb0" [ "$dev" = /dev/ublkb0 ]
check "it is the only swap" [ "$(tail -n +2 /proc/swaps | cut -d' ' -f1)" = /dev/ublkb0 ]
avail=$(mem MemAvailable)
fill=$((avail + 256))
info "MemAvailable after add: $avail MiB; filling $fill MiB"
out0=$(awk '/^pswpout/ {print $2}' /proc/vmstat)
in0=$(awk '/^pswpin/ {print $2}' /proc/vmstat)
memcheck $fill 2 > /tmp/mc 2>&1
rc=$?
while read -r l; do info "$l"; done < /tmp/mc
check "memcheck: every byte of $fill MiB read back intact, two passes" [ $rc -eq 0 ]
out1=$(awk '/^pswpout/ {print $2}' /proc/vmstat)
in1=$(awk '/^pswpin/ {print $2}' /proc/vmstat)
info "pswpout $((out1 - out0)) pages, pswpin $((in1 - in0)) pages"
check "swap was really used (pswpout grew by > 32 MiB)" [ $((out1 - out0)) -gt 8192 ]
check "swap was read back (pswpin grew)" [ $((in1 - in0)) -gt 0 ]
check "nothing was OOM-killed" no_oom
check "no kernel oops or hung task" no_oops
out=$(vramblk del 0 2>&1)
check "swapoff and del after the pressure" [ "$out" = "removed /dev/ublkb0" ]
check "nodes gone" nodes_gone 0
