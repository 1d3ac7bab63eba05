//! Leaving a daemon behind: fork, report back over a pipe, and make the
//! daemon safe to serve swap (locked in memory, never OOM-killed).

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The daemon's end of the pipe; the first report wins, later ones are
/// dropped. Cloneable so both the "live" callback and the error path can
/// hold it.
#[derive(Clone)]
pub struct Reporter(Arc<Mutex<Option<File>>>);

impl Reporter {
    fn new(fd: Option<OwnedFd>) -> Self {
        Reporter(Arc::new(Mutex::new(fd.map(File::from))))
    }

    /// A reporter for the foreground: nobody listens.
    pub fn none() -> Self {
        Reporter::new(None)
    }

    fn send(&self, line: &str) {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut f) = guard.take() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Closes the pipe without a report, in this process only: a forked
    /// child must not keep its parent's reader waiting.
    pub fn close(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub fn live(&self, id: u32) {
        self.send(&format!("OK {id}\n"));
    }

    pub fn fail(&self, message: &str) {
        self.send(&format!("ERR {message}\n"));
    }
}

/// A pipe: (reading end, writing end).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| anyhow::anyhow!("creating a pipe: {e}"))
}

/// An eventfd: a counter one process writes and another waits on, with no
/// memory allocated on either side (unlike a pipe's first write).
pub fn eventfd() -> Result<OwnedFd> {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
        .map_err(|e| anyhow::anyhow!("eventfd: {e}"))
}

/// A pipe for one report: its reading end, and a reporter on its writing end.
pub fn report_pipe() -> Result<(OwnedFd, Reporter)> {
    let (rd, wr) = pipe()?;
    Ok((rd, Reporter::new(Some(wr))))
}

/// Reads a report: its first line, or nothing if the writer exited
/// without one. Only call once `fd` is readable, or it waits for that.
pub fn read_report(fd: OwnedFd, log: &Path) -> Result<u32> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut f = File::from(fd);
    while f.read(&mut byte).context("reading a report")? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    parse_report(&String::from_utf8_lossy(&line), log)
}

/// Memory the supervisor sets aside for a server forked to recover.
pub const SUPERVISOR_CUSHION_BYTES: usize = 8 << 20;

/// Forks. The child closes `close_in_child` (fds of the parent's it must
/// not keep), detaches, logs to `log`, runs `serve` and exits; the parent
/// waits until the child reports the device live (returns its id) or
/// failed (returns the child's message).
pub fn spawn(
    log: &Path,
    close_in_child: &[RawFd],
    serve: impl FnOnce(Reporter) -> Result<()>,
) -> Result<u32> {
    let (rd, reporter) = report_pipe()?;
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the daemon log {}", log.display()))?;

    // libc's fork: rustix offers one only to runtimes that replace the C
    // library (`rustix::runtime`).
    // SAFETY: the process is single-threaded here (nothing has spawned a
    // thread yet), so the child may run arbitrary code after fork.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            crate::panics::abort_on_panic();
            vramblk_ublk_target::control::forget_inherited_control_ring();
            drop(rd);
            for &fd in close_in_child {
                // SAFETY: the caller's fds, which this forked child never
                // uses or drops (it ends in process::exit).
                unsafe { rustix::io::close(fd) };
            }
            detach(&log_file);
            log_into(log_file);
            let code = match serve(reporter.clone()) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    reporter.fail(&format!("{e:#}"));
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(reporter);
            drop(log_file);
            if !readable_within(&rd, REPORT_TIMEOUT_MS) {
                bail!(
                    "the daemon did not report within {} s; it is left running, see {}",
                    REPORT_TIMEOUT_MS / 1000,
                    log.display()
                );
            }
            read_report(rd, log)
        }
    }
}

/// How long `add` waits for the daemon to bring the device up: allocating
/// and locking many GiB takes seconds, never minutes.
const REPORT_TIMEOUT_MS: i32 = 120_000;

pub fn readable_within(fd: &OwnedFd, timeout_ms: i32) -> bool {
    wait_readable(&[Some(fd)], timeout_ms)[0]
}

/// Waits up to `timeout_ms` for any of `fds` (None: not watched) to be
/// readable (data, end of file, or a pidfd's process gone); which are.
pub fn wait_readable<const N: usize>(fds: &[Option<&OwnedFd>; N], timeout_ms: i32) -> [bool; N] {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut ready = [false; N];
    let watched: Vec<usize> = (0..N).filter(|&i| fds[i].is_some()).collect();
    let mut polled: Vec<PollFd> = fds
        .iter()
        .flatten()
        .map(|fd| PollFd::new(*fd, PollFlags::IN))
        .collect();
    let timeout = Timespec {
        tv_sec: i64::from(timeout_ms / 1000),
        tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
    };
    if polled.is_empty() {
        std::thread::sleep(Duration::from_millis(timeout_ms.max(0) as u64));
        return ready;
    }
    loop {
        match poll(&mut polled, Some(&timeout)) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) | Ok(0) => return ready,
            Ok(_) => break,
        }
    }
    for (p, &i) in polled.iter().zip(&watched) {
        ready[i] = !p.revents().is_empty();
    }
    ready
}

fn parse_report(text: &str, log: &Path) -> Result<u32> {
    let line = text.lines().next().unwrap_or("");
    if let Some(id) = line.strip_prefix("OK ") {
        return id
            .trim()
            .parse()
            .map_err(|_| anyhow!("daemon sent a bad device id {id:?}"));
    }
    if let Some(msg) = line.strip_prefix("ERR ") {
        bail!("{msg}");
    }
    bail!(
        "the daemon exited before the device came up; see {}",
        log.display()
    )
}

/// A daemon's logging: into its log file, through the held log (lines
/// wait in memory set aside for them while a device recovers).
pub fn log_into(file: File) {
    crate::logging::init_logging(env_logger::Target::Pipe(Box::new(
        crate::held_log::HeldLog::new(file),
    )));
}

/// New session, stdin/stdout on /dev/null, stderr into the log.
fn detach(log: &File) {
    // Failures leave the old fds, which is harmless.
    let _ = rustix::process::setsid();
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdin(&null);
        let _ = rustix::stdio::dup2_stdout(&null);
    }
    let _ = rustix::stdio::dup2_stderr(log);
    let _ = std::env::set_current_dir("/");
}

/// Keeps everything the server touches resident and the server alive
/// under memory pressure: a swap device whose server waits on reclaim
/// deadlocks the machine.
pub fn harden_for_swap() -> Result<()> {
    use rustix::mm::MlockAllFlags;
    if let Err(e) = rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE) {
        bail!("mlockall: {e} (vramblk needs CAP_IPC_LOCK to serve swap)");
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        log::warn!("could not set oom_score_adj to -1000: {e}");
    }
    if let Err(e) = std::fs::write("/proc/self/coredump_filter", CORE_DUMPS) {
        log::warn!("could not keep the device's memory out of core dumps: {e}");
    }
    Ok(())
}

/// What a core dump of a daemon holds (core(5)'s coredump_filter bits):
/// its private memory and ELF headers, not its shared mappings, the
/// device's data (host store, io buffers: gigabytes, and swap pages may
/// hold secrets). A daemon that panics aborts (panics.rs), and where core
/// dumps are on, the dump would otherwise copy all of it while the device
/// waits for its next server.
const CORE_DUMPS: &str = "0x11";

/// Readies a freshly forked server to serve swap: marks it an I/O flusher
/// (its allocations do not wait on the I/O it serves), one malloc arena,
/// small thread stacks, then locks everything. With `grow_heap` (memory is
/// plentiful: a first server, a standby) the heap is also grown now and
/// keeps HEAP_KEPT spare for the allocations a later takeover makes; a
/// server forked to recover, while memory may be exhausted, asks for
/// nothing it does not need.
pub fn prepare_server_process(grow_heap: bool) -> Result<()> {
    // libc here: mallopt is the C library's own.
    // SAFETY: mallopt with constant arguments; failures are harmless.
    set_io_flusher(true, "the server");
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * HEAP_KEPT as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_KEPT as libc::c_int);
        if grow_heap {
            // Every time the heap grows it grows HEAP_KEPT more than
            // asked, and it is never trimmed below that: the spare top is
            // mapped, locked (mlockall's MCL_FUTURE populates it) and ready
            // for the allocations a takeover makes while memory is short.
            libc::mallopt(libc::M_TOP_PAD, HEAP_KEPT as libc::c_int);
        }
    }
    // Queue threads need little stack; mlockall would lock 2 MiB each.
    std::env::set_var("RUST_MIN_STACK", QUEUE_STACK.to_string());
    harden_for_swap()?;
    if grow_heap {
        // The block is below the mmap threshold, so it comes from the heap
        // (a block at the threshold would be mapped on its own and
        // unmapped on free, growing nothing); freed, it and the pad stay
        // at the heap's top.
        drop(std::hint::black_box(vec![1u8; HEAP_KEPT / 2]));
    }
    Ok(())
}

/// Marks this process an I/O flusher (`on`) or not: its allocations then
/// never write pages out to swap to make room (PF_MEMALLOC_NOIO), so they
/// never wait on a swap device, this process's own device included, which
/// may have no server just then. Servers are marked, and so is the
/// supervisor once its io buffers exist (one re-executed for an upgrade
/// once it stops the old server: Supervisor::become_flusher): while a
/// device has no server the supervisor must still reap, fork and wake a
/// standby, and an allocation of its that wrote swap out to the device
/// would wait forever (seen on 7.3: the supervisor in direct reclaim,
/// throttled by the block layer's writeback limit on a device whose
/// server it had yet to replace). The mark is the calling thread's,
/// inherited by threads and processes it starts, and kept across execve.
pub fn set_io_flusher(on: bool, who: &str) {
    // libc here: rustix has no PR_SET_IO_FLUSHER call.
    // SAFETY: prctl with constant arguments; a failure is reported.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, libc::c_ulong::from(on), 0, 0, 0) } != 0 {
        log::warn!(
            "could not {} {who} an I/O flusher: {}",
            if on { "mark" } else { "unmark" },
            std::io::Error::last_os_error()
        );
    }
}

/// Starts and joins `n` threads at once, so the C library keeps their
/// stacks (mapped, and locked by mlockall) in its stack cache: the queue
/// threads a standby starts when it takes over, with memory short, reuse
/// them instead of mapping and faulting in new ones.
pub fn warm_thread_stacks(n: usize) {
    let threads: Vec<_> = (0..n)
        .filter_map(|_| {
            std::thread::Builder::new()
                .spawn(|| std::hint::black_box([0u8; 16 << 10]).len())
                .ok()
        })
        .collect();
    let warmed = threads.into_iter().filter_map(|t| t.join().ok()).count();
    log::debug!("server: {warmed} thread stacks ready in the cache");
}

/// Locked anonymous pages held only to be freed later (munmap returns them
/// to the kernel at once, unlike the heap).
pub struct Cushion {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

impl Cushion {
    /// Maps and populates `len` bytes; an empty cushion if that fails.
    pub fn new(len: usize) -> Cushion {
        use rustix::mm::{Advice, MapFlags, ProtFlags};
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked.
        let mapped = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::POPULATE,
            )
        };
        let ptr = match mapped {
            Ok(ptr) => ptr,
            Err(e) => {
                log::warn!("no memory cushion: {e}");
                return Cushion {
                    ptr: std::ptr::null_mut(),
                    len: 0,
                };
            }
        };
        // A child forked meanwhile (a supervisor forks its servers) must not
        // inherit it: locking itself, the child would copy every page.
        // SAFETY: advice on the mapping just made; failure only costs memory.
        let _ = unsafe { rustix::mm::madvise(ptr, len, Advice::LinuxDontFork) };
        Cushion { ptr, len }
    }
}

impl Drop for Cushion {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made in new, never shared.
            let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
        }
    }
}

/// PR_SET_IO_FLUSHER (Linux 5.6), not in every libc crate version.
const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// Heap kept by a server for its own allocations.
pub const HEAP_KEPT: usize = 4 << 20;
/// Stack of each queue thread.
pub const QUEUE_STACK: usize = 512 << 10;

/// Where a daemon with this pid logs.
pub fn log_path(dir: &Path) -> PathBuf {
    let pid = rustix::process::getpid().as_raw_nonzero();
    dir.join(format!("vramblk-{pid}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_whichever_fd_turns_readable() {
        let (quiet, _quiet_w) = std::io::pipe().expect("pipe");
        let (loud, mut loud_w) = std::io::pipe().expect("pipe");
        let quiet = OwnedFd::from(quiet);
        let loud = OwnedFd::from(loud);
        assert_eq!(
            wait_readable(&[Some(&quiet), Some(&loud)], 10),
            [false, false]
        );
        loud_w.write_all(b"x").expect("write");
        let start = std::time::Instant::now();
        assert_eq!(
            wait_readable(&[Some(&quiet), Some(&loud)], 5000),
            [false, true]
        );
        assert!(start.elapsed() < Duration::from_secs(1), "woke at once");
        assert_eq!(wait_readable(&[None, Some(&loud)], 10), [false, true]);
        drop(loud_w);
        assert!(
            readable_within(&loud, 10),
            "data, then end of file, stay readable"
        );
        assert_eq!(wait_readable::<1>(&[None], 1), [false]);
    }

    #[test]
    fn reports_are_parsed() {
        let log = Path::new("/run/vramblk/x.log");
        assert_eq!(parse_report("OK 7\n", log).unwrap(), 7);
        let e = parse_report("ERR no memory\n", log)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "no memory");
        let e = parse_report("", log).unwrap_err().to_string();
        assert!(e.contains("exited before the device came up; see /run/vramblk/x.log"));
    }
}
