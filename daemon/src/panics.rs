//! What a daemon process does when it panics: it says where, with a
//! backtrace, in its log (and where, in the kernel's), and aborts.
//!
//! Aborting, not unwinding, for two reasons. A daemon is a forked child
//! (process::spawn, Supervisor::fork_server): unwinding out of the
//! function it was forked to run would carry on in the code of the
//! process it was forked from (a server would go on as a second
//! supervisor). And a server's queue threads still use its io buffers,
//! rings and store while its main thread unwinds: destructors freeing
//! them under those threads turn one bug into a crash elsewhere (a CI run
//! on 7.3 saw a taking-over standby panic, then die of SIGSEGV). An
//! abort ends the process at once; its supervisor recovers the device as
//! after any other death.

use std::backtrace::Backtrace;
use std::io::Write;
use std::panic::PanicHookInfo;
use std::path::Path;

/// From now on, a panic in this process, on any thread, is logged with
/// its backtrace, said in the kernel's log, and aborts the process; a
/// fault is said in the kernel's log too (faults.rs). Called first thing
/// in a forked daemon.
pub fn abort_on_panic() {
    abort_on_panic_telling(Path::new(KERNEL_LOG));
}

/// The kernel's log, as a process writes to it.
const KERNEL_LOG: &str = "/dev/kmsg";

/// [`abort_on_panic`], with `kernel_log` for the kernel's log (a test
/// gives a file of its own).
fn abort_on_panic_telling(kernel_log: &Path) {
    crate::faults::say_faults_in(kernel_log);
    let kernel_log = kernel_log.to_path_buf();
    std::panic::set_hook(Box::new(move |info| {
        let said = said(info);
        report(&said, &mut std::io::stderr());
        tell_the_kernel(&kernel_log, &said);
        std::process::abort();
    }));
}

/// "process P thread 'T' panicked at PLACE: MESSAGE".
fn said(info: &PanicHookInfo) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let place = info
        .location()
        .map_or_else(|| "an unknown place".to_string(), |l| l.to_string());
    format!(
        "process {} thread '{name}' panicked at {place}: {}",
        std::process::id(),
        panic_message(info.payload())
    )
}

/// `said` and a backtrace (named through the binary's symbols, with lines
/// where it keeps its line tables), written to `out`: the daemon's stderr
/// is its log file. Written straight, not through the held log: the
/// process is about to end, and held lines would end with it.
fn report(said: &str, out: &mut impl Write) {
    let _ = writeln!(
        out,
        "vramblk: {said}; aborting\n{}",
        Backtrace::force_capture()
    );
}

/// `said` in the kernel's log too, as stall.rs says a server's death: the
/// daemon's own log may be held or lost, and `dmesg` and the journal are
/// where an administrator (and the VM boots' no-oops check) looks.
fn tell_the_kernel(kernel_log: &Path, said: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open(kernel_log) {
        // Level 3 (error).
        let _ = kmsg.write_all(format!("<3>vramblk: {said}\n").as_bytes());
    }
}

/// A panic payload's text (panics carry a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a payload that is not text)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    use crate::dying_child;

    #[test]
    fn a_panic_on_any_thread_is_logged_with_a_backtrace_and_ends_the_process() {
        const NAME: &str =
            "panics::tests::a_panic_on_any_thread_is_logged_with_a_backtrace_and_ends_the_process";
        if let Some(kernel_log) = dying_child::kernel_log() {
            abort_on_panic_telling(&kernel_log);
            dying_child::die_on_thread("queue 3", || panic!("a bug in queue {}", 3));
        }
        let (out, kernel_said) = dying_child::run(NAME);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
        assert!(
            stderr.contains("thread 'queue 3' panicked at daemon/src/panics.rs:"),
            "{stderr}"
        );
        assert!(stderr.contains(": a bug in queue 3; aborting"), "{stderr}");
        // The backtrace names the closure that panicked.
        assert!(
            stderr.contains("a_panic_on_any_thread_is_logged_with_a_backtrace"),
            "{stderr}"
        );
        assert!(
            kernel_said.starts_with("<3>vramblk: process ")
                && kernel_said.contains(" thread 'queue 3' panicked at daemon/src/panics.rs:")
                && kernel_said.ends_with(": a bug in queue 3\n"),
            "{kernel_said:?}"
        );
    }

    #[test]
    fn a_panic_payload_of_either_kind_reads_as_its_text() {
        let literal: Box<dyn std::any::Any + Send> = Box::new("a literal");
        let formatted: Box<dyn std::any::Any + Send> = Box::new(format!("formatted {}", 2));
        let other: Box<dyn std::any::Any + Send> = Box::new(7u32);
        assert_eq!(panic_message(literal.as_ref()), "a literal");
        assert_eq!(panic_message(formatted.as_ref()), "formatted 2");
        assert_eq!(
            panic_message(other.as_ref()),
            "(a payload that is not text)"
        );
    }
}
