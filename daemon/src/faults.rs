//! What a daemon process says when it dies of a fault (SIGSEGV, SIGBUS,
//! SIGILL, SIGFPE): which process and thread, the address, where in the
//! binary it was (with the frames that called it), and the log lines it
//! was holding, all in the kernel's log. Then it dies of the same signal,
//! so its supervisor sees the crash it was.
//!
//! Why: a server that takes over holds its log lines (held_log.rs), and a
//! fault used to end them with it: CI boots on 7.3 saw a standby die of
//! SIGSEGV just after it took over, with nothing said of where. The
//! frames are offsets into the binary (`exe+0x...`), which
//! `addr2line -e vramblk -f -C` turns into functions and lines.
//!
//! The handler runs where nearly nothing is safe: it allocates nothing,
//! takes no lock (it only tries the held log's), and writes with
//! write(2) to a file opened when it was installed. An alarm ends the
//! process if walking the frames should hang.

use std::io::Write as _;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering::Relaxed};

/// The signals a fault raises.
const FAULTS: [libc::c_int; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];

/// Frames said at most.
const MAX_FRAMES: usize = 24;

/// Seconds the handler may take before SIGALRM ends the process.
const HANDLER_SECS: libc::c_uint = 3;

/// Where the report goes: the kernel's log, opened once (-1: nowhere).
static KERNEL_LOG_FD: AtomicI32 = AtomicI32::new(-1);

/// The executable's mapping: frames in it are said as offsets.
static EXE_START: AtomicUsize = AtomicUsize::new(0);
static EXE_END: AtomicUsize = AtomicUsize::new(0);

/// From now on a fault in this process, on any thread, is said in
/// `kernel_log` (/dev/kmsg) before the process dies of it. Once per
/// process image: a forked child inherits the handlers, the open log and
/// the binary's mapping, so a server forked to recover (memory short
/// then) reads no /proc file and allocates nothing here; an exec starts
/// afresh.
pub fn say_faults_in(kernel_log: &Path) {
    if KERNEL_LOG_FD.load(Relaxed) >= 0 {
        return;
    }
    match std::fs::OpenOptions::new().write(true).open(kernel_log) {
        Ok(f) => KERNEL_LOG_FD.store(f.into_raw_fd(), Relaxed),
        // Not root, or no /dev/kmsg: nothing to say a fault in.
        Err(_) => return,
    }
    if let Some((start, end)) = exe_mapping() {
        EXE_START.store(start, Relaxed);
        EXE_END.store(end, Relaxed);
    }
    for sig in FAULTS {
        // SAFETY: a zeroed sigaction is valid; the handler has the
        // SA_SIGINFO signature and is async-signal-safe (module doc).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            // On the faulting thread's own stack, not std's alternate one
            // (a few KiB, which walking the frames overflows). A thread
            // that overflowed its stack faults again in here and dies of
            // SIGSEGV unsaid, as without this handler.
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// The lowest and highest address of the executable's mappings, from
/// /proc/self/maps (read now: the handler may not).
fn exe_mapping() -> Option<(usize, usize)> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let exe = exe.to_str()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut range: Option<(usize, usize)> = None;
    for line in maps.lines() {
        // "start-end perms offset dev inode path"
        let mut fields = line.split_whitespace();
        let Some(span) = fields.next() else { continue };
        if fields.nth(4) != Some(exe) {
            continue;
        }
        let Some((a, b)) = span.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        range = Some(range.map_or((a, b), |(s, e)| (s.min(a), e.max(b))));
    }
    range
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: alarm is async-signal-safe; SIGALRM's default action ends
    // the process should anything below hang.
    unsafe { libc::alarm(HANDLER_SECS) };
    let fd = KERNEL_LOG_FD.load(Relaxed);
    if fd >= 0 {
        // SAFETY: the kernel hands the handler a valid siginfo; which of
        // its union's fields hold follows from si_code.
        let cause = unsafe {
            if (*info).si_code <= 0 {
                // SI_USER, SI_TKILL, ...: sent, not a fault of its own.
                Cause::SentBy((*info).si_pid())
            } else {
                Cause::Fault((*info).si_addr() as usize, (*info).si_code)
            }
        };
        say_fault(fd, sig, cause);
    }
    // SA_RESETHAND put the default action back; the signal is blocked
    // while the handler runs, so raised now it is delivered on return,
    // ending the process with it (a fault sent by kill(2) too, which
    // would not repeat).
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(sig) };
}

/// Why the signal came.
enum Cause {
    /// A fault at this address, with the kernel's si_code (SEGV_MAPERR 1,
    /// SEGV_ACCERR 2, BUS_ADRERR 2, ...).
    Fault(usize, libc::c_int),
    /// Sent by this process (kill(2)).
    SentBy(libc::pid_t),
}

/// The report, one kernel log record per line.
fn say_fault(fd: libc::c_int, sig: libc::c_int, cause: Cause) {
    let mut line = Line::new();
    let _ = write!(
        line,
        "<2>vramblk: process {} thread '{}' died of {} ",
        std::process::id(),
        ThreadName::current(),
        signal_name(sig),
    );
    let _ = match cause {
        Cause::Fault(addr, code) => write!(line, "at address {addr:#x} (code {code})"),
        Cause::SentBy(pid) => write!(line, "sent by process {pid}"),
    };
    line.say(fd);
    let mut frames = [0usize; MAX_FRAMES];
    let mut n = 0;
    // SAFETY: unsynchronized because the handler may not take locks; the
    // frames are only walked (not named: that allocates), and other
    // threads may run but do not unwind this thread's stack.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            frames[n] = frame.ip() as usize;
            n += 1;
            n < MAX_FRAMES
        });
    }
    let mut line = Line::new();
    let _ = write!(line, "<2>vramblk: process {} frames:", std::process::id());
    let (start, end) = (EXE_START.load(Relaxed), EXE_END.load(Relaxed));
    for &ip in &frames[..n] {
        let _ = if (start..end).contains(&ip) {
            write!(line, " exe+{:#x}", ip - start)
        } else {
            write!(line, " {ip:#x}")
        };
    }
    line.say(fd);
    crate::held_log::held_lines_of_a_dying_process(&mut |held| {
        let mut line = Line::new();
        let _ = write!(line, "<3>vramblk: process {} held: ", std::process::id());
        line.push(held);
        line.say(fd);
    });
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => "a signal",
    }
}

/// A line built on the stack: a kernel log record is at most about 1 KiB.
struct Line {
    buf: [u8; 960],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 960],
            len: 0,
        }
    }

    /// Appends what fits.
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    /// Writes the line, newline-ended, as one record.
    fn say(&mut self, fd: libc::c_int) {
        self.buf[self.len] = b'\n';
        // SAFETY: write(2) of our own buffer; async-signal-safe.
        unsafe { libc::write(fd, self.buf.as_ptr().cast(), self.len + 1) };
    }
}

impl std::io::Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.push(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The calling thread's name as the kernel has it (16 bytes at most),
/// read without allocating.
struct ThreadName([u8; 16]);

impl ThreadName {
    fn current() -> ThreadName {
        let mut name = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes into our buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        ThreadName(name)
    }
}

impl std::fmt::Display for ThreadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        f.write_str(std::str::from_utf8(&self.0[..len]).unwrap_or("?"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    use crate::dying_child;

    /// In the dying child: the fault reporter installed, one log line held.
    fn child_setup(kernel_log: &Path) {
        let log = kernel_log.with_extension("log");
        let mut held = crate::held_log::HeldLog::new(std::fs::File::create(log).expect("log"));
        crate::held_log::hold();
        let _ = held.write_all(b"taking over /dev/ublkb7\n");
        say_faults_in(kernel_log);
    }

    #[test]
    fn a_fault_on_any_thread_is_said_with_frames_and_held_lines_then_kills() {
        const NAME: &str =
            "faults::tests::a_fault_on_any_thread_is_said_with_frames_and_held_lines_then_kills";
        if let Some(kernel_log) = dying_child::kernel_log() {
            child_setup(&kernel_log);
            // SAFETY: not safe at all: the fault this test is about.
            dying_child::die_on_thread("queue 3", || unsafe {
                std::ptr::read_volatile(0x18 as *const u64)
            });
        }
        let (out, said) = dying_child::run(NAME);
        let status = out.status;
        assert_eq!(
            status.signal(),
            Some(libc::SIGSEGV),
            "dies of the fault itself: {said}"
        );
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(lines.len(), 3, "what, frames, the held line: {said}");
        assert!(
            lines[0].starts_with("<2>vramblk: process ")
                && lines[0].ends_with(" thread 'queue 3' died of SIGSEGV at address 0x18 (code 1)"),
            "{said}"
        );
        // The frames: the faulting closure's among them, in the binary.
        let frames: Vec<&str> = lines[1]
            .split_once(" frames: ")
            .map(|(_, f)| f.split(' ').collect())
            .unwrap_or_default();
        assert!(frames.len() >= 3, "{said}");
        // Offsets into the binary name the functions, here through this
        // process's own mapping of the same binary (as addr2line would).
        let (start, _) = exe_mapping().expect("this test binary's mapping");
        let mut named = Vec::new();
        for f in &frames {
            let Some(off) = f.strip_prefix("exe+0x") else {
                continue;
            };
            let off = usize::from_str_radix(off, 16).expect("hex offset");
            backtrace::resolve((start + off) as *mut libc::c_void, |s| {
                if let Some(name) = s.name() {
                    named.push(name.to_string());
                }
            });
        }
        assert!(
            named
                .iter()
                .any(|n| n.contains("a_fault_on_any_thread_is_said_with_frames")),
            "the faulting closure among the frames: {named:?} ({said})"
        );
        assert!(
            lines[2].ends_with(" held: taking over /dev/ublkb7"),
            "the held lines: {said}"
        );
    }

    #[test]
    fn a_fault_signal_sent_from_outside_names_its_sender() {
        const NAME: &str = "faults::tests::a_fault_signal_sent_from_outside_names_its_sender";
        if let Some(kernel_log) = dying_child::kernel_log() {
            child_setup(&kernel_log);
            // SAFETY: raise is always safe to call.
            unsafe { libc::raise(libc::SIGBUS) };
            std::process::exit(0);
        }
        let (out, said) = dying_child::run(NAME);
        let status = out.status;
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{said}");
        let first = said.lines().next().unwrap_or_default();
        // raise(3) sends it from the process itself.
        let pid = first
            .strip_prefix("<2>vramblk: process ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or("?");
        assert!(
            first.ends_with(&format!(" died of SIGBUS sent by process {pid}")),
            "{said}"
        );
    }
}
