#!/bin/sh
# PID 1 of the test VM: mount the basics, run the suite, power off.
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VM-READY $(cat /proc/uptime)"
sh /lib/vm/suite.sh
echo "SUITE-DONE"
sync
poweroff -f
