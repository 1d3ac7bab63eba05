//! The supervisor's signals: SIGTERM/SIGINT ask it to stop (swap off, then
//! remove the device), SIGUSR1 (sent by `vramblk recover`) asks it to
//! restart a dead server now, SIGUSR2 (sent by `vramblk upgrade`) to hand
//! the device to the binary now on disk (upgrade.rs). Handlers only set
//! flags; the supervisor's loop acts on them. In a server, SIGUSR2 (from
//! its supervisor, as an upgrade takes the device from it) holds its log.
//!
//! libc's sigaction: rustix offers signal handlers only to runtimes that
//! replace the C library (`rustix::runtime`).

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static RECOVER_NOW: AtomicBool = AtomicBool::new(false);
static UPGRADE: AtomicBool = AtomicBool::new(false);

/// The signal `vramblk upgrade` sends a supervisor (and the service).
pub const UPGRADE_SIGNAL: rustix::process::Signal = rustix::process::Signal::USR2;

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_recover(_: libc::c_int) {
    RECOVER_NOW.store(true, Ordering::SeqCst);
}

extern "C" fn on_upgrade(_: libc::c_int) {
    UPGRADE.store(true, Ordering::SeqCst);
}

/// The signal a supervisor sends its old server right before an upgrade's
/// standby quiesces the device (handover.rs): from then on the server holds
/// its log lines (held_log), since the device, perhaps the swap that must
/// free a page for the next line, waits until the server has let go.
pub const HANDOVER_SIGNAL: rustix::process::Signal = UPGRADE_SIGNAL;

extern "C" fn on_handover(_: libc::c_int) {
    crate::held_log::hold_from_signal();
}

fn set(signal: libc::c_int, handler: libc::sighandler_t) {
    set_with(signal, handler, 0);
}

fn set_with(signal: libc::c_int, handler: libc::sighandler_t, flags: libc::c_int) {
    // libc: rustix offers sigaction only to runtimes that replace the C
    // library (`rustix::runtime`).
    // SAFETY: a zeroed sigaction with a handler that only stores to an
    // atomic (async-signal-safe), or SIG_IGN / SIG_DFL.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(signal, &sa, std::ptr::null_mut());
    }
}

/// In the supervisor.
pub fn install_supervisor_handlers() {
    set(
        libc::SIGTERM,
        on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t,
    );
    set(
        libc::SIGINT,
        on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t,
    );
    set(
        libc::SIGUSR1,
        on_recover as extern "C" fn(libc::c_int) as libc::sighandler_t,
    );
    set(
        UPGRADE_SIGNAL.as_raw(),
        on_upgrade as extern "C" fn(libc::c_int) as libc::sighandler_t,
    );
}

/// In a server, right after the fork: a terminal's Ctrl-C and `vramblk
/// recover` are for the supervisor; SIGTERM ends the server as usual (and
/// the supervisor recovers the device); HANDOVER_SIGNAL holds its log.
pub fn reset_for_server() {
    set(libc::SIGINT, libc::SIG_IGN);
    set(libc::SIGUSR1, libc::SIG_IGN);
    // SA_RESTART: the signal lands in whichever thread; its blocking calls
    // (a socket's accept, a read) go on rather than fail with EINTR.
    set_with(
        HANDOVER_SIGNAL.as_raw(),
        on_handover as extern "C" fn(libc::c_int) as libc::sighandler_t,
        libc::SA_RESTART,
    );
    set(libc::SIGTERM, libc::SIG_DFL);
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Whether `vramblk recover` asked since the last call.
pub fn take_recover_request() -> bool {
    RECOVER_NOW.swap(false, Ordering::SeqCst)
}

/// Whether `vramblk upgrade` asked since the last call.
pub fn take_upgrade_request() -> bool {
    UPGRADE.swap(false, Ordering::SeqCst)
}

/// Whether process `pid` handles the upgrade signal (a supervisor of a
/// vramblk that knows it); to any other process the signal is fatal.
pub fn handles_upgrade(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .as_deref()
        .and_then(caught_mask)
        .is_some_and(|mask| mask & (1 << (UPGRADE_SIGNAL.as_raw() - 1)) != 0)
}

/// The SigCgt mask of a /proc/PID/status text.
fn caught_mask(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// In `vramblk service`: SIGTERM/SIGINT stop it (devices down), SIGUSR1
/// (sent by the power udev rule) makes it look at the power supplies now.
pub fn install_service_handlers() {
    install_supervisor_handlers();
}

/// Whether the udev rule asked for a power check since the last call.
pub fn take_poll_request() -> bool {
    take_recover_request()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caught_mask_names_the_upgrade_signal() {
        // SIGUSR1 (10) and SIGUSR2 (12) caught, as in a supervisor.
        let caught = "Name:\tvramblk\nSigIgn:\t0000000000001000\nSigCgt:\t0000000000000a00\n";
        let mask = caught_mask(caught).unwrap();
        assert_ne!(mask & (1 << (UPGRADE_SIGNAL.as_raw() - 1)), 0);
        assert_eq!(caught_mask("SigCgt:\tzz\n"), None);
        assert_eq!(caught_mask("Name:\tx\n"), None);
    }

    #[test]
    fn a_process_without_the_handler_does_not_handle_it() {
        // The test harness catches no SIGUSR2; a supervisor does.
        let me = crate::host::own_pid();
        assert!(!handles_upgrade(me));
        assert!(!handles_upgrade(u32::MAX));
    }
}
