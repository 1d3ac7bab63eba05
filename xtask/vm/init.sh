#!/bin/sh
# PID 1 of the test VM: mount the basics, run the suite (or the script
# vm.script= names on the kernel command line), power off.
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VM-READY $(cat /proc/uptime)"
script=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^vm.script=//p')
sh /lib/vm/${script:-suite}.sh
echo "SUITE-DONE"
sync
poweroff -f
