# Helpers for the VM suites: every check prints one PASS or FAIL line.
FIO="fio --ioengine=io_uring --direct=1 --group_reporting --eta=never"
# The stand-in libcuda (cuda-store/tests/stub): host memory on huge pages
# behind the CUDA driver calls; `env $STUB_ENV vramblk ...` uses it.
STUB_ENV="LD_LIBRARY_PATH=/opt/cudastub VRAMBLK_STUB_HUGETLB=1 VRAMBLK_STUB_VRAM_MIB=512"
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; }
info() { echo "INFO $*"; }

# check NAME COMMAND...: passes when the command succeeds.
check() {
    name=$1; shift
    if "$@"; then pass "$name"; else fail "$name"; return 1; fi
}

# expect_err NAME WANT COMMAND...: passes when the command fails and its
# output contains WANT; also checks nothing was left behind.
expect_err() {
    name=$1; want=$2; shift 2
    before=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
    out=$("$@" 2>&1); rc=$?
    after=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
    if [ $rc -ne 0 ] && echo "$out" | grep -qF -- "$want" && [ "$before" = "$after" ]; then
        pass "$name"
    else
        fail "$name: rc=$rc devices $before->$after output: $out"
    fi
}

# No kernel fault: no oops, BUG, warning stack or hung task; and no vramblk
# process panicked or died of a fault (a daemon says so in the kernel's
# log: panics.rs, faults.rs), but for a test hook's panic on purpose and
# a fault's signal a test sent ("sent by process"). Stacks the
# kernel printed because pswatch asked (sysrq: each CPU's NMI backtrace,
# each blocked task's stack) are diagnostics, not faults, and are skipped.
no_oops() {
    dmesg | no_faults_in
}

# On a fault it prints the first one (a few lines before it, the stack
# after) as INFO lines, so that the failed check shows what it was.
no_faults_in() {
    awk '{ring[NR % 6] = $0}
         /Oops|BUG:|blocked (in I\/O wait )?for more than|hung_task/ {hit = 1}
         /vramblk: process [0-9]+ thread .* panicked at/ && !/test hook:/ {hit = 1}
         /vramblk: process [0-9]+ thread .* died of SIG.* at address/ {hit = 1}
         /NMI backtrace for cpu|\] task:/ {asked = 1}
         /Call Trace/ && !asked {hit = 1}
         /<\/TASK>/ {asked = 0}
         hit && !bad {bad = 1; for (i = NR - 5; i < NR; i++) if (i > 0) print "INFO kernel: " ring[i % 6]; left = 20}
         left > 0 {print "INFO kernel: " $0; left--}
         {hit = 0}
         END {exit bad}'
}

no_oom() {
    ! dmesg | grep -Eq 'Out of memory|Killed process|oom-kill'
}

nodes_gone() {
    [ ! -e /dev/ublkb$1 ] && [ ! -e /dev/ublkc$1 ] && [ ! -e /sys/class/ublk-char/ublkc$1 ]
}

# Whether a vramblk process is alive; PID 1 here is a shell that does not
# reap, so zombies do not count.
daemon_alive() {
    for p in $(pidof vramblk); do
        grep -q "^State:.*Z" /proc/$p/status || return 0
    done
    return 1
}

daemon_gone() { ! daemon_alive; }

daemon_pid() {
    sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/vramblk/ublkb$1.json
}

fio_iops() {
    # the first "IOPS=" figure in a fio report
    sed -n 's/.*IOPS=\([^,]*\),.*/\1/p' "$1" | head -1
}

# Prints the daemon logs, for when something went wrong.
show_logs() {
    for f in /run/vramblk/*.log; do
        [ -e "$f" ] && while read -r l; do info "log $(basename $f): $l"; done < "$f"
    done
}

# show_dmesg N: the kernel's last N lines, as INFO lines.
show_dmesg() {
    dmesg | tail -n "$1" | while read -r l; do info "dmesg: $l"; done
}

# fio_ends_failing PID SECS WHAT: the fio run PID ends within SECS seconds
# of WHAT, and ends with an error (the I/O failed rather than hung).
fio_ends_failing() {
    waited=0
    while kill -0 "$1" 2>/dev/null && [ $waited -lt "$2" ]; do sleep 1; waited=$((waited + 1)); done
    check "fio ends within $2 s of $3 (no hang)" sh -c "! kill -0 $1 2>/dev/null"
    wait "$1"
    rc=$?
    info "fio exit code $rc, ${waited}s after $3"
    check "fio saw I/O errors after $3" [ $rc -ne 0 ]
}

# log_ms PATTERN FILE...: the time of the first log line matching PATTERN,
# in ms since midnight (the logs stamp lines as 2026-12-02T14:11:54.123Z).
log_ms() {
    pat=$1; shift
    grep -h -- "$pat" "$@" | head -1 |
        sed -n 's/^\[[0-9-]*T\([0-9]*\):\([0-9]*\):\([0-9]*\)\.\([0-9]*\)Z.*/\1 \2 \3 \4/p' |
        awk '{print (($1 * 60 + $2) * 60 + $3) * 1000 + $4}'
}

# within_ms FROM TO LIMIT: both times known, TO no earlier than FROM and
# at most LIMIT ms after it.
within_ms() {
    [ -n "$1" ] && [ -n "$2" ] && [ $(($2 - $1)) -ge 0 ] && [ $(($2 - $1)) -le "$3" ]
}

# --- crash recovery helpers
# cpu_ms PID: CPU milliseconds (user + system, every thread) the process
# has used; /proc counts in USER_HZ ticks, 100 a second on x86.
cpu_ms() { awk '{print ($14 + $15) * 10}' /proc/$1/stat; }

# idle_cpu_ms SECS PID...: CPU milliseconds the processes use together over
# SECS seconds; each one's share goes to /tmp/idle-cpu ("PID: N ms").
idle_cpu_ms() {
    local secs=$1 total=0 p
    shift
    for p in "$@"; do eval "b_$p=$(cpu_ms $p)"; done
    sleep "$secs"
    : > /tmp/idle-cpu
    for p in "$@"; do
        eval "d=\$(( $(cpu_ms $p) - b_$p ))"
        echo "$(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-40) pid $p: $d ms" >> /tmp/idle-cpu
        total=$((total + d))
    done
    echo $total
}

# check_idle_cpu WHAT: device 0, idle, costs next to no CPU (issue 19):
# each queue thread sleeps in io_uring with nothing in flight, the standby
# waits on its eventfd; the supervisor wakes 10 times a second (stop
# requests, the standby, the handoff channel) and a cuda server's
# VRAM-control thread polls as often. A spinning queue would show ~10000
# ms; the bound leaves TCG's slowness room (30-120 ms seen in 10 s).
check_idle_cpu() {
    local h idle
    sleep 1
    h=$(holder_pid 0)
    idle=$(idle_cpu_ms 10 $h $(HOLDER_FOR_CHILDREN=$h supervisor_children))
    while read -r l; do info "idle, $1: $l"; done < /tmp/idle-cpu
    check "$1 with no I/O uses next to no CPU (< 500 ms in 10 s under TCG: $idle ms)" [ "$idle" -lt 500 ]
}

mem() { awk -v k="$1:" '$1 == k {print int($2 / 1024)}' /proc/meminfo; }

# vmstat_of KEY: a counter of /proc/vmstat (pswpout, pswpin, ...).
vmstat_of() { awk -v k="$1" '$1 == k {print $2}' /proc/vmstat; }

# zq FIELD: device 0's vram.FIELD from `vramblk status --json`.
zq() { vramblk status --json > /tmp/z.json 2>&1 && jsonq /tmp/z.json "devices.0.vram.$1"; }

holder_pid() {
    sed -n 's/.*"holder_pid": *\([0-9]*\).*/\1/p' /run/vramblk/ublkb$1.json 2>/dev/null
}

# wait_recovered ID OLD_PID: a new server serves the device within 60 s
wait_recovered() {
    i=0
    while [ $i -lt 120 ]; do
        p=$(daemon_pid $1 2>/dev/null)
        if [ -n "$p" ] && [ "$p" != "$2" ] && vramblk list 2>/dev/null | grep -q "^$1 .* live "; then
            info "recovered: server $2 -> $p after about $((i / 2)) s"
            return 0
        fi
        sleep 0.5
        i=$((i + 1))
    done
    return 1
}

# kill_servers ID N GAP: SIGKILL the serving process N times, GAP seconds
# after each recovery
kill_servers() {
    k=1
    while [ $k -le $2 ]; do
        sleep $3
        p=$(daemon_pid $1)
        kill -9 "$p"
        info "kill $k: SIGKILLed server $p"
        wait_recovered $1 "$p" || { fail "device $1 not recovered after kill $k"; show_logs; return 1; }
        k=$((k + 1))
    done
}

# none_waited_out_kernel: no recovering server in the logs gave up
# waiting for the kernel to let a dead server go ("still live after").
none_waited_out_kernel() { ! grep -q "still live after" /run/vramblk/*.log; }

# takeovers_within SECS: every take-over the logs tell of ("recovered X s
# after its server exited") served the device again within SECS seconds,
# and none waited out the kernel; prints the slowest.
takeovers_within() {
    local slowest
    slowest=$(sed -n 's/.*recovered \([0-9.]*\) s after its server exited.*/\1/p' \
        /run/vramblk/*.log | sort -n | tail -1)
    info "slowest take-over: ${slowest:-none} s"
    [ -n "$slowest" ] && none_waited_out_kernel &&
        awk -v s="$slowest" -v lim="$1" 'BEGIN { exit !(s < lim) }'
}

# full_queue_kill NAME CPUS ADD...: a 128M device with 2 queues x depth 8
# (added by the command ADD..., which prints its path) under one fio job
# per CPU in CPUS, each 16 deep, so the queue of each such CPU fills; the
# server is stopped until every tag of those queues holds a request, then
# SIGKILLed. Kernels before 6.15 notice that death only through the
# request timeout (no io_uring command of the server is left in the
# kernel to cancel); the server shortens it to 1 s
# (ublk-target/src/request_timeout.rs), and the next server must serve
# within 10 s, not after the default 30 s. fio must see no error and every
# block must verify.
full_queue_kill() {
    local fq=$1 cpus=$2 dev jobs c want p t0 t1 took fpid rc
    shift 2
    dev=$("$@" 2>/tmp/add-f.txt)
    check "$fq: add" [ "$dev" = /dev/ublkb0 ] || { cat /tmp/add-f.txt; show_logs; return 1; }
    timeout_1s() { [ "$(cat /sys/block/ublkb0/queue/io_timeout)" = 1000 ]; }
    check "$fq: the server set the request timeout to 1 s" timeout_1s
    jobs=""
    want=0
    for c in $cpus; do
        jobs="$jobs --name=cpu$c --cpus_allowed=$c --offset=$((c * 64))M"
        want=$((want + 8))
    done
    local common="--filename=$dev --rw=randwrite --bs=4k --iodepth=16 --size=64M --verify=crc32c"
    # shellcheck disable=SC2086
    $FIO $common --do_verify=0 $jobs --output=/tmp/fio-f.txt &
    fpid=$!
    writing() { [ "$(awk '{print $5}' /sys/block/ublkb0/stat)" -gt 100 ]; }
    wait_for 30 writing
    p=$(daemon_pid 0)
    kill -STOP "$p"
    full() { [ "$(awk '{print $1 + $2}' /sys/block/ublkb0/inflight)" -ge "$want" ]; }
    # With the server stopped nothing completes, so the count only grows
    # until every job has filled its queue; a job that started late once
    # took more than 20 s to (6.12, under a loaded CI host). Waiting for a
    # full count before the stop does not work: on 7.3 the running server
    # answers so fast that a poll never saw every tag held, and fio ended.
    wait_for 90 full
    check "$fq: every tag of the loaded queues holds a request ($want in flight)" full ||
        info "$fq: in flight: $(cat /sys/block/ublkb0/inflight)"
    t0=$(tr -d . < /proc/uptime | cut -d' ' -f1)
    kill -9 "$p"
    kill -CONT "$p" 2>/dev/null
    info "$fq: SIGKILLed stopped server $p"
    wait_recovered 0 "$p"
    t1=$(tr -d . < /proc/uptime | cut -d' ' -f1)
    took=$(((t1 - t0) / 10))
    info "$fq: served again $((took / 10)).$((took % 10)) s after the kill"
    check "$fq: the next server serves within 10 s (the default request timeout: 30 s)" \
        [ $took -lt 100 ] || show_logs
    check "$fq: the new server set the request timeout too" timeout_1s
    wait $fpid
    rc=$?
    check "$fq: fio wrote through the kill with no I/O error" [ $rc -eq 0 ] || tail -5 /tmp/fio-f.txt
    # shellcheck disable=SC2086
    fio_verified "$fq: verify-only pass (crc32c)" /tmp/fio-fv.txt $common $jobs
    out=$(vramblk del 0 2>&1)
    check "$fq: del" [ "$out" = "removed /dev/ublkb0" ]
    wait_for 30 daemon_gone
}

# crash_during_reads NAME SIG ADD...: adds a 128 MiB device (ADD...),
# writes it whole with crc32c headers from two jobs, one a CPU (so one a
# queue), then sends its server SIG while a verify-only pass reads it
# back: a server that dies of a fault, not a SIGKILL, with reads in
# flight. Every read must be answered, and right; the kernel's log must
# name the signal and where the server was (faults.rs).
crash_during_reads() {
    local n=$1 sig=$2 dev dead fpid
    shift 2
    dev=$("$@" 2>/tmp/add-r.txt)
    check "$n: add" [ "$dev" = /dev/ublkb0 ] || { cat /tmp/add-r.txt; show_logs; return 1; }
    local jobs="--name=cpu0 --cpus_allowed=0 --offset=0M --name=cpu1 --cpus_allowed=1 --offset=64M"
    local common="--filename=$dev --rw=randwrite --bs=4k --iodepth=16 --size=64M --verify=crc32c"
    # shellcheck disable=SC2086
    $FIO $common --do_verify=0 $jobs --output=/tmp/fio-rw.txt
    check "$n: written" [ $? -eq 0 ] || tail -5 /tmp/fio-rw.txt
    # At 2500 IOPS a job, the pass reads for about 6 s; the signal comes
    # at 2 s.
    # shellcheck disable=SC2086
    $FIO $common --verify_only --rate_iops=2500 $jobs --output=/tmp/fio-rr.txt &
    fpid=$!
    sleep 2
    # (wait_recovered sets p: the dead server's pid is kept apart.)
    dead=$(daemon_pid 0)
    kill -"$sig" "$dead"
    info "$n: sent SIG$sig to server $dead"
    wait_recovered 0 "$dead" || { fail "$n: not recovered after SIG$sig"; show_logs; }
    check "$n: fio was still reading when the next server served" kill -0 $fpid
    wait $fpid
    verify_verdict "$n: every read through the crash answered, and right" /tmp/fio-rr.txt $?
    check "$n: the kernel's log names the signal and its sender" \
        sh -c "dmesg | grep -q 'vramblk: process $dead thread .* died of SIG$sig sent by process '"
    check "$n: and the frames it died in" sh -c "dmesg | grep -q 'vramblk: process $dead frames: exe+0x'"
    check "$n: the supervisor counted a crash, not a kill" \
        grep -q "(pid $dead) died (signal: [0-9]* (SIG$sig).*try 1 of" /run/vramblk/*.log
    out=$(vramblk del 0 2>&1)
    check "$n: del" [ "$out" = "removed /dev/ublkb0" ]
    wait_for 30 daemon_gone
}

# replace_binary: puts a copy of the vramblk binary where it is, as a
# package update does (a new file renamed over the old one): the running
# processes' executable shows as "(deleted)" from then on.
replace_binary() {
    local b
    b=$(command -v vramblk)
    cp "$b" "$b.new" && mv -f "$b.new" "$b"
}

# runs_on_disk_binary PID: PID executes the file now at vramblk's path
runs_on_disk_binary() {
    local exe
    exe=$(readlink "/proc/$1/exe") || return 1
    [ "$exe" = "$(command -v vramblk)" ]
}

# upgrade_device ID WHAT: replaces the binary and runs `vramblk upgrade
# ID`; true when it says a server of the binary on disk serves the device,
# its supervisor kept its pid and runs the new binary too.
upgrade_device() {
    local sup out
    sup=$(holder_pid "$1")
    replace_binary
    out=$(vramblk upgrade "$1" 2>&1)
    echo "$out" | while read -r l; do info "$2: $l"; done
    has "$out" "served by the binary on disk" && [ "$(holder_pid "$1")" = "$sup" ] &&
        runs_on_disk_binary "$sup" && runs_on_disk_binary "$(daemon_pid "$1")"
}

# kernel_quiesces: the running kernel offers UBLK_F_QUIESCE (6.16+), so
# an upgrade quiesces the device instead of killing its old server
kernel_quiesces() { vramblk features | grep -qE '^ *QUIESCE +used'; }

# kernel_batches: the running kernel offers UBLK_F_BATCH_IO (7.0+) and
# vramblk asks for it, so a device's queues use batch commands by default
kernel_batches() { vramblk features | grep -qE '^ *BATCH_IO +used'; }

# default_commands: the commands a device added without --io-commands
# serves with on this kernel, as its log words them
default_commands() { if kernel_batches; then echo batch; else echo per-tag; fi; }

# device_log ID: the log of device ID's supervisor and servers
device_log() { sed -n 's/.*"log": *"\([^"]*\)".*/\1/p' /run/vramblk/ublkb$1.json 2>/dev/null; }

# queues_serve_with ID WORD: device ID's servers started their queues with
# WORD (batch or per-tag) commands, and never with the other kind
queues_serve_with() {
    local log other=batch
    log=$(device_log $1)
    [ "$2" = batch ] && other=per-tag
    [ -n "$log" ] && wait_for 10 grep -q "tags with $2 commands" "$log" &&
        ! grep -q "tags with $other commands" "$log"
}

# handover_way: how an upgrade's standby takes the device on this kernel,
# as a pattern (grep -E) of its log line's words: quiesced, or (with memory
# short) the old server killed; on a kernel without QUIESCE, or for a
# device with batch commands (DEVICE_COMMANDS, else this kernel's default),
# killed
handover_way() {
    if ! kernel_quiesces; then
        echo "killed \(the device was added without QUIESCE"
    elif [ "${DEVICE_COMMANDS:-$(default_commands)}" = batch ]; then
        echo "killed \(the device uses batch commands"
    else
        echo "quiesced: it answered its requests|killed \(memory is short"
    fi
}

# handover_words: handover_way in words, for a check's name
handover_words() { handover_way | sed 's/\\//g; s/|/ or /'; }

# handovers_saying PATTERN [LOG...]: how many hand-overs the logs (every
# daemon log, or LOG...) say took the device in words matching PATTERN
# (grep -E)
handovers_saying() {
    local pattern=$1
    shift
    [ $# -gt 0 ] || set -- /run/vramblk/*.log
    cat "$@" | grep "over from the old binary's server [0-9]*: " | grep -cE "$pattern"
}

# handovers_the_kernels_way [LOG...]: how many hand-overs the logs (every
# daemon log, or LOG...) say took the device this kernel's way, less those
# whose old server had to be killed for not letting go of a quiesced device
handovers_the_kernels_way() {
    local way late
    [ $# -gt 0 ] || set -- /run/vramblk/*.log
    way=$(handovers_saying "$(handover_way)" "$@")
    late=$(cat "$@" | grep -c "did not let go of")
    echo $((way - late))
}

# wait_for SECS COMMAND...: true once the command succeeds, within SECS
wait_for() {
    limit=$(($1 * 2)); shift
    i=0
    while [ $i -lt $limit ]; do
        "$@" && return 0
        sleep 0.5
        i=$((i + 1))
    done
    return 1
}

swap_on() { grep -q "^$1 " /proc/swaps; }
swap_off() { ! grep -q "^$1 " /proc/swaps; }
no_swap() { [ "$(wc -l < /proc/swaps)" -le 1 ]; }
any_swap() { [ "$(wc -l < /proc/swaps)" -gt 1 ]; }

# has TEXT WANT: TEXT contains WANT (for check, which must not be piped)
has() { echo "$1" | grep -qF -- "$2"; }

# fio_verified NAME OUT FIO_ARGS...: fio's verify-only pass (crc32c) over
# what a write pass with the same FIO_ARGS wrote; passes when no block is
# bad, else shows the end of the report OUT.
fio_verified() {
    local fv_name=$1 fv_out=$2 fv_rc
    shift 2
    $FIO "$@" --verify=crc32c --verify_only --output="$fv_out"
    fv_rc=$?
    verify_verdict "$fv_name" "$fv_out" $fv_rc
}

# verify_verdict NAME OUT RC: checks that a verify-only fio pass (report
# OUT, exit code RC) ended well and found no bad block. A failed pass
# shows the servers' logs too: what they answered (an EIO is one of
# theirs or the kernel's) is what says why.
verify_verdict() {
    local vv_rc=$3
    grep -q "verify: bad" "$2" && vv_rc=99
    check "$1" [ "$vv_rc" -eq 0 ] || {
        tail -20 "$2"
        show_logs
        show_dmesg 30
    }
}

# fio_through NAME OUT DEPTH RATE DEV ACTION...: a fio random-write pass
# over DEV (4 KiB, crc32c headers, DEPTH deep, RATE IOPS; report in OUT)
# while the command ACTION... runs; fio must still be writing when ACTION
# returns, end without an I/O error, and a verify-only pass must then find
# every block intact.
fio_through() {
    local ft_name=$1 ft_out=$2 ft_pid ft_rc
    # FT_DATA: more fio options for what the blocks hold (compressible data).
    local ft_common="--name=ft --filename=$5 --rw=randwrite --bs=4k --iodepth=$3 --size=100% ${FT_DATA:-}"
    local ft_rate=$4
    shift 5
    # shellcheck disable=SC2086
    $FIO $ft_common --rate_iops=$ft_rate --verify=crc32c --do_verify=0 --output="$ft_out" &
    ft_pid=$!
    "$@"
    check "$ft_name: fio was still writing after them" kill -0 $ft_pid
    wait $ft_pid
    ft_rc=$?
    check "$ft_name: fio wrote through them with no I/O error" [ $ft_rc -eq 0 ] || tail -5 "$ft_out"
    # shellcheck disable=SC2086
    fio_verified "$ft_name: verify-only pass, every block intact (crc32c)" "$ft_out.v" $ft_common
}

# kill_device0 WHAT LOG [MAIN]: SIGKILLs device 0's supervisor and server
# (and the service's main process MAIN, when given) at once; true when a
# new server serves the device within 60 s, i.e. the service (or its
# restart) adopted it; else shows LOG and the daemon logs. Leaves the
# killed supervisor and server in $h and $p.
kill_device0() {
    h=$(holder_pid 0); p=$(daemon_pid 0)
    kill -9 $3 "$h" "$p"
    info "$1: SIGKILLed ${3:+main process $3, }supervisor $h and server $p"
    wait_recovered 0 "$p" || { cat "$2"; show_logs; return 1; }
}

# hold_in_swap EXTRA OUT: memcheck fills MemAvailable + EXTRA MiB with
# incompressible data and holds it (pushing pages to swap) until /tmp/go
# appears; its pid is $mc, its output OUT.
hold_in_swap() {
    local avail fill
    avail=$(mem MemAvailable)
    fill=$((avail + $1))
    info "filling $fill MiB and holding it (MemAvailable $avail MiB)"
    rm -f /tmp/go
    memcheck $fill 1 --hold /tmp/go > "$2" 2>&1 &
    mc=$!
    wait_for 300 grep -q holding "$2"
}

# start_pressure_service SIZE LOG ENV: `vramblk service` with one cuda
# device of SIZE (reserve 0, 2 queues) and [pressure] on (threshold 1G,
# calm_secs 4), free VRAM read from /tmp/vram/0 (8G to begin) instead of
# NVML, run with the environment ENV (the stand-in libcuda); its output
# goes to LOG, its pid is $psvc.
start_pressure_service() {
    mkdir -p /tmp/vram
    echo 8G > /tmp/vram/0
    echo 8G > /tmp/vram/1
    cat > /etc/vramblk-press.toml <<CFG
[[device]]
size = "$1"
backend = "cuda"
reserve = "0"
queues = 2
${4:-}

[pressure]
enabled = true
min_free_vram = "1G"
calm_secs = 4
CFG
    env $3 vramblk service --config /etc/vramblk-press.toml --free-vram-from /tmp/vram > "$2" 2>&1 &
    psvc=$!
}

# locked_memory NAME: what the device's processes hold, as INFO lines.
locked_memory() {
    local p
    info "$1: meminfo: $(grep -E '^(MemAvailable|Mlocked|Shmem|Unevictable):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
    for p in $(pidof vramblk); do
        info "$1: vramblk $p: $(grep -E '^(VmRSS|VmLck|RssAnon|RssFile|RssShmem):' /proc/$p/status | tr -s ' \t' ' ' | tr '\n' ' ')"
    done
}

# memory_holders RUN: what holds the guest's RAM, for a refused add: the
# meminfo lines the budget check reads, the largest processes and files in
# the RAM-backed root
memory_holders() {
    local p
    info "$1: meminfo: $(grep -E '^(MemTotal|MemFree|MemAvailable|Buffers|Cached|Shmem|Unevictable|Mlocked|SwapTotal|SwapFree|HugePages_Total|HugePages_Free):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
    for p in /proc/[0-9]*; do
        echo "$(awk '/^VmRSS:/ {print $2}' $p/status 2>/dev/null) ${p#/proc/} $(cat $p/comm 2>/dev/null)"
    done | sort -rn | head -8 | while read -r l; do info "$1: rss kB pid comm: $l"; done
    du -ak /tmp /root /run 2>/dev/null | sort -rn | head -8 | while read -r l; do info "$1: du kB: $l"; done
}

# supervisor_children HOLDER: the pids of HOLDER's live children (its
# server, a standby, a server taking over).
supervisor_children() {
    for s in /proc/[0-9]*/stat; do
        set -- $(cat "$s" 2>/dev/null)
        [ "$3" != Z ] && [ "$4" = "$HOLDER_FOR_CHILDREN" ] && echo "$1"
    done
}

# io_flusher PID: PID is marked PR_SET_IO_FLUSHER (PF_MEMALLOC_NOIO,
# 0x80000, in the flags field of /proc/PID/stat): its allocations never
# write swap out, so never wait on a device that has no server.
io_flusher() {
    local f
    f=$(cut -d')' -f2 "/proc/$1/stat" 2>/dev/null | awk '{print $7}')
    [ -n "$f" ] && [ $((f & 0x80000)) -ne 0 ]
}
device_flushers() { io_flusher "$(holder_pid 0)" && io_flusher "$(daemon_pid 0)"; }

# standby_pid: device 0's standby (the supervisor's child that is not its
# server), if there is one.
standby_pid() {
    local server p
    server=$(daemon_pid 0)
    for p in $(HOLDER_FOR_CHILDREN=$(holder_pid 0) supervisor_children); do
        [ "$p" != "$server" ] && echo "$p" && return 0
    done
    return 1
}

# standby_ready_to_take_over QUEUES: device 0's standby has its QUEUES
# queue threads started in advance (named vramblk-queue, their rings
# built): a take-over while memory is short then starts no thread.
standby_ready_to_take_over() {
    local p n
    p=$(standby_pid) || return 1
    n=$(cat /proc/$p/task/*/comm 2>/dev/null | grep -c '^vramblk-queue$')
    [ "$n" -ge "$1" ]
}

# rand N: a number in 0..N-1
rand() { echo $(( $(od -An -N2 -tu2 /dev/urandom) % $1 )); }

# swap_kill_run NAME SIZE ADD_ARGS EXTRA PASSES KILLS: the promise under
# its hardest load: a hugetlb host device of SIZE (ADD_ARGS on top of the
# defaults) is the only swap, memcheck fills MemAvailable + EXTRA MiB
# with checked data and re-checks it, pass after pass (at least PASSES),
# while the serving process is SIGKILLed KILLS times at random moments
# 0.2-4 s apart, without waiting for the last take-over to finish: every
# other kill takes the server named by `vramblk list` (as a user would),
# the others every child of the supervisor (the server, its standby, or a
# server in the middle of taking over). After the last kill memcheck
# finishes the pass it is in. Every byte must come back, nothing may be
# OOM-killed or hang: memcheck must end within 15 minutes of the last
# kill, or the check fails and the stacks of the blocked tasks are printed.
# With a 7th argument "upgrade", each step replaces the binary and runs
# `vramblk upgrade` instead of a kill, and every upgrade must succeed.
swap_kill_run() {
    local run=$1 size=$2 args=$3 extra=$4 passes=$5 kills=$6 mode=${7:-kill}
    local dev avail fill mpid k victim sig waited rc out0 out1 pages t0 ways0 quiesced0 failed=0 crashes=0
    dmesg -c > /dev/null
    info "$run: MemAvailable before the add: $(mem MemAvailable) MiB"
    dev=$(vramblk add --size "$size" --backend host --hugepages --swap $args)
    check "$run: add $size${args:+ $args} --swap" [ "$dev" = /dev/ublkb0 ] ||
        { memory_holders "$run"; show_logs; return 1; }
    locked_memory "$run"
    check "$run: supervisor and server are I/O flushers (their allocations never wait on the device)" \
        device_flushers
    check "$run: the standby has its queue threads started before any take-over" \
        wait_for 20 standby_ready_to_take_over \
            "$(sed -n 's/.*"queues": *\([0-9]*\).*/\1/p' /run/vramblk/ublkb0.json)"
    HOLDER_FOR_CHILDREN=$(holder_pid 0)
    [ "$mode" = upgrade ] && ways0=$(handovers_the_kernels_way) &&
        quiesced0=$(handovers_saying "quiesced")
    avail=$(mem MemAvailable)
    fill=$((avail + extra))
    info "$run: MemAvailable $avail MiB; memcheck fills $fill MiB over $passes passes; $kills kills"
    out0=$(vmstat_of pswpout)
    rm -f /tmp/mc.until
    t0=$(cut -d. -f1 /proc/uptime)
    memcheck $fill "$passes" --until /tmp/mc.until > /tmp/mc 2>&1 &
    mpid=$!
    k=1
    while [ $k -le "$kills" ] && kill -0 $mpid 2>/dev/null; do
        sleep "$(( $(rand 38) / 10 )).$(rand 10)" 2>/dev/null || sleep 1
        if [ "$mode" = upgrade ]; then
            upgrade_device 0 "$run: upgrade $k" || failed=$((failed + 1))
            k=$((k + 1))
            continue
        fi
        # Every 5th kill from the 3rd is a crash, not a kill: the server
        # ends by SIGABRT as a failed assertion would (counted towards the
        # give-up, said in the kernel's log) and its standby takes over
        # under the same load.
        sig=KILL
        [ $((k % 5)) -eq 3 ] && sig=ABRT
        if [ $sig = ABRT ] || [ $((k % 2)) -eq 1 ]; then
            victim=$(vramblk list 2>/dev/null | awk '$1 == 0 {print $NF}')
        else
            victim=$(supervisor_children)
        fi
        [ -n "$victim" ] && kill -$sig $victim 2>/dev/null && [ $sig = ABRT ] && crashes=$((crashes + 1))
        info "$run: kill $k: SIG${sig}ed $(echo $victim)"
        k=$((k + 1))
    done
    touch /tmp/mc.until
    waited=0
    while kill -0 $mpid 2>/dev/null && [ $waited -lt 900 ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 $mpid 2>/dev/null; then
        fail "$run: memcheck ended within 15 minutes (no hang)"
        vramblk list | while read -r l; do info "list: $l"; done
        echo w > /proc/sysrq-trigger
        show_dmesg 150
        show_logs
        return 1
    fi
    wait $mpid
    rc=$?
    while read -r l; do info "$run: $l"; done < /tmp/mc
    out1=$(vmstat_of pswpout)
    pages=$((out1 - out0))
    info "$run: pswpout $pages pages, $((k - 1)) ${mode}s in $(( $(cut -d. -f1 /proc/uptime) - t0 )) s"
    check "$run: every byte read back intact through $((k - 1)) ${mode}s" [ $rc -eq 0 ] || show_logs
    [ "$mode" = upgrade ] &&
        info "$run: $(( $(handovers_saying "quiesced") - quiesced0 )) of the $((k - 1)) hand-overs quiesced" &&
        check "$run: each of the $((k - 1)) upgrades handed the device to the new binary" [ $failed -eq 0 ] &&
        { check "$run: each took the device the kernel's way ($(handover_words))" \
            [ $(( $(handovers_the_kernels_way) - ways0 )) -eq $((k - 1)) ] ||
            cat /run/vramblk/*.log | sort | grep -E "over from the old binary's server|let go of|quiesc" |
                tail -20 | while read -r l; do info "$run: $l"; done; }
    check "$run: swap was really used (pswpout grew by > 32 MiB)" [ $pages -gt 8192 ]
    check "$run: nothing was OOM-killed" no_oom
    check "$run: no take-over waited out the kernel (\"still live after\")" none_waited_out_kernel
    check "$run: no kernel oops or hung task" no_oops
    check "$run: supervisor and server are still I/O flushers" device_flushers
    [ "$mode" = kill ] && [ $crashes -gt 0 ] &&
        check "$run: the kernel's log names the crashed servers ($crashes SIGABRTs)" \
            sh -c "dmesg | grep -q 'vramblk: /dev/ublkb0: server [0-9]* ended (signal: 6'"
    check "$run: no server ended on its own (the kernel's log names no end but the SIGABRTs sent)" \
        sh -c "! dmesg | grep 'vramblk: .* server [0-9]* ended (' | grep -v 'ended (signal: 6'" ||
        dmesg | grep 'vramblk: ' | while read -r l; do info "dmesg: $l"; done
    out=$(vramblk del 0 2>&1)
    check "$run: swapoff and del" [ "$out" = "removed /dev/ublkb0" ] || info "$out"
}
