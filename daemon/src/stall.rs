//! A take-over that does not end, said where it can be read. While a
//! device has no server its swap waits, and the supervisor's own log file
//! may sit on a page that waits with it (held_log keeps those lines in
//! memory until the device serves again). The kernel's log needs no such
//! page: the supervisor opens /dev/kmsg while all is well and, when a
//! device stays unserved, writes there what its new server is doing, so
//! `dmesg` and the journal show it even if the take-over never ends.

use std::io::Write;
use std::time::{Duration, Instant};
use vramblk_ublk_target::control::bdev_path;

/// The first word after this long without a server, then one this often.
const FIRST: Duration = Duration::from_secs(10);
const AGAIN: Duration = Duration::from_secs(30);

pub struct StallReporter {
    kmsg: Option<std::fs::File>,
    /// How long unserved before the next word.
    next: Duration,
}

impl StallReporter {
    /// Opens /dev/kmsg now, while nothing waits; without it (not root, no
    /// such device) the words go to the supervisor's log alone.
    pub fn open() -> StallReporter {
        StallReporter {
            kmsg: std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .ok(),
            next: FIRST,
        }
    }

    /// The device serves again: the next stall is counted from zero.
    pub fn served(&mut self) {
        self.next = FIRST;
    }

    /// A server of device `id` ended on its own (a crash, an error exit:
    /// not a SIGKILL from outside, which a script or an administrator
    /// sends and the supervisor's log tells). Said in the kernel's log at
    /// once, since the supervisor's own log is held until the device serves
    /// again, and a take-over that never ends would keep the cause unsaid.
    pub fn server_ended(&mut self, id: u32, pid: i32, status: &str) {
        let line = format!(
            "{}: server {pid} ended ({status}); another takes the device over",
            bdev_path(id)
        );
        self.say(&line);
    }

    /// Called at each tick while device `id` has had no server since
    /// `since` and `server` (a pid) is taking it over: past the next mark,
    /// says so.
    pub fn check(&mut self, id: u32, since: Instant, server: i32) {
        let down = since.elapsed();
        if down < self.next {
            return;
        }
        self.next = down + AGAIN;
        let line = describe(&bdev_path(id), down, server);
        self.say(&line);
    }

    /// `line` in the supervisor's log and in the kernel's.
    fn say(&mut self, line: &str) {
        log::warn!("supervisor: {line}");
        if let Some(k) = &mut self.kmsg {
            // Level 4 (warning), as the kernel's own hung-task lines.
            let _ = k.write_all(format!("<4>vramblk: {line}\n").as_bytes());
        }
    }
}

/// "/dev/ublkb0 has had no server for 10 s; pid 290, taking it over, is
/// D (waiting in folio_wait_bit_common)".
pub fn describe(device: &str, down: Duration, server: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{server}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|c| stat[c + 1..].split_whitespace().next())
        .unwrap_or("gone")
        .to_string();
    let wchan = std::fs::read_to_string(format!("/proc/{server}/wchan")).unwrap_or_default();
    let waiting = match wchan.trim() {
        "" | "0" => String::new(),
        w => format!(" (waiting in {w})"),
    };
    format!(
        "{device} has had no server for {} s; pid {server}, taking it over, is {state}{waiting}",
        down.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_names_the_device_the_time_and_the_server_state() {
        let me = std::process::id() as i32;
        let line = describe("/dev/ublkb3", Duration::from_secs(12), me);
        assert!(
            line.starts_with(&format!(
                "/dev/ublkb3 has had no server for 12 s; pid {me}, taking it over, is "
            )),
            "{line}"
        );
        // This test runs, so the state is R (or S between threads).
        assert!(line.contains(" is R") || line.contains(" is S"), "{line}");
        assert!(describe("/dev/ublkb3", Duration::ZERO, i32::MAX).ends_with("is gone"));
    }

    #[test]
    fn words_come_at_10_s_then_every_30_s_and_restart_after_service() {
        let mut r = StallReporter {
            kmsg: None,
            next: FIRST,
        };
        let now = Instant::now();
        r.check(0, now, 1);
        assert_eq!(r.next, FIRST, "nothing before 10 s");
        let Some(since) = now.checked_sub(Duration::from_secs(11)) else {
            return; // a clock this young cannot go back 11 s
        };
        r.check(0, since, 1);
        assert!(r.next >= Duration::from_secs(41) && r.next < Duration::from_secs(43));
        let next = r.next;
        r.check(0, since, 1);
        assert_eq!(r.next, next, "one word per mark");
        r.served();
        assert_eq!(r.next, FIRST);
    }

    #[test]
    fn a_crashed_server_is_named_in_the_kernels_log_at_warning_level() {
        use std::os::unix::process::ExitStatusExt;
        let path = std::env::temp_dir().join(format!("vramblk-kmsg-{}", std::process::id()));
        let mut r = StallReporter {
            kmsg: Some(std::fs::File::create(&path).unwrap()),
            next: FIRST,
        };
        // What the supervisor passes: the wait status's own words.
        let status = std::process::ExitStatus::from_raw(libc::SIGABRT).to_string();
        r.server_ended(2, 77, &status);
        let written = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            written.starts_with("<4>vramblk: /dev/ublkb2: server 77 ended (signal: 6 (SIGABRT)"),
            "{written}"
        );
        assert!(
            written.ends_with("); another takes the device over\n"),
            "{written}"
        );
        assert_eq!(r.next, FIRST, "a crash starts no stall count");
    }
}
