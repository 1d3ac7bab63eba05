# Setting up and tearing down each device the benchmark compares, inside
# the benchmark VM. Every setup prints the block device's path on stdout
# and pins its server's threads to $SERVER_CPU (fio runs on $FIO_CPU):
# unpinned ublk queue threads swung results 6x between rounds.

SERVER_CPU=${SERVER_CPU:-1}

load_modules() {
    for m in ublk_drv nbd zsmalloc lz4_compress lz4hc_compress; do
        insmod /lib/modules/$m.ko 2>/dev/null
    done
    insmod /lib/modules/zram.ko num_devices=1 2>/dev/null
}

pin_all() {
    for p in "$@"; do /usr/bin/taskset -a -p -c "$SERVER_CPU" "$p" >/dev/null; done
}

# wait_node PATH: a device node appears within 10 s
wait_node() {
    i=0
    while [ ! -b "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b "$1" ]
}

# setup_<kind> SIZE [extra]: SIZE like 2G
setup_vramblk() {
    out=$(vramblk add --size "$1" --backend host --queues 1 --depth 128 $2) || return 1
    pin_all $(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/vramblk/ublkb0.json)
    echo "$out"
}
teardown_vramblk() { vramblk del --all >/dev/null; }

setup_rublk_null() {
    rublk add null -n 1 -q 1 -d 128 --quiet >/dev/null || return 1
    wait_node /dev/ublkb1 || return 1
    pin_all $(pidof rublk)
    echo /dev/ublkb1
}
teardown_rublk_null() { rublk del -n 1 >/dev/null 2>&1; sleep 1; }

setup_rublk_loop() {
    mkdir -p /mnt/tmpfs
    mount -t tmpfs -o size=2600M tmpfs /mnt/tmpfs
    truncate -s "$1" /mnt/tmpfs/loop.img
    rublk add loop -n 2 -q 1 -d 128 -f /mnt/tmpfs/loop.img --quiet >/dev/null || return 1
    wait_node /dev/ublkb2 || return 1
    pin_all $(pidof rublk)
    echo /dev/ublkb2
}
teardown_rublk_loop() {
    rublk del -n 2 >/dev/null 2>&1
    sleep 1
    rm -f /mnt/tmpfs/loop.img
    umount /mnt/tmpfs
}

# nbd-vram's data path with the fastest backend there is: the kernel's nbd
# client, a Unix socket, and nbdkit's memory plugin.
setup_nbd() {
    rm -f /tmp/nbd.sock
    nbdkit -U /tmp/nbd.sock --threads 16 memory "$1" || return 1
    i=0
    while [ ! -S /tmp/nbd.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    nbd-client -unix /tmp/nbd.sock /dev/nbd0 -b 4096 $2 >/dev/null 2>&1 || return 1
    pin_all $(pidof nbdkit)
    echo /dev/nbd0
}
teardown_nbd() {
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
    kill $(pidof nbdkit) 2>/dev/null
    sleep 1
}

setup_zram() {
    echo lz4 >/sys/block/zram0/comp_algorithm
    echo "$1" >/sys/block/zram0/disksize || return 1
    echo /dev/zram0
}
teardown_zram() {
    /sbin/swapoff /dev/zram0 2>/dev/null
    echo 1 >/sys/block/zram0/reset
}
