//! The daemon's log while a device recovers. Swap I/O then waits on the
//! device and memory may be exhausted; appending a line that needs a new
//! page of the log file (on tmpfs that page is RAM) could wait for memory
//! only the recovered device can free. From a server's death until a new
//! server serves, the supervisor and the server hold their lines in a
//! buffer set aside in advance, and write them once the device is live.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// Bytes of lines held at most; a recovery logs a few hundred. Lines past
/// it are counted, not kept: holding must never allocate.
const HELD_BYTES: usize = 64 << 10;

struct State {
    file: File,
    held: Vec<u8>,
    holding: bool,
    dropped: usize,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

/// Holding asked for from a signal handler, which may not take the lock.
static HOLD_NOW: AtomicBool = AtomicBool::new(false);

fn holding(s: &State) -> bool {
    s.holding || HOLD_NOW.load(Ordering::SeqCst)
}

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> Option<T> {
    let state = STATE.get()?;
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    Some(f(&mut guard))
}

/// The log writer env_logger writes through (one per process image).
pub struct HeldLog;

impl HeldLog {
    /// The writer for `file`; the first call in a process sets it up.
    pub fn new(file: File) -> HeldLog {
        STATE.get_or_init(|| {
            Mutex::new(State {
                file,
                held: Vec::with_capacity(HELD_BYTES),
                holding: false,
                dropped: 0,
            })
        });
        HeldLog
    }
}

impl Write for HeldLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        with_state(|s| {
            if !holding(s) {
                return s.file.write(buf);
            }
            if s.held.len() + buf.len() <= s.held.capacity() {
                s.held.extend_from_slice(buf);
            } else {
                s.dropped += 1;
            }
            Ok(buf.len())
        })
        .unwrap_or(Ok(buf.len()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        with_state(|s| if holding(s) { Ok(()) } else { s.file.flush() }).unwrap_or(Ok(()))
    }
}

/// From now on, lines are held (a recovery begins).
pub fn hold() {
    with_state(|s| s.holding = true);
}

/// As [`hold`], from a signal handler (async-signal-safe: one atomic
/// store): an old server whose device is about to be quiesced for an
/// upgrade, so that its last lines need no page while the device waits.
pub fn hold_from_signal() {
    HOLD_NOW.store(true, Ordering::SeqCst);
}

/// Writes the held lines and stops holding (the device serves again).
pub fn release() {
    with_state(|s| {
        s.holding = false;
        HOLD_NOW.store(false, Ordering::SeqCst);
        let _ = s.file.write_all(&s.held);
        if s.dropped > 0 {
            let _ = writeln!(
                s.file,
                "({} log lines written during the recovery were dropped: the held buffer was full)",
                s.dropped
            );
            s.dropped = 0;
        }
        // The buffer's memory is kept for the next recovery.
        s.held.clear();
    });
}

/// The held lines, each handed to `say`, for a process that is dying of
/// a fault (faults.rs): they would end with it, and were what said what
/// it was doing. From a signal handler: it only tries the lock (the
/// faulting thread may hold it) and allocates nothing.
pub fn held_lines_of_a_dying_process(say: &mut dyn FnMut(&[u8])) {
    let Some(state) = STATE.get() else { return };
    let Ok(s) = state.try_lock() else { return };
    for line in s.held.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        say(line);
    }
}

/// In a forked child: forget the lines the parent held (the parent writes
/// them), keep holding if it did.
pub fn forget_parents_lines() {
    with_state(|s| {
        s.held.clear();
        s.dropped = 0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn lines_are_held_without_allocating_then_written_in_order() {
        let path = std::env::temp_dir().join(format!("held-log-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut log = HeldLog::new(file);
        log.write_all(b"before\n").unwrap();
        hold();
        let cap = with_state(|s| s.held.capacity()).unwrap();
        log.write_all(b"during 1\n").unwrap();
        log.write_all(b"during 2\n").unwrap();
        let big = vec![b'x'; HELD_BYTES];
        log.write_all(&big).unwrap();
        assert_eq!(
            with_state(|s| s.held.capacity()).unwrap(),
            cap,
            "no allocation while holding"
        );
        let mut text = String::new();
        File::open(&path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "before\n", "nothing written while holding");
        release();
        log.write_all(b"after\n").unwrap();
        text.clear();
        File::open(&path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(
            text,
            "before\nduring 1\nduring 2\n(1 log lines written during the recovery were dropped: \
             the held buffer was full)\nafter\n"
        );
        // Asked from a signal handler (an old server whose device is about
        // to be quiesced): held the same way, written at the release.
        hold_from_signal();
        log.write_all(b"handing over\n").unwrap();
        let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap();
        assert!(!read(&path).contains("handing over"), "held");
        release();
        log.write_all(b"gone\n").unwrap();
        assert!(
            read(&path).ends_with("after\nhanding over\ngone\n"),
            "{}",
            read(&path)
        );
        let _ = std::fs::remove_file(&path);
    }
}
