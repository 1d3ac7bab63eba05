# Benchmark boot 2 (one boot per device; 1 GiB RAM, 256 huge pages
# reserved): the device named by bench.swapdev= on the kernel command line
# as the only swap while a verified working set well above the free RAM is
# written and read back twice, with a latency probe running beside it.
. /lib/vm/lib.sh
. /lib/vm/devices.sh
load_modules
mem() { awk -v k="$1:" '$1 == k {print int($2 / 1024)}' /proc/meminfo; }
vmstat_of() { awk -v k="$1" '$1 == k {print $2}' /proc/vmstat; }
psi_full() { sed -n 's/^full .*total=\([0-9]*\).*/\1/p' /proc/pressure/memory; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

kind=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^bench.swapdev=//p')
label=$(echo $kind | tr _ -)
avail0=$(mem MemAvailable)
fill=$((avail0 + 256))
extra=""
[ "$kind" = vramblk ] && extra="--hugepages"
[ "$kind" = nbd ] && extra="-swap"
dev=$(setup_$kind 512M "$extra")
if [ ! -b "$dev" ]; then
    echo "BENCH-SWAP $label setup-failed"
    exit 0
fi
/sbin/mkswap "$dev" >/dev/null && /sbin/swapon -p 100 "$dev" || { echo "BENCH-SWAP $label swapon-failed"; exit 0; }
info "swap bench: $label on $dev; MemAvailable $avail0 MiB at boot, $(mem MemAvailable) MiB after setup; filling $fill MiB"
# A heartbeat for the host (when it stops, the guest is hung); it also
# calls the run hung when swap has not moved for 20 s while the load runs.
(
    last=""
    same=0
    while :; do
        sleep 5
        now="pswpout=$(vmstat_of pswpout) pswpin=$(vmstat_of pswpin)"
        echo "BENCH-HEARTBEAT $now"
        if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; fi
        last=$now
        if [ $same -ge 4 ]; then
            echo "BENCH-SWAP $label hung"
            poweroff -f
        fi
    done
) &
heartbeat=$!
rm -f /tmp/latprobe.stop
latprobe 600 >/tmp/latprobe.out 2>&1 &
out0=$(vmstat_of pswpout); in0=$(vmstat_of pswpin); psi0=$(psi_full); t0=$(uptime_s)
memcheck $fill 2 >/tmp/mc 2>&1
rc=$?
kill $heartbeat 2>/dev/null
t1=$(uptime_s); out1=$(vmstat_of pswpout); in1=$(vmstat_of pswpin); psi1=$(psi_full)
touch /tmp/latprobe.stop
sleep 1
while read -r l; do info "$l"; done </tmp/mc
oom=0
no_oom || oom=1
echo "BENCH-SWAP $label done rc=$rc oom=$oom fill_mib=$fill secs=$(awk -v a=$t0 -v b=$t1 'BEGIN {print b - a}') pswpout=$((out1 - out0)) pswpin=$((in1 - in0)) psi_full_us=$((psi1 - psi0)) $(cat /tmp/latprobe.out)"
no_oops || echo "BENCH-SWAP $label oops"
/sbin/swapoff "$dev"
teardown_$kind
