# The corpus boot (`cargo xtask corpus --zram`): each sample in /corpus is
# written to a zram device with lz4 and then with zstd, and zram's own
# accounting printed as `CORPUS-ZRAM NAME ALG <mm_stat>` (orig_data_size,
# compr_data_size, mem_used_total, mem_limit, mem_used_max, same_pages,
# pages_compacted, huge_pages...).
for m in zsmalloc lz4_compress lz4hc_compress; do
    insmod /lib/modules/$m.ko 2>/dev/null
done
insmod /lib/modules/zram.ko num_devices=1 2>/dev/null
[ -e /sys/block/zram0 ] || { echo "CORPUS-ERROR no zram device"; exit 0; }
for f in /corpus/*.pages; do
    name=$(basename "$f" .pages)
    for alg in lz4 zstd; do
        if ! echo $alg > /sys/block/zram0/comp_algorithm 2>/dev/null; then
            echo "CORPUS-ERROR $name: zram has no $alg ($(cat /sys/block/zram0/comp_algorithm))"
            continue
        fi
        echo 256M > /sys/block/zram0/disksize
        dd if="$f" of=/dev/zram0 bs=64k conv=fsync 2>/dev/null
        sync
        echo "CORPUS-ZRAM $name $alg $(cat /sys/block/zram0/mm_stat)"
        echo 1 > /sys/block/zram0/reset
    done
done
