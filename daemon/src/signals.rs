//! The supervisor's signals: SIGTERM/SIGINT ask it to stop (swap off, then
//! remove the device), SIGUSR1 (sent by `vramblk recover`) asks it to
//! restart a dead server now. Handlers only set flags; the supervisor's
//! loop acts on them.
//!
//! libc's sigaction: rustix offers signal handlers only to runtimes that
//! replace the C library (`rustix::runtime`).

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static RECOVER_NOW: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_recover(_: libc::c_int) {
    RECOVER_NOW.store(true, Ordering::SeqCst);
}

fn set(signal: libc::c_int, handler: libc::sighandler_t) {
    // libc: rustix offers sigaction only to runtimes that replace the C
    // library (`rustix::runtime`).
    // SAFETY: a zeroed sigaction with a handler that only stores to an
    // atomic (async-signal-safe), or SIG_IGN / SIG_DFL.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
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
}

/// In a server, right after the fork: a terminal's Ctrl-C and `vramblk
/// recover` are for the supervisor; SIGTERM ends the server as usual (and
/// the supervisor recovers the device).
pub fn reset_for_server() {
    set(libc::SIGINT, libc::SIG_IGN);
    set(libc::SIGUSR1, libc::SIG_IGN);
    set(libc::SIGTERM, libc::SIG_DFL);
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Whether `vramblk recover` asked since the last call.
pub fn take_recover_request() -> bool {
    RECOVER_NOW.swap(false, Ordering::SeqCst)
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
