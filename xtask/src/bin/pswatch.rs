//! Guest-side helper for the crash and package suites: shows where
//! processes wait while the system is stuck. Locks itself in memory, then
//! every SECS seconds prints each process's state and kernel wait channel
//! (and, when tasks stay blocked, their stacks and the kernel's view of
//! every blocked task), until /tmp/pswatch.stop appears. It marks itself
//! an I/O flusher too: otherwise its own allocations, in direct reclaim,
//! write pages out to the very swap device that is stuck and it blocks
//! with everything else (as it once did, printing nothing).
//!
//! usage: pswatch SECS

use std::time::Duration;

/// prctl's PR_SET_IO_FLUSHER (Linux 5.6), which the libc crate names only for Android.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    // SAFETY: mlockall has no memory-safety preconditions.
    unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    // SAFETY: prctl(PR_SET_IO_FLUSHER) takes plain integers.
    unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    let mut line = String::with_capacity(1 << 16);
    let mut blocked_rounds = 0;
    while !std::path::Path::new("/tmp/pswatch.stop").exists() {
        std::thread::sleep(Duration::from_secs(secs));
        line.clear();
        line.push_str("INFO pswatch:");
        let mut blocked = false;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // "pid (comm) S ..."
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                    continue;
                };
                let comm = &stat[open + 1..close];
                let state = stat[close + 1..].split_whitespace().next().unwrap_or("?");
                if state == "I" || (state == "S" && comm.starts_with('k')) {
                    continue;
                }
                blocked |= state == "D";
                let wchan =
                    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                line.push_str(&format!(" {pid}:{comm}:{state}:{wchan}"));
                if comm == "vramblk" {
                    line.push_str(&threads(pid));
                }
            }
        }
        println!("{line}");
        blocked_rounds = if blocked { blocked_rounds + 1 } else { 0 };
        if blocked_rounds == 2 {
            // Ask the kernel for the stacks of every blocked task, of what
            // runs on each CPU, and for the memory picture. It prints them
            // at info level, below the guests' console loglevel (4): raise
            // it so they reach the console log too, not only dmesg.
            let _ = std::fs::write("/proc/sys/kernel/printk", "7");
            for key in ["w", "l", "m"] {
                let _ = std::fs::write("/proc/sysrq-trigger", key);
            }
            println!("{}", vramblk_stacks());
        }
    }
}

/// The kernel stack of every vramblk thread (where a running one spins)
/// and of every other task blocked (state D).
fn vramblk_stacks() -> String {
    let mut out = String::from("INFO pswatch stacks:");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != "vramblk" && !blocked(&pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let stack = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stack"))
                .unwrap_or_default();
            let frames: Vec<&str> = stack
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect();
            out.push_str(&format!(" [{pid}/{tid} {comm}: {}]", frames.join(" < ")));
        }
    }
    out
}

/// Whether the task `pid` is in uninterruptible sleep.
fn blocked(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|c| stat[c + 1..].split_whitespace().next())
        == Some("D")
}

/// "[tid:state:wchan ...]" for every thread of a process but the first.
fn threads(pid: &str) -> String {
    let mut out = String::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        if tid == pid {
            continue;
        }
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|c| stat[c + 1..].split_whitespace().next())
            .unwrap_or("?");
        let wchan =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan")).unwrap_or_default();
        out.push_str(&format!(" [{tid}:{state}:{wchan}]"));
    }
    out
}
