#!/bin/sh
# PID 1 of the test VM: mount the basics, run the suite (or the script
# vm.script= names on the kernel command line), power off; or, with
# vm.init=systemd, hand PID 1 to systemd.
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VM-READY $(cat /proc/uptime)"
# The systemd boot: systemd becomes PID 1 and runs the suite as a unit.
grep -qw vm.init=systemd /proc/cmdline && exec /lib/systemd/systemd
script=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^vm.script=//p')
sh /lib/vm/${script:-suite}.sh
echo "SUITE-DONE"
sync
poweroff -f
