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
out0=$(vmstat_of pswpout)
in0=$(vmstat_of pswpin)
memcheck $fill 2 > /tmp/mc 2>&1
rc=$?
while read -r l; do info "$l"; done < /tmp/mc
check "memcheck: every byte of $fill MiB read back intact, two passes" [ $rc -eq 0 ]
out1=$(vmstat_of pswpout)
in1=$(vmstat_of pswpin)
info "pswpout $((out1 - out0)) pages, pswpin $((in1 - in0)) pages"
check "swap was really used (pswpout grew by > 32 MiB)" [ $((out1 - out0)) -gt 8192 ]
check "swap was read back (pswpin grew)" [ $((in1 - in0)) -gt 0 ]
check "nothing was OOM-killed" no_oom
check "no kernel oops or hung task" no_oops
out=$(vramblk del 0 2>&1)
check "swapoff and del after the pressure" [ "$out" = "removed /dev/ublkb0" ]
check "nodes gone" nodes_gone 0
# del returns once the server and supervisor exited: the next device
# (up, just below) needs the same huge pages.
check "del returned with every huge page free again" [ "$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)" = 256 ]

# --- a discard gives huge pages back and reads back as zeros
dev=$(vramblk add --size 32M --backend host --hugepages --queues 1 --depth 16)
hfree() { awk '/HugePages_Free/ {print $2}' /proc/meminfo; }
M=1048576
dd if=/dev/urandom of=/tmp/rand bs=1M count=32 2>/dev/null
dd if=/tmp/rand of=$dev bs=1M oflag=direct 2>/dev/null
before=$(hfree)
blkdiscard -o $((8 * M)) -l $((16 * M)) $dev
after=$(hfree)
info "HugePages_Free $before -> $after after discarding 16 MiB"
check "a discard of 16 MiB gives its 8 huge pages back" [ $((after - before)) -eq 8 ]
dd if=$dev of=/tmp/back bs=1M iflag=direct 2>/dev/null
check "the discarded range reads back as zeros" cmp -s -n $((16 * M)) /tmp/back /dev/zero $((8 * M)) 0
check "the rest is intact" sh -c "cmp -s -n $((8 * M)) /tmp/back /tmp/rand && cmp -s /tmp/back /tmp/rand $((24 * M)) $((24 * M))"
dd if=/tmp/rand of=$dev bs=1M skip=8 seek=8 count=16 oflag=direct 2>/dev/null
dd if=$dev of=/tmp/back bs=1M iflag=direct 2>/dev/null
check "writes into the hole land again" cmp -s /tmp/back /tmp/rand
rm -f /tmp/rand /tmp/back
out=$(vramblk del 0 2>&1)
check "del of the discard device" [ "$out" = "removed /dev/ublkb0" ]

# --- the service side (issue 5): up/down from a config file, status --json,
# --- down refusing while RAM cannot take the pages back, the power policy.
cat > /etc/vramblk.toml <<'CFG'
[[device]]
size = "512M"
backend = "host"
hugepages = true
priority = 1234
depth = 64
CFG
out=$(vramblk config check /etc/vramblk.toml 2>&1)
check "config check reads the file" has "$out" "ok, 1 device"
out=$(vramblk up 2>&1)
info "up: $out"
check "up brings the configured device up as swap" swap_on /dev/ublkb0
check "at the configured priority" [ "$(awk '$1 == "/dev/ublkb0" {print $5}' /proc/swaps)" = 1234 ]
out=$(vramblk up 2>&1)
check "up again finds it already up" has "$out" "already up as /dev/ublkb0"
vramblk status --json > /tmp/status.json 2>&1
check "status --json parses: the device serves config entry 0" [ "$(jsonq /tmp/status.json devices.0.config_entry)" = 0 ]
check "status --json: swap priority 1234, backend host" [ "$(jsonq /tmp/status.json devices.0.swap.priority)/$(jsonq /tmp/status.json devices.0.backend)" = 1234/host ]
check "status --json: the server answers on its socket" [ "$(jsonq /tmp/status.json devices.0.server.queues)" -ge 1 ]
vramblk status > /tmp/status.txt 2>&1
while read -r l; do info "status: $l"; done < /tmp/status.txt

hold_in_swap 200 /tmp/mc2
used=$(awk '$1 == "/dev/ublkb0" {print int($4 / 1024)}' /proc/swaps)
info "held: $used MiB in swap, MemAvailable $(mem MemAvailable) MiB"
out=$(vramblk down 2>&1); rc=$?
info "down: $out"
check "down refuses while RAM cannot take the pages back" [ $rc -ne 0 ]
check "and says the device is left serving" has "$out" "left serving"
check "the device is still swap" swap_on /dev/ublkb0
touch /tmp/go
wait $mc
rc=$?
while read -r l; do info "$l"; done < /tmp/mc2
check "memcheck after the refused down: every byte intact" [ $rc -eq 0 ]
vramblk status --json > /tmp/status.json 2>&1
check "status --json: the server counted the swap writes" [ "$(jsonq /tmp/status.json devices.0.server.writes)" -gt 0 ]
info "server p50/p99 us: $(jsonq /tmp/status.json devices.0.server.p50_us)/$(jsonq /tmp/status.json devices.0.server.p99_us)"
out=$(vramblk down 2>&1); rc=$?
info "down: $out"
check "down succeeds once the pages fit in RAM" [ $rc -eq 0 ]
check "no swap left, device gone" no_swap
check "nodes gone after down" nodes_gone 0
check "nothing was OOM-killed (service part)" no_oom

# The power policy, with a fake power-supply tree.
ps=/tmp/sys/class/power_supply
mkdir -p $ps/AC $ps/BAT0
echo Mains > $ps/AC/type; echo 1 > $ps/AC/online
echo Battery > $ps/BAT0/type; echo 80 > $ps/BAT0/capacity
cat > /etc/vramblk-power.toml <<'CFG'
[[device]]
size = "64M"
backend = "host"
priority = 77
queues = 1

[power]
enabled = true
poll_secs = 3600
CFG
vramblk service --config /etc/vramblk-power.toml --sysfs /tmp/sys > /tmp/svc.log 2>&1 &
svc=$!
check "service: on AC the configured device comes up as swap" wait_for 60 any_swap
check "service: status shows the power state" wait_for 10 sh -c 'vramblk status --json > /tmp/s.json && [ "$(jsonq /tmp/s.json service.power)" = "on AC, battery 80%" ]'
echo 0 > $ps/AC/online
kill -USR1 $svc
check "service: on battery it swaps off and removes the device" wait_for 60 no_swap
echo 1 > $ps/AC/online
kill -USR1 $svc
check "service: back on AC the device returns" wait_for 60 any_swap
kill -TERM $svc
wait $svc
rc=$?
while read -r l; do info "service: $l"; done < /tmp/svc.log
check "service: SIGTERM takes the device down and exits 0" [ $rc -eq 0 ]
check "service: no swap left" no_swap
check "service: the device is gone" wait_for 30 nodes_gone 0
check "no kernel oops or hung task (service part)" no_oops
check "service: every vramblk process exits after the stop" wait_for 60 daemon_gone

# --- the service's VRAM-pressure policy on the cuda backend (stand-in
# libcuda; free VRAM read from files the suite writes instead of NVML).
start_pressure_service 192M /tmp/svcp.log "$STUB_ENV"
sp=$psvc
check "pressure: the cuda device (stub) comes up as swap" wait_for 60 swap_on /dev/ublkb0 || cat /tmp/svcp.log
hold_in_swap 100 /tmp/mcp
info "pressure: $(awk '$1 == "/dev/ublkb0" {print int($4 / 1024)}' /proc/swaps) MiB in swap, MemAvailable $(mem MemAvailable) MiB"
echo 100M > /tmp/vram/0
check "pressure while RAM cannot take the pages back: the service keeps the device and says so" wait_for 30 grep -q "keeping GPU 0's devices" /tmp/svcp.log
check "pressure while RAM is short: the device is still swap" swap_on /dev/ublkb0
touch /tmp/go
wait $mc
rc=$?
check "pressure while RAM is short: memcheck read every byte back intact" [ $rc -eq 0 ] || cat /tmp/mcp
check "pressure: once RAM can take the pages, the device is swapped off and removed" wait_for 30 nodes_gone 0
check "pressure: no swap left" no_swap
vramblk status --json > /tmp/sp.json 2>&1
check "pressure: status --json says GPU 0 is released" has "$(jsonq /tmp/sp.json service.pressure.0)" released
echo 8G > /tmp/vram/0
check "pressure gone for calm_secs: the device comes back as swap" wait_for 60 swap_on /dev/ublkb0
vramblk status --json > /tmp/sp.json 2>&1
check "pressure: status --json says GPU 0 is holding again" [ "$(jsonq /tmp/sp.json service.pressure.0)" = holding ]
kill -TERM $sp
wait $sp
while read -r l; do info "pressure service: $l"; done < /tmp/svcp.log
check "pressure: SIGTERM takes the device down" wait_for 30 nodes_gone 0
check "nothing was OOM-killed (pressure part)" no_oom
check "no kernel oops or hung task (pressure part)" no_oops

# --- a compressed device (issue 18) as the only swap under pressure, on
# the stand-in libcuda (its C port of the page codec; never GPU evidence)
# with its "VRAM" in the reserved huge pages, outside the RAM relieved: a
# 1 GiB device holding 512 MiB, and a working set of compressible pages
# 400 MiB beyond what is available (the guest has under 1 GiB), two passes.
Z_ENV="LD_LIBRARY_PATH=/opt/cudastub VRAMBLK_STUB_HUGETLB=1 VRAMBLK_STUB_VRAM_MIB=600"
dev=$(env $Z_ENV vramblk add --size 1G --reserve 0 --compress lz --swap --depth 64 2>/tmp/add-z.txt)
check "compressed swap: a 1 GiB lz device (stub) comes up as swap" [ "$dev" = /dev/ublkb0 ] || { cat /tmp/add-z.txt; show_logs; }
held=$(zq held)
info "compressed swap: holds $((held >> 20)) MiB of VRAM, MemAvailable $(mem MemAvailable) MiB"
fill=$(($(mem MemAvailable) + 400))
out0=$(vmstat_of pswpout)
t0=$(date +%s)
(while sleep 20; do info "swap: $(vmstat_of pswpout) out, $(vmstat_of pswpin) in, MemAvailable $(mem MemAvailable)"; done) &
watch=$!
memcheck $fill 2 --compressible > /tmp/mcz 2>&1
rc=$?
kill $watch
info "compressed swap: memcheck took $(( $(date +%s) - t0 )) s"
while read -r l; do info "$l"; done < /tmp/mcz
check "compressed swap: every byte of $fill MiB of compressible pages read back intact, two passes" [ $rc -eq 0 ]
out1=$(vmstat_of pswpout)
info "compressed swap: pswpout $((out1 - out0)) pages"
check "compressed swap: more was swapped out than the VRAM it holds" [ $(((out1 - out0) * 4096)) -gt "$held" ]
vramblk status | grep "compress lz" | while read -r l; do info "status: $l"; done
check "compressed swap: nothing was OOM-killed" no_oom
check "compressed swap: no kernel oops or hung task" no_oops
out=$(vramblk del 0 2>&1)
check "compressed swap: swapoff and del" [ "$out" = "removed /dev/ublkb0" ]
check "compressed swap: every vramblk process exits" wait_for 60 daemon_gone
