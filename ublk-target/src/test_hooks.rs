//! A fault a test can ask a server for, honoured only when the server runs
//! with VRAMBLK_TEST_HOOKS=1 (the crash boot does; nothing else sets it).

use std::ffi::OsStr;

/// Set to "1" to let a server take test hooks (the daemon's VRAM-control
/// hooks read the same).
pub const HOOKS_ENV: &str = "VRAMBLK_TEST_HOOKS";

/// A path: when a file is there as a queue of a server is about to fetch
/// (its command buffer mapped, after a recovering server's
/// START_USER_RECOVERY), the queue removes it and the process aborts: a
/// death inside the recovery window, once (stranded.rs).
const DIE_BEFORE_FETCH_ENV: &str = "VRAMBLK_TEST_DIE_BEFORE_FETCH";

/// A path: when a file is there as a standby server is told to take its
/// device over, the standby removes it and panics on its main thread (a bug
/// there, once: the daemon's panic handling, daemon/src/panics.rs).
const PANIC_ON_TAKE_OVER_ENV: &str = "VRAMBLK_TEST_PANIC_ON_TAKE_OVER";

/// Whether the test's trigger file named by `env` was there (and is now
/// removed), in a server that takes test hooks.
fn fired(env: &str) -> Option<std::ffi::OsString> {
    if std::env::var_os(HOOKS_ENV).as_deref() != Some(OsStr::new("1")) {
        return None;
    }
    let trigger = std::env::var_os(env)?;
    std::fs::remove_file(&trigger).is_ok().then_some(trigger)
}

/// Panics if the test asked a standby to panic as it takes over.
pub fn panic_on_take_over_if_asked() {
    if let Some(trigger) = fired(PANIC_ON_TAKE_OVER_ENV) {
        panic!(
            "test hook: panicking as this standby takes over ({} was there)",
            std::path::Path::new(&trigger).display()
        );
    }
}

/// Aborts the process if the test asked for a death before the fetches.
pub(crate) fn die_before_fetch_if_asked(qid: u16) {
    if let Some(trigger) = fired(DIE_BEFORE_FETCH_ENV) {
        log::warn!(
            "queue {qid}: test hook: dying before this queue fetches ({} was there)",
            std::path::Path::new(&trigger).display()
        );
        std::process::abort();
    }
}
