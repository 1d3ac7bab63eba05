# The corpus swap boot (issue 18's measure; opt-in:
# VRAMBLK_VM_SUITE=corpus-swap cargo xtask vm-test, after `cargo xtask
# corpus`): a compressed device on the stand-in libcuda (its C port of the
# page codec; never GPU evidence), its "VRAM" in reserved huge pages
# outside the RAM it relieves, is the only swap, and a working set of real
# programs' pages (a sample of the corpus, repeated and shifted every pass)
# overflows the RAM by twice the VRAM the device may hold. It must
# complete, every byte read back, with more swapped out than the device
# holds twice over.
. /lib/vm/lib.sh
insmod /lib/modules/ublk_drv.ko || fail "insmod ublk_drv"
# The stand-in offers 600 MiB; the device takes its VRAM in 512 MiB chunks
# (256 huge pages hold them), so it holds one.
Z_ENV="LD_LIBRARY_PATH=/opt/cudastub VRAMBLK_STUB_HUGETLB=1 VRAMBLK_STUB_VRAM_MIB=600"
sample=/corpus/swap-sample.pages
info "corpus swap: $(( $(stat -c %s $sample) >> 20 )) MiB of program pages in $sample"
dev=$(env $Z_ENV vramblk add --size 2G --reserve 0 --compress lz --swap --depth 64 2>/tmp/add-z.txt)
check "corpus swap: a 2 GiB lz device on (stand-in) VRAM comes up as the only swap" \
    [ "$dev" = /dev/ublkb0 ] || { cat /tmp/add-z.txt; show_logs; exit 0; }
held=$(zq held)
# Twice the VRAM beyond what is available, and a margin: the kernel keeps
# some of the working set resident (1013-1028 MiB of 1024 swapped out in
# two runs without it).
beyond=$((2 * (held >> 20) + 48))
info "corpus swap: the device holds $((held >> 20)) MiB of VRAM"
fill=$(($(mem MemAvailable) + beyond))
info "corpus swap: MemAvailable $(mem MemAvailable) MiB; filling $fill MiB ($beyond MiB beyond it), two passes"
out0=$(vmstat_of pswpout)
t0=$(date +%s)
(while sleep 30; do info "swap: $(vmstat_of pswpout) out, $(vmstat_of pswpin) in, VRAM held $(( $(zq held) >> 20 )) MiB, COMPR $(( $(zq compressed.compr) >> 20 )) MiB"; done) &
watch=$!
memcheck $fill 2 --pages $sample --hold /tmp/go-on > /tmp/mc 2>&1 &
mc=$!
# After the first pass is written (its pages in swap), the device's
# figures; then the reads and the second pass.
wait_for 1800 grep -q "holding until" /tmp/mc
out1=$(vmstat_of pswpout)
held=$(zq held)
data=$(zq compressed.data)
compr=$(zq compressed.compr)
total=$(zq compressed.total)
info "CORPUS-SWAP pass 0: swapped out $(( (out1 - out0) >> 8 )) MiB; the device stores DATA $((data >> 20)) MiB as COMPR $((compr >> 20)) MiB, TOTAL $((total >> 20)) MiB, holding $((held >> 20)) MiB of VRAM"
touch /tmp/go-on
wait $mc
rc=$?
kill $watch
info "corpus swap: memcheck took $(( $(date +%s) - t0 )) s"
while read -r l; do info "$l"; done < /tmp/mc
check "corpus swap: every byte of $fill MiB of program pages read back intact, two passes" [ $rc -eq 0 ]
check "corpus swap: the first pass swapped out more than twice the VRAM the device holds" \
    [ $(((out1 - out0) * 4096)) -gt $((2 * held)) ]
check "corpus swap: and the device then stored well over its VRAM's worth of pages (DATA > 1.5 x held)" \
    [ "$data" -gt $((3 * held / 2)) ]
vramblk status | grep "compress lz" | while read -r l; do info "status: $l"; done
check "corpus swap: nothing was OOM-killed" no_oom
check "corpus swap: no kernel oops or hung task" no_oops
out=$(vramblk del 0 2>&1)
check "corpus swap: swapoff and del" [ "$out" = "removed /dev/ublkb0" ]
