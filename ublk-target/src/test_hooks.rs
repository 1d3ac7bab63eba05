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

/// Aborts the process if the test asked for a death before the fetches.
pub(crate) fn die_before_fetch_if_asked(qid: u16) {
    if std::env::var_os(HOOKS_ENV).as_deref() != Some(OsStr::new("1")) {
        return;
    }
    let Some(trigger) = std::env::var_os(DIE_BEFORE_FETCH_ENV) else {
        return;
    };
    if std::fs::remove_file(&trigger).is_ok() {
        log::warn!(
            "queue {qid}: test hook: dying before this queue fetches ({} was there)",
            std::path::Path::new(&trigger).display()
        );
        std::process::abort();
    }
}
