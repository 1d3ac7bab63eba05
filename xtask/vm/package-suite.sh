# Kernel-path suite, boot 5 (systemd 252 as PID 1; 1 GiB RAM, 256 huge
# pages): the Debian package as a user meets it. `dpkg -i` (nothing
# enabled), man pages and completions, the config edited, `systemctl
# enable --now vramblk`, the metrics timer's service, `dpkg -i` of a newer
# build with pages in swap (swap stays on, every byte intact), `dpkg -r`
# refused while RAM cannot take the pages back, then `dpkg -r` and
# `dpkg -P` for real. The packages are /root/vramblk-1.deb and
# /root/vramblk-2.deb (the same build, versions -1 and -2).
. /lib/vm/lib.sh
insmod /lib/modules/ublk_drv.ko || fail "insmod ublk_drv"
LOG=/run/vramblk-service.log
# The packaged binary, not the suite's copy in /usr/local/bin.
rm -f /usr/local/bin/vramblk
# busybox's shell runs its own applets (dpkg, dpkg-deb, man) before PATH:
# the real tools by their paths.
dpkg() { /usr/bin/dpkg "$@"; }
dpkg_deb() { /usr/bin/dpkg-deb "$@"; }
man() { /usr/bin/man "$@"; }
mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates /var/lib/dpkg/triggers
touch /var/lib/dpkg/available
v1=$(dpkg_deb -f /root/vramblk-1.deb Version)
v2=$(dpkg_deb -f /root/vramblk-2.deb Version)
info "packages: vramblk $v1 and $v2"

out=$(dpkg -i /root/vramblk-1.deb 2>&1); rc=$?
info "dpkg -i: $(echo "$out" | tail -3 | tr '\n' ' ')"
check "dpkg -i installs the package" [ $rc -eq 0 ]
check "dpkg -s: installed" sh -c "/usr/bin/dpkg -s vramblk | grep -q '^Status: install ok installed'"
check "the binary is /usr/bin/vramblk" [ "$(command -v vramblk)" = /usr/bin/vramblk ]
check "systemd sees vramblk.service from /usr/lib" sh -c "systemctl show -p FragmentPath --value vramblk | grep -q '^/usr/lib/systemd/system/vramblk.service'"
check "install enables nothing: vramblk.service disabled" [ "$(systemctl is-enabled vramblk 2>&1)" = disabled ]
check "install starts nothing: vramblk.service inactive" [ "$(systemctl is-active vramblk)" = inactive ]
check "install starts nothing: no ublk device" nodes_gone 0
check "install enables nothing: the metrics timer disabled" [ "$(systemctl is-enabled vramblk-metrics.timer 2>&1)" = disabled ]

man_out=$(MANPAGER=cat MANWIDTH=80 man vramblk 2>&1)
check "man vramblk renders" has "$man_out" "vramblk add" || info "$man_out"
man_out=$(MANPAGER=cat MANWIDTH=80 man vramblk-add 2>&1)
check "man vramblk-add renders its flags" has "$man_out" "--size" || info "$man_out"
man_out=$(MANPAGER=cat MANWIDTH=80 man 5 vramblk.toml 2>&1)
check "man 5 vramblk.toml renders" has "$man_out" "min_free_vram" || info "$man_out"
bash_words=$(bash -c '. /usr/share/bash-completion/completions/vramblk
COMP_WORDS=(vramblk rel); COMP_CWORD=1; COMP_LINE="vramblk rel"; COMP_POINT=11
_vramblk vramblk rel vramblk; echo "${COMPREPLY[@]}"' 2>&1)
check "bash completion loads and completes 'vramblk rel' to release (got: $bash_words)" [ "$bash_words" = release ]
fish_words=$(fish --no-config -c 'source /usr/share/fish/vendor_completions.d/vramblk.fish; complete -C"vramblk stat"' 2>&1)
check "fish completion loads and completes 'vramblk stat' to status" has "$fish_words" status
check "zsh completion parses (zsh -n)" zsh -n /usr/share/zsh/vendor-completions/_vramblk

cat > /etc/vramblk.toml <<'CFG'
# edited by the user
[[device]]
size = "256M"
backend = "host"
hugepages = true
queues = 2
CFG
check "vramblk config check accepts the edited config" vramblk config check /etc/vramblk.toml
check "systemctl enable --now vramblk" systemctl enable --now vramblk || { systemctl status vramblk --no-pager; cat $LOG; }
check "the configured device is up as swap" wait_for 30 swap_on /dev/ublkb0
if ! swap_on /dev/ublkb0; then
    # What follows fills RAM into that swap: without it, it would only
    # end in an OOM kill.
    fail "package boot stopped early: no vramblk swap to go on with"
    exit 0
fi
check "enabling the service enabled the sleep hook too (Also=)" [ "$(systemctl is-enabled vramblk-sleep 2>&1)" = enabled ]
mkdir -p /var/lib/prometheus/node-exporter
check "vramblk-metrics.service writes the textfile" systemctl start vramblk-metrics.service
prom=/var/lib/prometheus/node-exporter/vramblk.prom
check "the metrics say the device is up" grep -q '^vramblk_device_up{device="ublkb0"} 1$' $prom || cat $prom
check "the metrics carry the swap in use" grep -q '^vramblk_swap_size_bytes{device="ublkb0"} [1-9]' $prom
check "the metrics say the service runs" grep -q '^vramblk_service_up 1$' $prom
main=$(systemctl show -p MainPID --value vramblk)
server=$(daemon_pid 0)

# From here the device is the only swap with RAM full: a hand-over that
# stalls it hangs the guest. pswatch prints where everything waits if tasks
# stay blocked, and a task blocked 20 s fails the boot's last check.
echo 20 > /proc/sys/kernel/hung_task_timeout_secs
rm -f /tmp/pswatch.stop
pswatch 15 &
hold_in_swap 150 /tmp/mc-pkg
info "held: $(awk '$1 == "/dev/ublkb0" {print int($4 / 1024)}' /proc/swaps) MiB in swap, MemAvailable $(mem MemAvailable) MiB"
out=$(dpkg -i /root/vramblk-2.deb 2>&1); rc=$?
info "dpkg -i (upgrade): $(echo "$out" | tail -3 | tr '\n' ' ')"
check "dpkg -i of the newer build succeeds" [ $rc -eq 0 ]
check "dpkg -s: $v2 installed" sh -c "/usr/bin/dpkg -s vramblk | grep -q '^Version: $v2'"
check "upgrade: the postinst handed the devices to the new binary" has "$out" "handing the running devices to the new version"
check "upgrade: swap stayed on" swap_on /dev/ublkb0
main_upgraded() {
    [ "$(systemctl show -p MainPID --value vramblk)" = "$main" ] &&
        [ "$(readlink /proc/$main/exe)" = /usr/bin/vramblk ]
}
check "upgrade: the main process kept its pid ($main) and runs the new binary" main_upgraded
check "upgrade: a new server serves the device (was $server)" [ "$(daemon_pid 0)" != "$server" ]
device_upgraded() {
    [ "$(readlink /proc/$(daemon_pid 0)/exe)" = /usr/bin/vramblk ] &&
        [ "$(readlink /proc/$(holder_pid 0)/exe)" = /usr/bin/vramblk ]
}
check "upgrade: its server and supervisor run the new binary" device_upgraded
check "upgrade: the service's log says so" grep -q "served by the binary on disk" $LOG ||
    tail -20 $LOG
check "upgrade: the edited config was kept" grep -q "edited by the user" /etc/vramblk.toml
check "upgrade: the service is still enabled" [ "$(systemctl is-enabled vramblk 2>&1)" = enabled ]

out=$(dpkg -r vramblk 2>&1); rc=$?
info "dpkg -r while RAM cannot take the pages back: $(echo "$out" | tail -4 | tr '\n' ' ')"
check "dpkg -r is refused while RAM cannot take the swapped pages back" [ $rc -ne 0 ]
check "and says why" has "$out" "could not be swapped off"
# dpkg notes the wish to remove it (deinstall) but leaves it installed.
check "the refused removal left the package installed" sh -c "/usr/bin/dpkg -s vramblk | grep -q '^Status: .* ok installed$'"
check "the refused removal left the device as swap" swap_on /dev/ublkb0
check "the refused removal started the service again" wait_for 30 sh -c "[ \"\$(systemctl is-active vramblk)\" = active ]"
touch /tmp/go
wait $mc
rc=$?
touch /tmp/pswatch.stop
while read -r l; do info "$l"; done < /tmp/mc-pkg
check "memcheck through the upgrade and the refused removal: every byte intact" [ $rc -eq 0 ]

out=$(dpkg -r vramblk 2>&1); rc=$?
info "dpkg -r: $(echo "$out" | tail -3 | tr '\n' ' ')"
check "dpkg -r removes the package once RAM can take the pages back" [ $rc -eq 0 ]
check "dpkg -r: swap is off" no_swap
check "dpkg -r: the device is removed" wait_for 30 nodes_gone 0
check "dpkg -r: every vramblk process is gone" wait_for 30 daemon_gone
check "dpkg -r: the service is inactive" [ "$(systemctl is-active vramblk)" != active ]
check "dpkg -r: the binary and units are gone" sh -c "[ ! -e /usr/bin/vramblk ] && [ ! -e /usr/lib/systemd/system/vramblk.service ] && [ ! -e /usr/share/man/man1/vramblk.1.gz ]"
check "dpkg -r: the metrics file is gone" [ ! -e $prom ]
links=$(find /etc/systemd/system -type l -name 'vramblk*' 2>/dev/null)
check "dpkg -r: no enable link is left behind (sleep.target would require a missing unit): ${links:-none}" [ -z "$links" ]
check "dpkg -r: the conffile stays until purge" grep -q "edited by the user" /etc/vramblk.toml
check "dpkg -P purges the conffile" sh -c "/usr/bin/dpkg -P vramblk >/dev/null 2>&1 && [ ! -e /etc/vramblk.toml ]"
check "dpkg -P: the package is unknown to dpkg" sh -c "! /usr/bin/dpkg -s vramblk >/dev/null 2>&1"
while read -r l; do info "service: $l"; done < $LOG
check "no kernel oops or hung task (package boot)" no_oops
